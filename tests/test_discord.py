"""The real discord.py client (through `adapters.discord.serve`) against Discord on loopback, a real Redis and a real
tiny engine: /invert with a photo -> deferred, "queued", progress -> a PNG follow-up -> /edit -> a 🔥 reaction ->
a stronger result in the channel -> a button under it -> weaker; a /morph GIF that outlives its interaction token;
and the one-line answers users get to what cannot be done."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import pytest
from PIL import Image

from adapters.discord import serve
from bot.config import Config, DiscordConfig
from conftest import FIXTURES
from fakes.discord_api import EPHEMERAL, OPTION_TYPES, Call, FakeDiscord

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()
BIDEN = (FIXTURES / "faces" / "biden.jpg").read_bytes()


@pytest.fixture
async def discord_api(stack):
    fake = FakeDiscord()
    await fake.start()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(Config(discord=DiscordConfig(api_url=fake.api_url)), stack.core, fake.token,
                                     stop))
    ready = asyncio.create_task(fake.ready.wait())
    await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()  # the client could not start: its reason
    assert fake.ready.is_set(), "the client did not identify on the gateway"
    yield fake
    stop.set()
    await asyncio.wait_for(task, 30)
    await fake.close()


def original_edit(fake: FakeDiscord, ix: dict, text: str = ""):
    """An edit of the interaction's original response whose text starts with `text`."""
    def match(c: Call) -> bool:
        if c.method != "PATCH" or f"/webhooks/{fake.application_id}/{ix['token']}/messages/" not in c.path:
            return False
        original = fake.interaction(ix["token"]).get("original")
        return c.path.rpartition("/")[2] in ("@original", original) and c.content.startswith(text)
    return match


def followup(ix: dict, text: str = ""):
    return lambda c: c.method == "POST" and c.path.endswith(f"/{ix['token']}") and text in c.content


def channel_post(fake: FakeDiscord, text: str = ""):
    return lambda c: c.method == "POST" and c.path == f"/channels/{fake.channel_id}/messages" and text in c.content


def image(call: Call) -> Image.Image:
    [(name, data)] = call.files
    return Image.open(io.BytesIO(data))


def buttons(call: Call) -> dict[str, str]:
    """label -> custom id of the buttons under a posted message."""
    return {b["label"]: b["custom_id"] for row in call.json["components"] for b in row["components"]}


