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
