"""Reactions on results, end to end through the core, a real engine (tiny models) and the adapters' event pump:
refine continues an inversion, stronger reruns an edit, redo runs the command again, strangers are turned away."""

from __future__ import annotations

import asyncio
import re

from adapters.base import EventPump, Result
from bot.core import Command
from conftest import FIXTURES
from storage.records import Origin

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()


class Recorder:
    """A platform that keeps what it was asked to show; message refs are counters."""

    name = "web"

    def __init__(self):
        self.results: list[tuple[Origin, Result, str]] = []
        self.progress: list[tuple[Origin, str]] = []

    async def show_progress(self, origin: Origin, text: str, preview: bytes | None) -> None:
        self.progress.append((origin, text))

    async def show_result(self, origin: Origin, result: Result) -> str | None:
        ref = f"m{len(self.results) + 1}"
        self.results.append((origin, result, ref))
        return ref


async def answer(pump: EventPump, rec: Recorder, n: int, timeout: float = 90) -> list[tuple[Origin, Result, str]]:
    """Pump events until `n` more results were posted."""
    want = len(rec.results) + n
    deadline = asyncio.get_running_loop().time() + timeout
    while len(rec.results) < want:
        assert asyncio.get_running_loop().time() < deadline, "no answer from the engine"
        await pump.step(block_ms=200)
    return rec.results[-n:]


def say(text: str, user: str = "alice", photo: bytes | None = None, chat: str = "c1") -> Command:
    return Command("web", f"web:{user}", user, text, photo=photo, origin=Origin(user=chat))


async def test_refine_stronger_redo_through_reactions(stack):
    await _reruns(stack)


async def _reruns(stack) -> None:
    rec = Recorder()
    pump = EventPump(stack.core, rec)
    await stack.queue.ensure_groups(adapters=("web",))
    await pump.subscribe()
    core = stack.core

    ack = await core.handle(say("/invert", photo=OBAMA))
    assert ack.job_id and ack.text.startswith("finding your face: ")
    [(origin, face, face_ref)] = await answer(pump, rec, 1)
    assert origin.user == "c1" and face.ok and "how close to your photo: " in face.text
    # PSNR with a scale taken on the same photo: bare, "25.8 dB" says nothing to most people
    assert re.search(r"dB PSNR \(higher is closer\); for scale, your photo at a quarter of its size scores [\d.]+ dB "
                     r"and as a JPEG [\d.]+ dB", face.text), face.text
    # dlib finds no face in a 32 px reconstruction from random weights: no likeness is claimed
    assert "dlib" not in face.text and "note: small face" in face.text
    assert rec.progress and re.match(r"finding your face: (started|step \d+ of 20)", rec.progress[-1][1])
    psnr0 = float(face.text.split("your photo: ")[1].split(" dB")[0])

    # refine: more steps from the stored latent, against the kept aligned face
    reply = await core.react_emoji("web", "web:alice", face_ref, "👌", origin=Origin(user="c1"))
    assert reply.text.startswith("refining: ")
    [(_, refined, _)] = await answer(pump, rec, 1)
    assert refined.ok and "refined 1x" in refined.text
    assert float(refined.text.split("your photo: ")[1].split(" dB")[0]) > psnr0 - 0.5
    assert (await stack.store.face("web:alice")).meta["steps"] == 30  # 20 + half of 20

    # stronger is for edits; on a face it says so
    assert (await core.react_emoji("web", "web:alice", face_ref, "🔥")).text == \
        "only edits can be made stronger or weaker"

    await core.handle(say("/edit smiling"))
    [(_, edited, edit_ref)] = await answer(pump, rec, 1)
    assert edited.ok and edited.text == "edited: smiling"
    reply = await core.react_emoji("web", "web:alice", edit_ref, "🔥")
    assert reply.text.startswith("making the edit stronger: ")
    [(_, stronger, stronger_ref)] = await answer(pump, rec, 1)
    assert stronger.ok and stronger.text == "smiling x1.50 (edit strength)" and stronger.payload != edited.payload
    await core.react_emoji("web", "web:alice", stronger_ref, "🔥")
    [(_, twice, _)] = await answer(pump, rec, 1)
    assert twice.text == "smiling x2.25 (edit strength)"

    # redo: the same /edit again, on the current face
    reply = await core.react_emoji("web", "web:alice", edit_ref, "🔁")
    assert reply.text.startswith("editing your face: ")
    [(_, again, _)] = await answer(pump, rec, 1)
    assert again.ok and again.text == "edited: smiling"

    # strangers, unknown messages, emoji that mean nothing
    assert (await core.react_emoji("web", "web:bob", edit_ref, "🔥")).text == \
        "only the person who asked for a result can rerun it"
    assert (await core.react_emoji("web", "web:alice", "m999", "🔥")).text == \
        "that message is not one of my results, or it has expired"
    assert await core.react_emoji("web", "web:alice", edit_ref, "🍌") is None