async def test_invert_edit_a_reaction_and_a_button(discord_api, stack):
    fake = discord_api
    assert fake.gateway_queries[0]["encoding"] == "json" and fake.gateway_queries[0]["v"] == "10"
    assert sorted(fake.commands) == ["edit", "forget", "help", "invert", "morph", "share", "status", "unshare"]
    assert [(o["name"], o["type"]) for o in fake.commands["morph"]["options"]] == \
        [("a", 6), ("b", 6), ("frames", 4)]
    alice = fake.user(11, "alice")

    ix = await fake.slash(alice, "invert", photo=fake.attachment("obama.jpg", "image/jpeg", OBAMA))
    await fake.wait_for(original_edit(fake, ix, "finding your face: "))
    dave = fake.user(14, "dave")  # dave lets others morph with his face
    await fake.slash(dave, "share")
    await fake.slash(dave, "invert", photo=fake.attachment("biden.jpg", "image/jpeg", BIDEN))
    deferred = await fake.wait_for(lambda c: c.path.endswith(f"/{ix['token']}/callback"))
    assert deferred.json["type"] == 5  # "stylebot is thinking..."
    await fake.wait_for(original_edit(fake, ix, "finding your face: starting now"))
    await fake.wait_for(original_edit(fake, ix, "finding your face: step 20 of 20"))
    face = await fake.wait_for(followup(ix, "your face as the tiny model draws it"))
    assert image(face).size == (32, 32) and image(face).format == "PNG"
    assert "react 👌 refine, 🤔 redo" in face.content
    assert list(buttons(face)) == ["👌 refine", "🤔 redo"]  # a face cannot be made stronger or weaker
    original = fake.messages[fake.interaction(ix["token"])["original"]]
    assert original["history"][:2] == ["", "finding your face: starting now"]
    assert original["content"].startswith("finding your face: step 20 of 20")

    ix = await fake.slash(alice, "edit", prompt="smiling")
    edited_call = await fake.wait_for(followup(ix, "edited: smiling"))
    edited = fake.messages[edited_call.response["id"]]
    assert image(edited_call).size == (32, 32)

    seen = len(fake.calls)
    await fake.react(alice, edited, "🔥")
    queued = await fake.wait_for(channel_post(fake, "making the edit stronger"), after=seen)
    assert queued.content == "<@11> making the edit stronger: starting now"
    assert str(queued.json["message_reference"]["message_id"]) == edited["id"]
    stronger_call = await fake.wait_for(channel_post(fake, "smiling x1.50"), after=seen)
    assert stronger_call.content.startswith("<@11> smiling x1.50")
    mentions = stronger_call.json["allowed_mentions"]  # captions carry prompts: they ping alice and nobody else
    assert mentions["parse"] == [] and [str(u) for u in mentions["users"]] == ["11"]
    assert stronger_call.files[0][1] != edited_call.files[0][1]
    stronger = fake.messages[stronger_call.response["id"]]

    # 👌 on the face: refine it; progress edits the channel message that said "refining: " (a refine long enough
    # for progress to come before the result: progress that arrives with its result is not shown)
    stack.engine.s.settings = dataclasses.replace(stack.engine.s.settings, invert_steps=200)
    seen = len(fake.calls)
    await fake.react(alice, fake.messages[face.response["id"]], "👌")
    queued = await fake.wait_for(channel_post(fake, "refining: "), after=seen)
    status = f"/channels/{fake.channel_id}/messages/{queued.response['id']}"
    await fake.wait_for(lambda c: c.method == "PATCH" and c.path == status and c.content.startswith("refining: step"),
                        after=seen)
    refined = await fake.wait_for(channel_post(fake, "refined 1x"), after=seen)
    assert refined.content.startswith("<@11> your face") and image(refined).size == (32, 32)

    # the weaker button under the stronger result: an answer for alice alone, then the result as a follow-up
    press = await fake.press(alice, stronger, buttons(stronger_call)["👎 weaker"])
    answered = await fake.wait_for(lambda c: c.path.endswith(f"/{press['token']}/callback"))
    assert answered.json["type"] == 5 and answered.json["data"]["flags"] & EPHEMERAL
    await fake.wait_for(original_edit(fake, press, "making the edit weaker: starting now"))
    await fake.wait_for(followup(press, "smiling x1.01"))  # 1.5 x 0.67

    # /morph with a member: a GIF; its interaction token expires after the "queued" edit (as after 15 minutes
    # in a long queue), so the GIF goes to the channel, with a mention
    seen = len(fake.calls)
    ix = await fake.slash(alice, "morph", a=alice, b=dave, frames=4, token_uses=1)
    await fake.wait_for(original_edit(fake, ix, "morphing: "), after=seen)
    gif = await fake.wait_for(channel_post(fake, "morph, 4 frames"), timeout=90, after=seen)
    assert gif.content.startswith("<@11> morph, 4 frames")
    assert [c.status for c in fake.calls[seen:] if followup(ix)(c)] == [401]  # the follow-up Discord refused
    assert image(gif).format == "GIF" and image(gif).n_frames > 1 and gif.files[0][0].endswith(".gif")
    # dave is told in the channel where he said /share, mentioning him (and only him), who used his face
    told = await fake.wait_for(channel_post(fake, "made a morph"), after=seen)
    assert told.content == ("<@14> @alice made a morph with @dave's face; /unshare stops others from using it, "
                            "/forget deletes everything I keep about you")
    assert told.json["allowed_mentions"]["users"] == [14]

    # reactions that are not reruns: on a message of ours that is no result, by a stranger, with other emoji
    seen = len(fake.calls)
    await fake.react(alice, fake.say(fake.user(12, "mallory"), "nice"), "🔥")  # not our message: silence
    await fake.react(alice, edited, "🍌")  # means nothing: silence
    await fake.react(alice, original, "🔥")
    await fake.wait_for(channel_post(fake, "that message is not one of my results, or it has expired"), after=seen)
    await fake.react(fake.user(12, "mallory"), edited, "🔥")
    await fake.wait_for(channel_post(fake, "only the person who asked for a result can rerun it"), after=seen)
    assert len([c for c in fake.calls[seen:] if channel_post(fake)(c)]) == 2


