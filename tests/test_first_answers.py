"""Two answers to one /invert, against the real Redis and a running tiny engine with an encoder: the encoder's face at
once (stored as the user's face, posted, marked as a first answer), then the optimisation from the encoder's W+,
whose result replaces it in the same message (web chat bubble, Telegram's edit of the photo) and becomes the face.
/forget between the two leaves nothing; a photo with no face fails alone in one line; a model without an encoder
answers once, as before."""

from __future__ import annotations

import asyncio
import contextlib
import io

import numpy as np
from PIL import Image

from adapters.base import EventPump
from adapters.discord import serve as serve_discord
from adapters.telegram import serve as serve_telegram
from adapters.web import WebChat
from bot.config import Config, DiscordConfig, TelegramConfig
from bot.core import Command
from conftest import FIXTURES, ResultRecorder, Stack
from fakes.discord_api import FakeDiscord
from fakes.telegram_api import FakeTelegram
from storage.records import Origin
from test_users_data import everything, traces, wait_for

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()


def say(text: str, user: str = "alice", photo: bytes | None = None) -> Command:
    return Command("web", f"web:{user}", user, text, photo=photo, origin=Origin(user=f"web:{user}"))


def blank_photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 180, 160)).save(out, "JPEG")
    return out.getvalue()


@contextlib.asynccontextmanager
async def engine_and_pump(client, **stack):
    """A `Stack` (keyword arguments: its options) with its engine running, and a pump posting to a recorder:
    (stack, recorder, pump)."""
    s = Stack(client, **stack)
    await s.start_engine()
    try:
        rec = ResultRecorder()
        await s.queue.ensure_groups(adapters=("web",))
        yield s, rec, EventPump(s.core, rec)
    finally:
        await s.close()