async def test_refine_after_forget_is_refused_and_nothing_is_posted_to_a_forgotten_user(stack):
    rec = Recorder()
    pump = EventPump(stack.core, rec)
    await stack.queue.ensure_groups(adapters=("web",))
    await stack.core.handle(say("/invert", photo=OBAMA))
    [(_, face, ref)] = await answer(pump, rec, 1)
    assert (await stack.core.handle(say("/forget"))).text.startswith("done: deleted everything")
    reply = await stack.core.react_emoji("web", "web:alice", ref, "👌")  # the link from message to result went too
    assert reply.text == "that message is not one of my results, or it has expired"
    keys = [k async for k in stack.client.scan_iter(match=f"{stack.keys.user('web:alice')}*")]
    assert keys == []


class PreviewRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.previews: list[bytes] = []

    async def show_progress(self, origin: Origin, text: str, preview: bytes | None) -> None:
        await super().show_progress(origin, text, preview)
        if preview and preview not in self.previews:
            self.previews.append(preview)


async def test_previews_reach_the_chat_even_when_progress_edits_are_throttled(client):
    """Chat platforms rate-limit edits, so progress is throttled (here to one edit a minute); the previews the
    engine sends every few steps must still be shown: they are how a long job shows the face taking shape."""
    from bot.config import ChatConfig
    from conftest import Stack

    stack = Stack(client, chat=ChatConfig(progress_interval_s=60.0), invert_steps=40)
    await stack.start_engine()
    try:
        rec = PreviewRecorder()
        pump = EventPump(stack.core, rec)
        await stack.queue.ensure_groups(adapters=("web",))
        await pump.subscribe()
        ack = await stack.core.handle(say("/invert", photo=OBAMA))
        await stack.core.set_status_message("web:alice", ack.job_id, "status-1")
        [(_, face, _)] = await answer(pump, rec, 1)
        assert face.ok and face.actions == ("refine", "redo") and face.model == "tiny"
        assert face.shows == "face"
        crop = await stack.core.aligned_crop("web:alice", face.result_id)  # the crop the web shows beside it
        assert crop[:2] == b"\xff\xd8"  # JPEG quality 95: a quarter of a PNG's bytes in Redis
        texts = [text for _, text in rec.progress]
        assert re.match(r"finding your face: (started|step \d+ of 40)", texts[0])  # the newest at first read
        assert re.fullmatch(r"finding your face: step \d+ of 40.*", texts[-1])  # the final step may come with the face
        # previews at steps 10, 20 and 30 (preview_every=10), each a 64 px JPEG, shown despite the throttle
        assert len(rec.previews) == 3, texts
        assert all(p[:2] == b"\xff\xd8" for p in rec.previews)
        assert any(re.fullmatch(r"finding your face: step \d+ of 40, about \d+ s left", t) for t in texts), texts
    finally:
        await stack.close()


async def test_progress_read_together_with_its_result_is_acknowledged_and_never_shown_after_it(stack):
    """A front end that was busy reads a job's progress and its result in one go: at most the last step is shown,
    before the result; nothing is shown after it, and nothing of it stays in Redis."""
    rec = Recorder()
    pump = EventPump(stack.core, rec)
    await stack.queue.ensure_groups(adapters=("web",))
    await pump.subscribe()  # the progress waits, unread, beside the result
    ack = await stack.core.handle(say("/invert", photo=OBAMA))
    for _ in range(600):  # let the engine finish before the front end reads anything
        if await stack.client.exists(stack.keys.done(ack.job_id)):
            break
        await asyncio.sleep(0.1)
    await pump.step(block_ms=200)
    assert [r.job_id for _, r, _ in rec.results] == [ack.job_id]
    assert [text for _, text in rec.progress] in ([], ["finding your face: step 20 of 20"])  # the last, before it
    shown = len(rec.progress)
    await pump.step(block_ms=200)
    assert len(rec.progress) == shown  # nothing after the result
    pending = await stack.client.xpending(stack.keys.results("web"), "adapter")
    assert pending["pending"] == 0 and await stack.client.xlen(stack.keys.results("web")) == 0