async def test_refusals_are_one_line_and_big_files_are_not_downloaded(discord_api):
    fake = discord_api
    bob, carol = fake.user(21, "bob"), fake.user(22, "carol")

    ix = await fake.slash(bob, "invert", photo=fake.attachment("notes.txt", "text/plain", b"hello, not a photo"))
    await fake.wait_for(original_edit(fake, ix, "that file is not an image I can read; send a JPEG or PNG photo"))
    assert len(fake.downloads("notes.txt")) == 1

    ix = await fake.slash(bob, "invert", photo=fake.attachment("huge.png", "image/png", b"", size=40 * 2**20))
    await fake.wait_for(original_edit(fake, ix, "that photo is 40 MiB; send one under 15 MiB"))
    assert fake.downloads("huge.png") == []

    gone = fake.attachment("gone.jpg", "image/jpeg", OBAMA)
    fake.files.clear()  # the download fails: the one error handler answers
    ix = await fake.slash(bob, "invert", photo=gone)
    await fake.wait_for(original_edit(fake, ix, "something went wrong on my side; please try again"))

    ix = await fake.slash(bob, "edit", prompt="smiling")
    await fake.wait_for(original_edit(fake, ix, "there is no face for you yet: send a photo with /invert first"))
    ix = await fake.slash(bob, "morph", a=carol, b=bob, frames=4)
    await fake.wait_for(original_edit(fake, ix, "@carol has not allowed morphs with their face"))
    ix = await fake.slash(carol, "share")
    await fake.wait_for(original_edit(fake, ix, "others can now /morph with your face"))
    ix = await fake.slash(bob, "morph", a=carol, b=bob)
    await fake.wait_for(original_edit(fake, ix, "there is no face for @carol yet"))

    # a button under a result from before a restart, which has expired since; a command this client does not know
    button = {"type": 2, "style": 2, "label": "🔥 stronger", "custom_id": "stylebot:stronger:" + "ab" * 16}
    old = fake.posted_earlier("smiling x1.50", components=[{"type": 1, "components": [button]}])
    press = await fake.press(bob, old, button["custom_id"])
    await fake.wait_for(original_edit(fake, press, "that result has expired, or it is not yours to rerun"))
    fake.commands["retired"] = {**fake.commands["status"], "name": "retired", "id": fake.snowflake()}
    ix = await fake.slash(bob, "retired")
    told = await fake.wait_for(lambda c: c.path.endswith(f"/{ix['token']}/callback"))
    assert told.json["type"] == 4 and told.json["data"]["flags"] & EPHEMERAL
    assert told.content == "/retired is not one of my commands any more: try /help"
    ix = await fake.slash(bob, "status")  # and the client carries on
    await fake.wait_for(original_edit(fake, ix, "engines online: 1"))


async def test_an_invert_that_carries_several_photos_gets_one_line(discord_api, stack):
    """Discord's picker takes one file for `photo:`; an interaction that resolves more is answered, not guessed at."""
    fake = discord_api
    erin = fake.user(41, "erin")
    photos = [fake.attachment(f"{n}.jpg", "image/jpeg", OBAMA) for n in ("first", "second")]
    data = {"id": fake.commands["invert"]["id"], "name": "invert", "type": 1,
            "options": [{"name": "photo", "type": OPTION_TYPES["attachment"], "value": photos[0]["id"]}],
            "resolved": {"attachments": {p["id"]: p for p in photos}}}
    ix = fake._interaction(erin, 2, data)
    await fake.dispatch("INTERACTION_CREATE", ix)
    await fake.wait_for(original_edit(fake, ix, "send one photo per /invert (this message has 2)"))
    assert fake.downloads("first.jpg") == [] and fake.downloads("second.jpg") == []  # nothing downloaded
    assert await stack.queue.pending_count() == 0  # nor queued