@contextlib.asynccontextmanager
async def front_end(serve, cfg, stack: Stack, token: str):
    """A chat front end (`adapters.<platform>.serve`) running on `stack`'s core until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, stack.core, token, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def pump_until(pump: EventPump, predicate, timeout: float = 120) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await pump.step(block_ms=100)


async def test_an_invert_is_answered_by_the_encoder_at_once_then_refined_in_the_same_bubble(client):
    stack = Stack(client, encoder=True, invert_steps=40)
    await stack.start_engine()
    try:
        web = WebChat(stack.core)
        pump = EventPump(stack.core, web)
        await stack.queue.ensure_groups(adapters=("web",))
        reply = await stack.core.handle(say("/invert", photo=OBAMA))
        job = reply.job_id
        visitor = await web._visitor("web:alice")

        def bubbles() -> list[dict]:
            return [m for m in visitor.log if m.get("media")]

        await pump_until(pump, lambda: bubbles())
        [first] = bubbles()
        face = await stack.store.face("web:alice")
        # the first answer: the encoder's face, stored as the user's face and as the result reactions rerun, while
        # the job goes on (still pending: acknowledged only once refined)
        assert first["first"] is True and "a first guess, the encoder's in one pass" in first["text"]
        assert "refining it now (40 steps)" in first["text"]
        assert face.meta["start"] == "encoder" and face.meta["steps"] == 0
        assert (await stack.store.result("web:alice", job)).meta["steps"] == 0
        assert await stack.queue.pending_count() == 1
        first_png = await web.history.media("web:alice", first["media"].removeprefix("/media/"))
        encoder_face = np.asarray(Image.open(io.BytesIO(first_png)))

        await pump_until(pump, lambda: not bubbles()[0].get("first"))
        [refined] = bubbles()  # one bubble: the refined answer took the first one's place
        assert refined["id"] == first["id"]
        assert "the encoder's first guess refined by 40 optimisation steps" in refined["text"]
        assert refined["first_media"] == first["media"] and refined["media"] != first["media"]
        face = await stack.store.face("web:alice")
        assert face.meta["steps"] == 40 and face.meta["start"] == "encoder"
        assert np.array_equal((await stack.store.result("web:alice", job)).ws, face.ws)
        refined_png = await web.history.media("web:alice", refined["media"].removeprefix("/media/"))
        assert not np.array_equal(np.asarray(Image.open(io.BytesIO(refined_png))), encoder_face)
        assert await stack.queue.pending_count() == 0
        # the page after a reload shows the same: one bubble with both faces, kept in Redis
        kept = [m for m in await web.history.load("web:alice") if m.get("media")]
        assert [m["id"] for m in kept] == [first["id"]] and kept[0]["first_media"] == first["media"]
        # reactions on the message rerun what it shows now: a refine goes on from the refined face
        ack = await stack.core.react_emoji("web", "web:alice", refined["id"], "👌", Origin(user="web:alice"))
        assert ack is not None and ack.job_id
    finally:
        await stack.close()


async def test_forget_between_the_two_answers_leaves_nothing_and_answers_nothing_more(client):
    async with engine_and_pump(client, encoder=True, invert_steps=400) as (stack, rec, pump):
        reply = await stack.core.handle(say("/invert", photo=OBAMA))
        await pump_until(pump, lambda: rec.results)
        assert rec.results[0].first and rec.results[0].job_id == reply.job_id
        assert stack.engine.rows  # the refinement runs
        assert (await stack.core.handle(say("/forget"))).forgotten

        async def engine_let_go() -> bool:
            return not stack.engine.claimed and await stack.queue.pending_count() == 0
        await wait_for(engine_let_go)
        for _ in range(3):
            await pump.step(block_ms=100)
        assert len(rec.results) == 1  # no refined answer for someone who asked to be forgotten
        left = traces(await everything(client, stack.keys.prefix), [b"web:alice", b"alice", OBAMA[2000:2064]])
        assert left == []


async def test_a_photo_without_a_face_fails_alone_and_refine_never_answers_once(client):
    """Beside a good photo, one with no face fails in one line; with `refine` off the encoder's face is the answer
    (one message, the job acknowledged at once)."""
    async with engine_and_pump(client, encoder=True, refine=False) as (stack, rec, pump):
        good, bad = await asyncio.gather(stack.core.handle(say("/invert", photo=OBAMA)),
                                         stack.core.handle(say("/invert", user="bob", photo=blank_photo())))
        await pump_until(pump, lambda: len(rec.results) == 2)
        by_job = {r.job_id: r for r in rec.results}
        assert not by_job[bad.job_id].ok and "\n" not in by_job[bad.job_id].text
        assert "face" in by_job[bad.job_id].text
        answer = by_job[good.job_id]
        assert answer.ok and not answer.first and "by its encoder in one pass" in answer.text
        assert "refining" not in answer.text
        assert (await stack.store.face("web:alice")).meta["steps"] == 0
        assert await stack.queue.pending_count() == 0


async def test_without_an_encoder_an_invert_is_answered_once_after_the_optimisation(client):
    async with engine_and_pump(client) as (stack, rec, pump):
        await stack.core.handle(say("/invert", photo=OBAMA))
        await pump_until(pump, lambda: rec.results)
        await pump.step(block_ms=100)
        [answer] = rec.results
        assert answer.ok and not answer.first and "encoder" not in answer.text
        assert "start" not in (await stack.store.face("web:alice")).meta


async def test_telegram_shows_the_refined_face_in_the_first_answers_message(client):
    fake = FakeTelegram()
    await fake.start()
    cfg = Config(telegram=TelegramConfig(api_url=f"{fake.url}/bot", file_url=f"{fake.url}/file/bot"))
    try:
        async with engine_and_pump(client, encoder=True, invert_steps=40) as (stack, _, _), \
                front_end(serve_telegram, cfg, stack, fake.token):
            alice = fake.user(11, "alice")
            await fake.say(alice, "/invert", photo=OBAMA)
            _, first = await fake.wait_for(lambda m, p: m == "sendPhoto" and "first guess" in p.get("caption", ""))
            message = next(m for m in fake.sent.values() if "first guess" in m.get("caption", ""))
            _, edit = await fake.wait_for(lambda m, p: m == "editMessageMedia")
            assert int(edit["message_id"]) == message["message_id"]
            assert "refined by 40 optimisation steps" in edit["media"]["caption"]
            assert [b["text"] for b in edit["reply_markup"]["inline_keyboard"][0]] == ["👌 refine", "🤔 redo"]
            assert message["caption"] == edit["media"]["caption"]  # the message now shows the refined face
            assert fake.files[message["photo"][0]["file_id"]] != first["photo"]["bytes"]
            assert sum(1 for m, _ in fake.calls if m == "sendPhoto") == 1  # no second photo message
            # a reaction on that message reruns the refined result
            await fake.react(alice, message["message_id"], "👌")
            await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"].startswith("refining"))
    finally:
        await fake.close()


async def test_discord_shows_the_refined_face_in_the_first_answers_follow_up(client):
    fake = FakeDiscord()
    await fake.start()
    cfg = Config(discord=DiscordConfig(api_url=fake.api_url))
    try:
        async with engine_and_pump(client, encoder=True, invert_steps=40) as (stack, _, _), \
                front_end(serve_discord, cfg, stack, fake.token):
            await asyncio.wait_for(fake.ready.wait(), 30)
            alice = fake.user(11, "alice")
            ix = await fake.slash(alice, "invert", photo=fake.attachment("obama.jpg", "image/jpeg", OBAMA))
            first = await fake.wait_for(lambda c: c.method == "POST" and c.path.endswith(f"/{ix['token']}")
                                        and "first guess" in c.content)
            message_id = first.response["id"]
            edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path.endswith(f"/messages/{message_id}")
                                       and c.files)
            assert "refined by 40 optimisation steps" in edit.content and "react 👌 refine" in edit.content
            [(_, refined_png)], [(_, first_png)] = edit.files, first.files
            assert refined_png != first_png and Image.open(io.BytesIO(refined_png)).size == (32, 32)
            shown = fake.messages[message_id]
            assert shown["content"] == edit.content and len(shown["attachments"]) == 1
            assert [b["label"] for row in shown["components"] for b in row["components"]] == ["👌 refine", "🤔 redo"]
            posted = [c for c in fake.calls if c.method == "POST" and c.files]
            assert posted == [first]  # the refined face went into the same message, not a second one
    finally:
        await fake.close()


async def test_new_photos_are_answered_first_while_earlier_refinements_hold_the_pool(client):
    """Two rows in the pool, four photos sent together: all four first answers come before any refinement ends (two
    refinements wait for a row, held by the engine, and do not hold back the claims of the photos behind them)."""
    async with engine_and_pump(client, encoder=True, invert_steps=3000, max_active=2) as (stack, rec, pump):
        replies = await asyncio.gather(*(stack.core.handle(say("/invert", user=u, photo=OBAMA))
                                         for u in ("ann", "ben", "cat", "dan")))
        await pump_until(pump, lambda: len(rec.results) == 4, timeout=60)
        assert all(r.first for r in rec.results)
        assert {r.job_id for r in rec.results} == {r.job_id for r in replies}
        assert len(stack.engine.claimed) == 4  # no refinement has ended: all four still held


async def test_a_refined_face_does_not_replace_a_newer_photos_face(client):
    """Photo A, then photo B while A is refined: B's first answer becomes the face at once, A's refinement (which
    ends first: one row) is stored as A's result but leaves B as the face, and B's refinement then replaces B's
    first answer."""
    async with engine_and_pump(client, encoder=True, invert_steps=200, max_active=1) as (stack, rec, pump):
        a = await stack.core.handle(say("/invert", photo=OBAMA))
        await pump_until(pump, lambda: rec.results)
        b = await stack.core.handle(say("/invert", photo=(FIXTURES / "faces" / "biden.jpg").read_bytes()))
        await pump_until(pump, lambda: [(r.job_id, r.first) for r in rec.results] ==
                         [(a.job_id, True), (b.job_id, True), (a.job_id, False)])
        face = await stack.store.face("web:alice")
        b_first = await stack.store.result("web:alice", b.job_id)
        assert np.array_equal(face.ws, b_first.ws) and face.meta["steps"] == 0  # still B's first answer
        assert (await stack.store.result("web:alice", a.job_id)).meta["steps"] == 200  # A's refined result is kept
        await pump_until(pump, lambda: len(rec.results) == 4)
        face = await stack.store.face("web:alice")
        assert face.meta["steps"] == 200
        assert np.array_equal(face.ws, (await stack.store.result("web:alice", b.job_id)).ws)


async def test_a_refinement_that_fails_leaves_the_first_answer_posted_and_says_so(client):
    """The first answer and the refinement's failure read in one batch (the front end was down meanwhile): the first
    answer is posted all the same (it is the user's face), then the failure, which says the first answer stays."""
    stack = Stack(client)
    try:
        rec = ResultRecorder()
        pump = EventPump(stack.core, rec)
        await stack.queue.ensure_groups(adapters=("web",))
        reply = await stack.core.handle(say("/invert", photo=OBAMA))
        [job], _ = await stack.queue.claim("e", 1, block_ms=None)
        assert job.job_id == reply.job_id
        services = stack.engine.s
        assert await services.finish(job, "a first guess", media="image", shows="face", payload=b"png", first=True)
        await services.fail(job, "the optimisation went wrong on this one")
        await pump.step(block_ms=100)
        first, failure = rec.results
        assert first.first and first.ok and first.text == "a first guess"
        assert not failure.ok and failure.text.startswith("refining the first answer failed (the optimisation went "
                                                          "wrong on this one); the first answer stays your result")
        await pump.step(block_ms=100)
        assert len(rec.results) == 2
    finally:
        await stack.close()
