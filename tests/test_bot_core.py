"""The bot core on a real Redis: each bad input gets a clear line, consent is asked, /forget forgets."""

from __future__ import annotations

import io
import re
import struct
import uuid
import zlib

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from bot.config import LimitsConfig
from bot.core import BotCore, Command, Reaction
from conftest import FIXTURES
from storage.keys import Keys
from storage.latents import LatentStore, StoredLatent
from storage.queue import JobQueue

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()


@pytest_asyncio.fixture
async def bot(client):
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    queue = JobQueue(client, keys)
    await queue.ensure_groups(adapters=("web",))
    limits = LimitsConfig(max_photo_bytes=2**20, max_photo_pixels=4_000_000, max_jobs_per_user=2, max_queue=5)
    core = BotCore(queue, LatentStore(client, keys), limits)
    yield core
    async for key in client.scan_iter(match=f"{keys.prefix}*"):
        await client.delete(key)


def say(text: str, user: str = "alice", photo: bytes | None = None) -> Command:
    return Command(adapter="web", user_id=f"web:{user}", user_name=user, text=text, photo=photo)


async def give_face(bot: BotCore, user: str, model: str = "tiny") -> None:
    await bot.store.set_face(f"web:{user}", StoredLatent(np.zeros((8, 64), np.float32), model))


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def _gif(frames: int) -> bytes:
    buf = io.BytesIO()
    ims = [Image.new("RGB", (20, 20), (i * 40, 0, 0)) for i in range(frames)]
    ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:])
    return buf.getvalue()


async def test_invert_is_queued_with_a_position(bot):
    reply = await bot.handle(say("/invert", photo=OBAMA))
    assert reply.job_id
    # no engine heartbeat in this test: the user is told why nothing moves
    assert reply.text == "finding your face: waiting for the engine, which is offline right now"
    await bot.queue.beat("e1", "tiny", 30)
    second = await bot.handle(say("/invert", user="bob", photo=OBAMA))
    assert second.text == "finding your face: waiting behind 1 job"
    third = await bot.handle(say("/edit really angry face", user="alice"))
    assert third.text == "there is no face for you yet: send a photo with /invert first"


