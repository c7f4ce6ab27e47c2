"""The web chat's history lives in Redis under the visitor's keys, against a real Redis and a real tiny engine: a
result that arrives while its visitor is away is still on their page after two restarts of the web chat (images
included, and only for them); /forget leaves none of it, and a result that arrives just after /forget does not bring
it back; a result whose storing fails stays in the stream until it is stored."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from adapters.base import EventPump, Result
from adapters.web import COOKIE, LOG_SIZE, WebChat
from conftest import FIXTURES, Stack
from storage.latents import StoredLatent
from storage.records import Origin

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()
WANDA = "wanda-" + "w" * 24
INTRUDER = "intruder-" + "i" * 24


def browser(chat: WebChat, cookie: str) -> TestClient:
    """A browser that comes back with its cookie."""
    return TestClient(TestServer(chat.app), headers={"Cookie": f"{COOKIE}={cookie}"})


async def page(http: TestClient) -> list[dict]:
    """The chat log a page shows when it opens: the first server-sent event of /events."""
    resp = await http.get("/events")
    try:
        line = await resp.content.readline()
    finally:
        resp.close()
    event = json.loads(line.decode().removeprefix("data: "))
    assert event["type"] == "history"
    return event["messages"]


async def send(http: TestClient, text: str, photo: bytes | None = None) -> dict:
    form = FormData({"text": text}, default_to_multipart=True)
    if photo is not None:
        form.add_field("photo", photo, filename="me.jpg")
    resp = await http.post("/command", data=form)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def until(predicate, timeout: float = 300) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def user_keys(stack: Stack, user_id: str) -> list[bytes]:
    return [k async for k in stack.client.scan_iter(match=f"{stack.keys.user(user_id)}*")]


async def test_a_result_posted_while_away_survives_two_restarts_and_forget_removes_it(stack):
    """wanda sends a photo and leaves; the web chat restarts, posts her result (and acknowledges it), restarts
    again; she comes back: her face, the crop beside it and the finished acknowledgement are on her page, the
    images load for her and for nobody else. /forget then leaves nothing of her history in Redis."""
    first = WebChat(stack.core)
    async with browser(first, WANDA) as http:
        assert (await http.post("/nickname", json={"nickname": "wanda"})).status == 200
        reply = await send(http, "/invert", OBAMA)
    assert reply["reply"].startswith("finding your face")

    second = WebChat(stack.core)  # restart 1: it posts the result while wanda is away
    stop = asyncio.Event()
    pump = asyncio.create_task(EventPump(stack.core, second).run(stop))

    async def posted() -> bool:
        return any(m.get("media") for v in second.visitors.values() for m in v.log)
    await until(posted)
    stop.set()
    await asyncio.wait_for(pump, 10)
    assert await stack.client.xlen(stack.keys.results("web")) == 0  # acknowledged: no web chat will post it again

    third = WebChat(stack.core)  # restart 2: nothing in memory
    async with browser(third, WANDA) as http:
        messages = await page(http)
        assert [m["by"] for m in messages] == ["you", "bot", "bot"]
        assert messages[0]["text"] == "/invert" and messages[0]["attachment"] == "me.jpg"
        assert messages[1]["text"] == "finding your face: done"
        assert messages[2]["text"].startswith("your face as the tiny model draws it")
        face = messages[2]
        assert face["actions"] == ["refine", "redo"] and face["model"] == "tiny"
        image = await http.get(face["media"])
        assert image.status == 200 and image.content_type == "image/png"
        assert Image.open(io.BytesIO(await image.read())).size == (32, 32)
        crop = await http.get(face["aligned"])
        assert crop.status == 200 and crop.content_type in ("image/jpeg", "image/png")
        async with browser(third, INTRUDER) as other:
            assert await page(other) == []
            assert (await other.get(face["media"])).status == 404
            assert (await other.get(face["aligned"])).status == 404

        user_id = next(v.user_id for v in third.visitors.values() if v.nickname == "wanda")
        kept = await user_keys(stack, user_id)
        assert stack.keys.web_log(user_id).encode() in kept
        assert sum(b":web:media:" in k for k in kept) == 2
        forgot = await send(http, "/forget")
        assert forgot["reply"].startswith("done: deleted everything")
        assert await user_keys(stack, user_id) == []
        assert (await http.get(face["media"])).status == 404
    async with browser(WebChat(stack.core), WANDA) as http:  # and after another restart, an empty page
        assert await page(http) == []


async def wanda_sends_a_photo(stack, chat, http):
    """Wanda joins and sends /invert: the job's id, her visitor and where its answer goes."""
    assert (await http.post("/nickname", json={"nickname": "wanda"})).status == 200
    job_id = (await send(http, "/invert", OBAMA))["job_id"]
    [visitor] = chat.visitors.values()
    return job_id, visitor, await stack.core.origin(visitor.user_id, job_id)


