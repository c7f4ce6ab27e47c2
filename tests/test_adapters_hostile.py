"""The web chat's endpoints against what a hostile (or broken) client sends: bodies that are not JSON, not UTF-8, not
an object, nested a hundred thousand deep; forms with several photos, text in another encoding, encodings nobody
knows. Each gets a 4xx with one line of JSON, never a 500 or a traceback, and nothing is queued. Real Redis."""

from __future__ import annotations

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from adapters.web import WebChat
from conftest import FIXTURES, Stack
from storage.latents import DamagedLatent, StoredLatent, _pack

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()
BOUNDARY = "stylebot-hostile"


def form(*parts: tuple[str, bytes]) -> bytes:
    """A multipart/form-data body from (part headers, part bytes)."""
    body = b"".join(f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n" for headers, data in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def field(name: str, filename: str | None = None, extra: str = "") -> str:
    return (f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            + (f"\r\n{extra}" if extra else ""))


@pytest.fixture
async def web(client):
    """A visitor called eve in the web chat, on a fresh prefix of the real Redis (no engine: nothing may run)."""
    s = Stack(client)
    async with TestClient(TestServer(WebChat(s.core).app)) as http:
        assert (await http.post("/nickname", json={"nickname": "eve"})).status == 200
        yield http, s
    await s.close()


async def one_line(resp, status: int) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error and "\n" not in error and "Traceback" not in error
    return error


@pytest.mark.parametrize("body", [b'{"nickname": "\xff\xfe"}', b'{"nickname": "ev', b"", b'["eve"]', b'"eve"',
                                  b"[" * 100_000, b'{"message": "\xc3", "action": "stronger"}'],
                         ids=["not utf-8", "cut short", "empty", "a list", "a string", "nested", "not utf-8 inside"])
async def test_json_endpoints_answer_a_body_that_is_no_json_object_in_one_line(web, body):
    http, _ = web
    headers = {"Content-Type": "application/json"}
    assert await one_line(await http.post("/nickname", data=body, headers=headers), 400) == \
        'send JSON like {"nickname": "alice"}'
    assert await one_line(await http.post("/react", data=body, headers=headers), 400) == \
        'send JSON like {"message": ID, "action": "stronger"}'
    assert (await (await http.get("/info")).json())["nickname"] == "eve"  # and nothing changed


async def test_several_photos_in_one_invert_are_refused_and_nothing_is_queued(web):
    http, s = web
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    two = form((field("text"), b"/invert"), (field("photo", "a.jpg"), OBAMA), (field("photo", "b.jpg"), OBAMA))
    assert await one_line(await http.post("/command", data=two, headers=headers), 400) == \
        "send one photo per /invert (this message has 2)"
    three = form(*[(field("photo", f"{i}.jpg"), OBAMA) for i in range(3)])  # no text: a photo alone means /invert
    assert await one_line(await http.post("/command", data=three, headers=headers), 400) == \
        "send one photo per /invert (this message has 3)"
    assert await s.queue.pending_count() == 0


@pytest.mark.parametrize("part, error", [
    ((field("text"), "/edit café".encode("latin-1")), "send the text as UTF-8"),
    ((field("text", extra="Content-Transfer-Encoding: x-unheard-of"), b"/help"),
     "send the form as multipart/form-data"),
    ((field("text", extra="Content-Type: multipart/mixed; boundary=inner"), b"--inner--"),
     "send the form as multipart/form-data"),
], ids=["latin-1 text", "unknown transfer encoding", "a form inside the form"])
async def test_a_form_in_another_encoding_is_answered_in_one_line(web, part, error):
    http, s = web
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    assert await one_line(await http.post("/command", data=form(part), headers=headers), 400) == error
    assert await s.queue.pending_count() == 0


@pytest.mark.parametrize("nickname", [None, True, 7, ["eve2"], {"n": "eve2"}])
async def test_a_nickname_that_is_not_text_is_refused_not_spelled_out(web, nickname):
    """{"nickname": null} and {"nickname": true} were taken as the names "None" and "True"."""
    http, _ = web
    assert await one_line(await http.post("/nickname", json={"nickname": nickname}), 400) == \
        "a nickname is 2 to 24 Latin letters (a-z), digits or _"
    assert (await (await http.get("/info")).json())["nickname"] == "eve"


async def test_a_long_message_is_refused_with_its_true_length(web):
    """A 100,000-character prompt was cut to 2,000 and answered "the prompt is 1994 characters long"; the web chat
    now says how long it really is. A body past the upload limit sent without its length gets the page's JSON line,
    not aiohttp's plain-text 413."""
    http, s = web
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    long = form((field("text"), ("/edit " + "a" * 99_994).encode()))
    assert await one_line(await http.post("/command", data=long, headers=headers), 413) == \
        "that message is 100,000 characters long; keep it under 4,096 characters"
    longer = form((field("text"), b"a" * (2 << 20)))
    assert await one_line(await http.post("/command", data=longer, headers=headers), 413) == \
        "that message is over 1 MiB; keep it under 4,096 characters"
    huge = b'{"nickname": "' + b"a" * (17 << 20) + b'"}'

    async def chunks():  # no Content-Length: aiohttp finds the size while reading
        for i in range(0, len(huge), 1 << 20):
            yield huge[i:i + (1 << 20)]
    assert await one_line(await http.post("/nickname", data=chunks(), headers={"Content-Type": "application/json"}),
                          413) == "that upload is too big: send one photo and a short message"
    assert await s.queue.pending_count() == 0


async def test_requests_without_a_cookie_do_not_pile_up_visitors(web):
    """Every request without a cookie makes a visitor: those without an open page beyond `max_idle_visitors` are
    dropped, oldest first (20,000 GET /info grew the process from 73 to 101 MB), and come back from Redis."""
    http, s = web
    chat = next(r.handler.__self__ for r in http.server.app.router.routes() if r.resource.canonical == "/info")
    chat.max_idle_visitors = 50
    async with TestClient(TestServer(chat.app)) as anonymous:  # the same app, requests without cookies
        for _ in range(300):
            anonymous.session.cookie_jar.clear()
            assert (await anonymous.get("/info")).status == 200
    assert len(chat.visitors) <= 50
    assert (await (await http.get("/info")).json())["nickname"] == "eve"  # eve, dropped meanwhile, comes back


@pytest.mark.parametrize("damage", ["short ws", "shape cut short", "no model id", "a string key", "a list key"])
async def test_a_damaged_stored_face_is_answered_in_one_line_and_forget_clears_it(web, client, damage):
    """A face key holding a short or malformed value, or a key of another type: /status and /edit answer in one line
    (never a 500), and /forget still clears it."""
    http, s = web
    key = s.core.keys.latent(await s.core.user_called("web", "eve"))
    good = _pack(StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
    if damage == "a string key":
        await client.set(key, "x")
    elif damage == "a list key":
        await client.rpush(key, "x")
    else:
        changed = {"short ws": {"ws": good["ws"][:10]}, "shape cut short": {"shape": "[8, 6"},
                   "no model id": {}}[damage]
        await client.hset(key, mapping={k: v for k, v in {**good, **changed}.items()
                                        if not (damage == "no model id" and k == "model_id")})
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for text in (b"/status", b"/edit angry face"):
        resp = await http.post("/command", data=form((field("text"), text)), headers=headers)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["reply"] == str(DamagedLatent())
    assert (await http.post("/command", data=form((field("text"), b"/forget")), headers=headers)).status == 200
    assert (await http.post("/nickname", json={"nickname": "eve"})).status == 200  # /forget forgot the name too
    resp = await http.post("/command", data=form((field("text"), b"/status")), headers=headers)
    assert (await resp.json())["reply"].endswith("no face for you yet")