@pytest.mark.parametrize("photo, expected", [
    (None, "send a photo with /invert as its caption"),
    (b"%PDF-1.4 hello", "not an image I can read"),
    (OBAMA[: len(OBAMA) // 2], "damaged or cut off"),
    (_gif(3), "that is an animation; send a still photo"),
    (_png_header(50_000, 50_000), "that photo is 50000x50000 pixels; send one under 4 megapixels"),
    (OBAMA + b"\0" * 2**20, "send one under 1 MiB"),
])
async def test_bad_photos_get_one_line(bot, photo, expected):
    reply = await bot.handle(say("/invert", photo=photo))
    assert expected in reply.text and reply.job_id is None and "\n" not in reply.text
    assert await bot.queue.pending_count() == 0


@pytest.mark.parametrize("text, expected", [
    ("/edit", "the prompt is empty"),
    ("/edit    ", "the prompt is empty"),
    ("/edit " + "x" * 300, "keep it under 200"),
    ("/morph @me", "usage: /morph @me @friend [frames]"),
    ("/morph @me @me 500", "frames must be between 2 and 120"),
    ("/morph @me @nobody", "I don't know @nobody"),
    ("/dance", "unknown command '/dance': try /help"),
])
async def test_bad_commands_get_one_line(bot, text, expected):
    await give_face(bot, "alice")
    reply = await bot.handle(say(text))
    assert expected in reply.text and reply.job_id is None


async def test_edit_without_a_face_says_how_to_get_one(bot):
    reply = await bot.handle(say("/edit really angry face"))
    assert reply.text == "there is no face for you yet: send a photo with /invert first"


async def test_morph_needs_the_other_persons_consent(bot):
    await give_face(bot, "alice")
    await bot.handle(say("/help", user="bob"))  # bob has talked to the bot: @bob resolves
    reply = await bot.handle(say("/morph @me @bob"))
    assert reply.text == "@bob has not allowed morphs with their face: they can send /share to allow it"
    await bot.handle(say("/share", user="bob"))
    reply = await bot.handle(say("/morph @me @bob"))  # the step left is bob's, and the answer says so
    assert reply.text == "there is no face for @bob yet: they need to send a photo with /invert first"
    await give_face(bot, "bob")
    reply = await bot.handle(say("/morph @me @bob 12"))
    assert reply.job_id and reply.text.startswith("morphing: ")
    await bot.handle(say("/unshare", user="bob"))
    assert "has not allowed" in (await bot.handle(say("/morph @me @bob"))).text


async def test_forget_says_it_stopped_jobs_only_when_it_did(bot):
    await give_face(bot, "alice")
    reply = await bot.handle(say("/forget"))
    assert re.fullmatch(r"done: deleted everything I kept about you \(\d+ items\)", reply.text), reply.text
    assert (await bot.handle(say("/forget"))).text == "done: I kept nothing about you"
    for _ in range(2):
        assert (await bot.handle(say("/invert", photo=OBAMA))).job_id
    assert (await bot.handle(say("/forget"))).text.endswith(", and stopped your 2 unfinished jobs")


async def test_forget_leaves_nothing_of_the_user(bot):
    queued = await bot.handle(say("/invert", photo=OBAMA))
    await give_face(bot, "alice")
    await bot.handle(say("/share"))
    await bot.store.set_result("web:alice", "r1", StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
    reply = await bot.handle(say("/forget"))
    assert re.fullmatch(r"done: deleted everything I kept about you \(\d+ items\), and stopped your 1 unfinished job",
                        reply.text), reply.text
    left = [k async for k in bot.queue.r.scan_iter(match=f"{bot.keys.prefix}*alice*")]
    assert left == []
    assert not await bot.queue.r.exists(bot.keys.photo(queued.job_id))  # the queued photo went too
    await give_face(bot, "bob")
    assert "I don't know @alice" in (await bot.handle(say("/morph @me @alice", user="bob"))).text


async def test_limits_per_user_and_for_the_whole_queue(bot):
    for _ in range(2):
        assert (await bot.handle(say("/invert", photo=OBAMA))).job_id
    assert "you already have 2 jobs waiting" in (await bot.handle(say("/invert", photo=OBAMA))).text
    for user in ("b", "c", "d"):
        await bot.handle(say("/invert", user=user, photo=OBAMA))
    assert (await bot.handle(say("/invert", user="e", photo=OBAMA))).text == \
        "I'm busy right now: try again in a few minutes"


async def test_reactions_rerun_only_your_own_edits(bot):
    w0, w = np.zeros((8, 64), np.float32), np.ones((8, 64), np.float32)
    await bot.store.set_result("web:alice", "edit1", StoredLatent(w, "tiny", meta={"prompt": "angry"}, w0=w0))
    await bot.store.set_result("web:alice", "inv1", StoredLatent(w, "tiny"))
    ok = await bot.react(Reaction("web", "web:alice", "edit1", "stronger"))
    assert ok.job_id and ok.text.startswith("making the edit stronger: ")
    assert (await bot.react(Reaction("web", "web:bob", "edit1", "stronger"))).text == \
        "that result has expired, or it is not yours to rerun"
    assert (await bot.react(Reaction("web", "web:alice", "inv1", "weaker"))).text == \
        "only edits can be made stronger or weaker"


async def test_help_lists_every_command(bot):
    text = (await bot.handle(say("/help"))).text
    for name in ("/invert", "/morph", "/edit", "/share", "/unshare", "/forget", "/status", "/help"):
        assert name in text
    assert "\nonly the person who asked for a result can rerun it\n" in text
    assert text.endswith("\nwhere the model has an encoder, /invert answers twice: a first guess at once, then the "
                         "refined face in the same message; a command sent in between uses whichever of the two is "
                         "your face when the engine starts it")
    status = (await bot.handle(say("/status"))).text
    assert status.startswith("engines online: 0; jobs in the queue: 0")


async def test_help_says_how_this_chat_reruns_a_result(bot):
    """The web chat has buttons, not reactions; Telegram and Discord have both."""
    web = (await bot.handle(Command("web", "web:alice", "alice", "/help"))).text
    telegram = (await bot.handle(Command("telegram", "telegram:1", "alice", "/help"))).text
    assert "\nthe buttons under a result rerun it: 🔥 make an edit stronger;" in web and "react" not in web
    assert "\nreact to a result, or use the buttons under it, to rerun it: 🔥 make an edit stronger;" in telegram


async def test_status_says_the_face_is_kept_and_which_model_made_it(bot):
    await bot.store.set_face("web:alice", StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
    assert (await bot.handle(say("/status"))).text.endswith("your face: kept, made with the tiny model")