async def test_a_result_that_arrives_just_after_forget_does_not_bring_the_history_back(client):
    """The event pump read where a result goes just before its visitor said /forget: posting it then writes
    nothing, and the visitor's page and Redis stay empty."""
    stack = Stack(client)
    try:
        chat = WebChat(stack.core)
        async with browser(chat, WANDA) as http:
            job_id, visitor, origin = await wanda_sends_a_photo(stack, chat, http)
            assert origin is not None
            assert (await send(http, "/forget"))["reply"].startswith("done: deleted everything")
            png = io.BytesIO()
            Image.new("RGB", (32, 32)).save(png, "PNG")
            late = Result(job_id, visitor.user_id, True, "your face as the tiny model draws it", media="image",
                          payload=png.getvalue(), result_id=job_id, model="tiny", actions=("refine", "redo"),
                          shows="face")
            assert await chat.show_result(origin, late) is None
            assert await user_keys(stack, visitor.user_id) == []
            assert not any(m.get("media") for m in await page(http))
        async with browser(WebChat(stack.core), WANDA) as http:
            assert await page(http) == []
    finally:
        await stack.close()


async def test_a_result_whose_storing_fails_is_posted_once_it_can_be_stored(stack):
    """The history cannot be written (its key damaged) when wanda's result arrives: the result stays in the stream
    and she sees nothing yet; once it can be written, the next read posts it, once, and it outlives a restart."""
    chat = WebChat(stack.core)
    async with browser(chat, WANDA) as http:
        assert (await http.post("/nickname", json={"nickname": "wanda"})).status == 200
        job_id = (await send(http, "/invert", OBAMA))["job_id"]
    [visitor] = chat.visitors.values()
    log_key = stack.keys.web_log(visitor.user_id)
    await stack.client.delete(log_key)
    await stack.client.set(log_key, "not a list")  # every write to the history fails from now on

    await until(lambda: stack.client.exists(stack.keys.done(job_id)))
    pump = EventPump(stack.core, chat)
    assert await pump.step() == 0  # refused: not acknowledged
    assert await stack.client.xlen(stack.keys.results("web")) == 1
    assert not any(m.get("media") for m in visitor.log)

    await stack.client.delete(log_key)
    assert await pump.step() == 1
    assert await stack.client.xlen(stack.keys.results("web")) == 0
    async with browser(WebChat(stack.core), WANDA) as http:
        faces = [m for m in await page(http) if m.get("media")]
        assert len(faces) == 1 and faces[0]["text"].startswith("your face as the tiny model draws it")
        assert (await http.get(faces[0]["media"])).status == 200


