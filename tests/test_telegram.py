"""The real python-telegram-bot Application against a Bot API peer on loopback, a real Redis and a real tiny engine:
a photo with /invert -> status edits -> photo reply -> /edit -> a 🔥 reaction -> a stronger result."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from adapters.telegram import serve
from bot.config import Config, TelegramConfig
from conftest import FIXTURES
from fakes.telegram_api import FakeTelegram

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()


@pytest.fixture
async def telegram(stack):
    fake = FakeTelegram()
    await fake.start()
    cfg = Config(telegram=TelegramConfig(api_url=f"{fake.url}/bot", file_url=f"{fake.url}/file/bot"))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, stack.core, fake.token, stop))
    yield fake
    stop.set()
    await asyncio.wait_for(task, 30)
    await fake.close()


def photo_sent(caption_part: str):
    return lambda method, p: method in ("sendPhoto", "sendAnimation") and caption_part in p.get("caption", "")


async def test_invert_edit_and_a_reaction_make_it_stronger(telegram):
    fake = telegram
    alice = fake.user(11, "alice")
    await fake.say(alice, "/invert", photo=OBAMA)

    _, ack = await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"].startswith("finding your face"))
    assert ack["text"] == "finding your face: starting now"
    _, progress = await fake.wait_for(lambda m, p: m == "editMessageText" and "finding your face" in p["text"])
    assert progress["text"].startswith("finding your face: ")
    _, face = await fake.wait_for(photo_sent("your face as the tiny model draws it"))
    assert Image.open(io.BytesIO(face["photo"]["bytes"])).size == (32, 32)
    assert "react 👌 refine, 🤔 redo" in face["caption"]  # a face cannot be made stronger or weaker
    assert [b["text"] for b in face["reply_markup"]["inline_keyboard"][0]] == ["👌 refine", "🤔 redo"]

    await fake.say(alice, "/edit smiling")
    _, edited = await fake.wait_for(photo_sent("edited: smiling"))
    edited_msg = next(m for m in fake.sent.values() if m.get("caption", "").startswith("edited: smiling"))

    await fake.react(alice, edited_msg["message_id"], "🔥")
    _, queued = await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"].startswith("making the edit stronger"))
    _, stronger = await fake.wait_for(photo_sent("smiling x1.50"))
    assert [b["text"] for b in stronger["reply_markup"]["inline_keyboard"][0]] == \
        ["🔥 stronger", "👎 weaker", "👌 refine", "🤔 redo"]
    assert stronger["photo"]["bytes"] != edited["photo"]["bytes"]

    # the button under the stronger result: weaker
    stronger_msg = next(m for m in fake.sent.values() if m.get("caption", "").startswith("smiling x1.50"))
    weaker = stronger["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
    await fake.press(alice, stronger_msg, weaker)
    _, answered = await fake.wait_for(lambda m, p: m == "answerCallbackQuery")
    assert answered["text"].startswith("making the edit weaker")
    await fake.wait_for(photo_sent("smiling x1.01"))  # 1.5 x 0.67

    # a reaction on a message that is not a result, and one from a stranger on alice's result
    await fake.react(alice, ack_message_id(fake), "🔥")
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"] ==
                        "that message is not one of my results, or it has expired")
    await fake.react(fake.user(12, "mallory"), edited_msg["message_id"], "🔥", chat=edited_msg["chat"])
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"] ==
                        "only the person who asked for a result can rerun it")


def ack_message_id(fake: FakeTelegram) -> int:
    return next(m["message_id"] for m in fake.sent.values() if m.get("text", "").startswith("finding your face"))


async def test_bad_input_gets_one_line_and_big_files_are_not_downloaded(telegram):
    fake = telegram
    bob = fake.user(21, "bob")
    await fake.say(bob, "/invert", document=("notes.txt", "text/plain", b"hello, not a photo", 18))
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"] ==
                        "that file is not an image I can read; send a JPEG or PNG photo")

    await fake.say(bob, "/invert", document=("huge.png", "image/png", b"", 40 * 2**20))
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"] == "that photo is 40 MiB; send one under 15 MiB")
    assert sum(1 for m, _ in fake.calls if m == "getFile") == 1  # only the text file was fetched

    await fake.say(bob, "/morph @nobody @me")
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"].startswith("I don't know @nobody"))
    await fake.say(bob, "/invert")
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"] == "send a photo with /invert as its caption")


async def test_invert_as_a_reply_to_a_photo_and_morph_by_replying(telegram):
    fake = telegram
    carol, dave = fake.user(31, "carol"), fake.user(32, None)  # dave has no username
    photo_msg = await fake.say(carol, "", photo=OBAMA)  # a photo alone in a private chat means /invert
    await fake.wait_for(photo_sent("your face as the tiny model draws it"))
    await fake.say(dave, "/invert", reply_to=photo_msg)
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"].startswith("finding your face: "))
    await fake.say(dave, "/share")
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"].startswith("others can now /morph"))
    await asyncio.sleep(0)
    for _ in range(600):
        if sum(1 for m, p in fake.calls if m == "sendPhoto" and "your face" in p.get("caption", "")) >= 2:
            break
        await asyncio.sleep(0.1)
    dave_msg = fake.message(dave, "hi")
    await fake.say(carol, "/morph @me 4", reply_to=dave_msg)
    _, gif = await fake.wait_for(lambda m, p: m == "sendAnimation")
    assert gif["caption"].startswith("morph, 4 frames")
    assert Image.open(io.BytesIO(gif["animation"]["bytes"])).format == "GIF"
    # dave is told, in the chat where he said /share, who used his face (he has no @name: "your face")
    _, told = await fake.wait_for(lambda m, p: m == "sendMessage" and "made a morph" in p["text"])
    assert told["chat_id"] == dave["id"] and told["text"] == (
        "@carol made a morph with your face; /unshare stops others from using it, /forget deletes everything I keep "
        "about you")


async def test_an_album_with_invert_gets_one_line_and_nothing_is_queued(telegram):
    """Several photos sent at once come as one message each, sharing a media_group_id: the album is answered once."""
    fake = telegram
    erin = fake.user(41, "erin")
    album = [fake.message(erin, "/invert", photo=OBAMA), fake.message(erin, photo=OBAMA)]  # caption on the first
    plain = [fake.message(erin, photo=OBAMA) for _ in range(3)]  # no caption: photos alone in a private chat
    for group, messages in (("album-1", album), ("album-2", plain)):
        for msg in messages:
            msg["media_group_id"] = group
            await fake.push({"message": msg})
    _, two = await fake.wait_for(lambda m, p: m == "sendMessage" and "(this message has 2)" in p["text"])
    assert two["text"] == "send one photo per /invert (this message has 2)"
    _, three = await fake.wait_for(lambda m, p: m == "sendMessage" and "(this message has 3)" in p["text"])
    assert three["text"] == "send one photo per /invert (this message has 3)"
    await fake.say(erin, "/status")  # after both albums were answered
    await fake.wait_for(lambda m, p: m == "sendMessage" and p["text"].startswith("engines online"))
    texts = [p.get("text", "") for m, p in fake.calls if m == "sendMessage"]
    assert not [t for t in texts if t.startswith("finding your face")]  # nothing queued
    assert sum(1 for t in texts if t.startswith("send one photo per /invert")) == 2  # one answer per album
    assert not [m for m, _ in fake.calls if m == "getFile"]  # nothing downloaded