async def test_a_long_conversation_keeps_the_newest_messages_and_their_images(client):
    """After more than LOG_SIZE messages the page opens on the newest LOG_SIZE, after a restart too; an image
    shown in a message that left the log is gone from Redis."""
    stack = Stack(client)
    try:
        chat = WebChat(stack.core)
        async with browser(chat, WANDA) as http:
            assert (await http.post("/nickname", json={"nickname": "wanda"})).status == 200
            [visitor] = chat.visitors.values()
            old = {"id": "a" * 12, "by": "bot", "text": "an old result", "media": "/media/" + "b" * 32 + ".gif",
                   "aligned": "/media/" + "c" * 32}  # a GIF's link ends in .gif, an image's in its id
            await chat.history.write(visitor.user_id, [old], media={"b" * 32: b"GIF89a old", "c" * 32: b"\x89PNG"})
            assert (await http.get(old["media"])).status == 200 and (await http.get(old["aligned"])).status == 200
            for i in range(LOG_SIZE // 2):
                await send(http, f"/unknown{i}")  # each one: what wanda typed and the bot's answer
        async with browser(WebChat(stack.core), WANDA) as http:
            messages = await page(http)
            assert len(messages) == LOG_SIZE
            assert messages[0]["text"] == "/unknown0"
            assert messages[-1]["text"].startswith("unknown command '/unknown99'")
            assert (await http.get(old["media"])).status == 404 and (await http.get(old["aligned"])).status == 404
            assert not [k for k in await user_keys(stack, visitor.user_id) if b":web:media:" in k]
    finally:
        await stack.close()


async def test_a_gone_link_says_whether_it_was_an_animation_and_why_it_can_be_gone(client):
    """A morph's GIF link after /forget answered "that image has expired": neither word was true."""
    stack = Stack(client)
    try:
        chat = WebChat(stack.core)
        async with browser(chat, WANDA) as http:
            job_id, visitor, origin = await wanda_sends_a_photo(stack, chat, http)
            gif = io.BytesIO()
            Image.new("RGB", (32, 32)).save(gif, "GIF", save_all=True, append_images=[Image.new("RGB", (32, 32), "red")])
            morph = Result(job_id, visitor.user_id, True, "morph, 2 frames", media="animation",
                           payload=gif.getvalue(), result_id=job_id, model="tiny", actions=("redo",), shows="morph")
            assert await chat.show_result(origin, morph)
            [shown] = [m for m in await page(http) if m.get("media")]
            assert shown["media"].endswith(".gif")
            assert (await http.get(shown["media"])).content_type == "image/gif"
            assert (await send(http, "/forget"))["reply"].startswith("done: deleted everything")
            gone = await http.get(shown["media"])
            assert gone.status == 404 and await gone.text() == (
                "that animation is not here: I keep results for 7 days (/forget deletes them at once), and only the "
                "browser they were shown in can open them")
            image = await http.get(shown["media"].removesuffix(".gif"))
            assert (await image.text()).startswith("that image is not here: ")
    finally:
        await stack.close()


async def test_the_person_whose_face_was_morphed_is_told_who_did_it_in_their_own_chat(stack):
    """Faces are biometric data: bob shares, wanda morphs with his face, and bob's chat (not only wanda's) says so,
    with how to stop it. After /unshare, nobody is told anything more."""
    chat = WebChat(stack.core)
    stop = asyncio.Event()
    pump = asyncio.create_task(EventPump(stack.core, chat).run(stop))
    try:
        async with browser(chat, WANDA) as wanda, browser(chat, "bob-" + "b" * 24) as bob:
            for http, name in ((wanda, "wanda"), (bob, "bob")):
                assert (await http.post("/nickname", json={"nickname": name})).status == 200
                await send(http, "/status")
                user_id = next(v.user_id for v in chat.visitors.values() if v.nickname == name)
                await stack.store.set_face(user_id, StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
            assert "I will tell you here when someone does" in (await send(bob, "/share"))["reply"]
            assert (await send(wanda, "/morph @me @bob 4"))["job_id"]

            async def told() -> bool:
                return any("made a morph" in m["text"] for m in await page(bob))
            await until(told, 120)
            notices = [m["text"] for m in await page(bob) if "made a morph" in m["text"]]
            assert notices == ["@wanda made a morph with @bob's face; /unshare stops others from using it, "
                               "/forget deletes everything I keep about you"]
            assert not [m for m in await page(wanda) if "made a morph" in m["text"]]
            assert any(m.get("media", "").endswith(".gif") for m in await page(wanda))  # wanda got her GIF

            await send(bob, "/unshare")  # a notice that would arrive now is not written
            [bob_visitor] = [v for v in chat.visitors.values() if v.nickname == "bob"]
            await chat.show_notice(Origin(user=bob_visitor.user_id), "@wanda made a morph with @bob's face")
            assert len([m for m in await page(bob) if "made a morph" in m["text"]]) == 1
    finally:
        stop.set()
        await asyncio.wait_for(pump, 10)
