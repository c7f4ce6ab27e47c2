"""The engine against a real Redis with the tiny model: photos in, reconstructions out, bad photos answered."""

from __future__ import annotations

import asyncio
import threading
import uuid

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
import io

from conftest import FIXTURES
from engine.perceptual import load_vgg16
from engine.registry import build_builtin, registry_entries
from engine.loop import Engine
from engine.services import EngineSettings, Services
from storage.keys import Keys
from storage.latents import LatentStore
from storage.queue import Job, JobQueue
from storage.records import ProgressEvent, ResultEvent


@pytest_asyncio.fixture
async def parts(client):
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    queue = JobQueue(client, keys, reclaim_idle_ms=60_000)
    await queue.ensure_groups(adapters=("web",))
    yield queue, LatentStore(client, keys)
    async for key in client.scan_iter(match=f"{keys.prefix}*"):
        await client.delete(key)


async def _run_until_answered(engine: Engine, queue: JobQueue, n: int, timeout: float = 60,
                              progress: list | None = None) -> list[ResultEvent]:
    stop = asyncio.Event()
    sub = await queue.listen_progress("web")
    task = asyncio.create_task(engine.run(stop))
    answers: list[ResultEvent] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(answers) < n and asyncio.get_running_loop().time() < deadline:
        if progress is not None:
            progress.extend(await queue.read_progress(sub))
        for entry_id, event in await queue.read_events("web", "web-test", block_ms=200):
            await queue.ack_event("web", entry_id)
            answers.append(event)
    if progress is not None:
        progress.extend(await queue.read_progress(sub, timeout_s=0.5))
    await sub.aclose()
    stop.set()
    await asyncio.wait_for(task, 30)
    return answers


async def test_invert_jobs_get_an_image_and_bad_photos_a_reason(parts):
    queue, store = parts
    G = build_builtin(registry_entries()["tiny"])
    engine = Engine(G, queue, store, vgg=load_vgg16(width=0.125),
                    settings=EngineSettings(name="e1", invert_steps=10, progress_every=5, preview_every=4))
    obama = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (80, 80, 80)).save(buf, "PNG")
    jobs = {
        "good": Job(op="invert", user_id="alice", adapter="web"),
        "noface": Job(op="invert", user_id="bob", adapter="web"),
        "notimage": Job(op="invert", user_id="carol", adapter="web"),
    }
    await queue.enqueue(jobs["good"], photo=obama)
    await queue.enqueue(jobs["noface"], photo=buf.getvalue())
    await queue.enqueue(jobs["notimage"], photo=b"%PDF-1.4 not a photo")

    progress: list[ProgressEvent] = []
    answers = {a.job_id: a for a in await _run_until_answered(engine, queue, 3, progress=progress)}
    good = answers[jobs["good"].job_id]
    steps = [(p.step, p.total) for p in progress if p.preview is None]
    assert (5, 10) in steps and (10, 10) in steps
    previews = [p for p in progress if p.preview is not None]
    assert previews and Image.open(io.BytesIO(previews[0].preview)).size == (64, 64)
    assert good.type == "done" and "PSNR" in good.text
    assert Image.open(io.BytesIO(good.payload)).size == (32, 32)
    assert answers[jobs["noface"].job_id].error.startswith("no face found")
    assert "not an image" in answers[jobs["notimage"].job_id].error
    face = await store.face("alice")
    assert face.model_id == "tiny" and face.ws.shape == (8, 64)
    assert await store.face("bob") is None
    assert await queue.pending_count() == 0
    assert await queue.photo(jobs["good"]) is None  # input photos are kept only until the job finishes


async def test_morph_edit_and_stronger_jobs(parts):
    from engine.edit import TINY_CLIP, ClipScorer
    from storage.latents import StoredLatent

    queue, store = parts
    G = build_builtin(registry_entries()["tiny"])
    engine = Engine(G, queue, store, vgg=load_vgg16(width=0.125), clip_factory=lambda: ClipScorer(TINY_CLIP, None),
                    settings=EngineSettings(name="e2", edit_steps=5))
    rng = np.random.default_rng(0)
    for user in ("alice", "bob"):
        await store.set_face(user, StoredLatent(rng.standard_normal((8, 64)).astype(np.float32), "tiny"))
    await store.set_face("old", StoredLatent(rng.standard_normal((18, 512)).astype(np.float32), "ffhq-1024"))
    morph_job = Job(op="morph", user_id="alice", adapter="web", params={"a": "alice", "b": "bob", "frames": 4})
    stale = Job(op="morph", user_id="alice", adapter="web", params={"a": "alice", "b": "old", "frames": 4})
    edit_job = Job(op="edit", user_id="alice", adapter="web", params={"prompt": "angry"})
    nobody = Job(op="edit", user_id="carol", adapter="web", params={"prompt": "angry"})
    for job in (morph_job, stale, edit_job, nobody):
        await queue.enqueue(job)
    answers = {a.job_id: a for a in await _run_until_answered(engine, queue, 4)}
    gif = Image.open(io.BytesIO(answers[morph_job.job_id].payload))
    assert gif.format == "GIF" and gif.n_frames == 6
    assert answers[morph_job.job_id].text == "morph, 4 frames there and back (6 in the loop)"  # what the GIF holds
    assert "made with model ffhq-1024" in answers[stale.job_id].error
    assert answers[nobody.job_id].error == "there is no face for you yet: send a photo with /invert first"
    assert answers[edit_job.job_id].result_id == edit_job.job_id

    stronger = Job(op="restyle", user_id="alice", adapter="web", params={"result_id": edit_job.job_id, "factor": 1.5})
    await queue.enqueue(stronger)
    answer = (await _run_until_answered(engine, queue, 1))[0]
    assert answer.type == "done" and "x1.50" in answer.text
    edited, strong = await store.result("alice", edit_job.job_id), await store.result("alice", stronger.job_id)
    assert np.allclose(strong.ws - strong.w0, 1.5 * (edited.ws - edited.w0), atol=1e-5)


async def test_a_latent_with_nan_is_never_stored_nor_rendered(parts, client):
    """A damaged latent in Redis (NaN) is refused with a reason, not rendered black; storing one is refused."""
    import pytest

    from storage.latents import NonFiniteLatent, StoredLatent, _pack

    queue, store = parts
    G = build_builtin(registry_entries()["tiny"])
    engine = Engine(G, queue, store, vgg=load_vgg16(width=0.125), settings=EngineSettings(name="e3"))
    good = np.zeros((8, 64), np.float32)
    await store.set_face("bob", StoredLatent(good, "tiny"))
    bad = good.copy()
    bad[3, 7] = np.nan
    with pytest.raises(NonFiniteLatent):
        await store.set_face("alice", StoredLatent(bad, "tiny"))
    # written behind our back (an older version, a hand edit): the engine reads it and refuses it
    await client.hset(store.keys.latent("alice"), mapping={**_pack(StoredLatent(good, "tiny")),
                                                            "ws": bad.astype("<f4").tobytes()})
    morph = Job(op="morph", user_id="bob", adapter="web", params={"a": "bob", "b": "alice", "frames": 4,
                                                                 "names": {"alice": "@alice"}})
    await queue.enqueue(morph)
    [answer] = await _run_until_answered(engine, queue, 1)
    assert answer.type == "failed"
    assert answer.error == ("the stored face of @alice is damaged (it holds invalid numbers): "
                            "send the photo again with /invert")
    assert await store.result("bob", morph.job_id) is None


async def test_continuous_engine_fails_a_bad_photo_alone_and_answers_stronger_while_faces_are_found(parts):
    """Three good photos sent in the same moment as a 1x4000 px PNG: that one is refused alone, at once, and the
    three good ones are answered with faces; a "stronger" sent while the inversions run is answered before any of
    them finishes (it runs between ticks, not after the pool)."""
    from storage.latents import StoredLatent

    queue, store = parts
    G = build_builtin(registry_entries()["tiny"])
    engine = Engine(G, queue, store, vgg=load_vgg16(width=0.125),
                    settings=EngineSettings(name="e4", invert_steps=100, progress_every=50, preview_every=100))
    obama = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    thin = io.BytesIO()
    Image.new("RGB", (1, 4000)).save(thin, "PNG")
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((8, 64)).astype(np.float32)
    await store.set_result("dora", "edit1", StoredLatent(w0 + 0.1, "tiny", meta={"op": "edit", "prompt": "angry"},
                                                         w0=w0))
    good = [Job(op="invert", user_id=f"user{i}", adapter="web") for i in range(3)]
    bad = Job(op="invert", user_id="mallory", adapter="web")
    await asyncio.gather(*(queue.enqueue(j, photo=obama) for j in good), queue.enqueue(bad, photo=thin.getvalue()))

    stop = asyncio.Event()
    sub = await queue.listen_progress("web")
    task = asyncio.create_task(engine.run(stop))
    order: list[str] = []
    answers: dict[str, ResultEvent] = {}
    stronger = Job(op="restyle", user_id="dora", adapter="web", params={"result_id": "edit1", "factor": 1.5})
    sent_stronger = False
    deadline = asyncio.get_running_loop().time() + 120
    while len(answers) < 5 and asyncio.get_running_loop().time() < deadline:
        if not sent_stronger and any(e.step > 0 for e in await queue.read_progress(sub)):
            await queue.enqueue(stronger)  # the inversions are running now
            sent_stronger = True
        for entry_id, event in await queue.read_events("web", "web-test", block_ms=100):
            await queue.ack_event("web", entry_id)
            answers[event.job_id] = event
            order.append(event.job_id)
    await sub.aclose()
    stop.set()
    await asyncio.wait_for(task, 60)
    assert answers[bad.job_id].type == "failed" and "1x4000 pixels, too small" in answers[bad.job_id].error
    assert order[0] == bad.job_id  # refused at once, not after the others' work
    assert all(answers[j.job_id].type == "done" and answers[j.job_id].shows == "face" for j in good)
    assert answers[stronger.job_id].type == "done" and "x1.50" in answers[stronger.job_id].text
    assert order.index(stronger.job_id) < min(order.index(j.job_id) for j in good)
    assert engine.claimed == {}  # every job this engine took was answered


async def test_a_stronger_is_answered_while_a_tick_is_still_running(parts, monkeypatch):
    """A tick of a big model on a CPU takes seconds: a stronger claimed during one is rendered beside it, not after
    it. The first tick is held (a gate before the real tick) until the stronger has been answered."""
    from engine.pool import OptimisationPool
    from storage.latents import StoredLatent

    queue, store = parts
    real_tick, gate, entered = OptimisationPool.tick, threading.Event(), threading.Event()

    def held_tick(pool):
        entered.set()
        gate.wait(60)
        return real_tick(pool)

    monkeypatch.setattr(OptimisationPool, "tick", held_tick)
    engine = Engine(build_builtin(registry_entries()["tiny"]), queue, store, vgg=load_vgg16(width=0.125),
                    settings=EngineSettings(name="e5", invert_steps=5))
    w0 = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    await store.set_result("dora", "edit1", StoredLatent(w0 + 0.1, "tiny", meta={"op": "edit", "prompt": "angry"},
                                                         w0=w0))
    face = Job(op="invert", user_id="ann", adapter="web")
    await queue.enqueue(face, photo=(FIXTURES / "faces" / "obama.jpg").read_bytes())
    answers: dict[str, ResultEvent] = {}

    async def read_until(job: Job, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while job.job_id not in answers and asyncio.get_running_loop().time() < deadline:
            for entry_id, event in await queue.read_events("web", "web-test", block_ms=100):
                await queue.ack_event("web", entry_id)
                answers[event.job_id] = event

    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        assert await asyncio.to_thread(entered.wait, 60)  # the inversion's first tick has begun, and waits
        stronger = Job(op="restyle", user_id="dora", adapter="web", params={"result_id": "edit1", "factor": 1.5})
        await queue.enqueue(stronger)
        await read_until(stronger, 30)
        assert stronger.job_id in answers and answers[stronger.job_id].type == "done"  # the first tick still held
        assert face.job_id not in answers
    finally:
        gate.set()
    await read_until(face, 60)
    stop.set()
    await asyncio.wait_for(task, 60)
    assert answers[face.job_id].type == "done"


async def test_stopping_finishes_what_ends_within_drain_s_and_leaves_the_rest_claimable(parts, client):
    """SIGTERM mid-job: with drain_s 0 the inversion is left unacknowledged (another engine takes it over), with
    a generous drain_s it is finished first."""
    queue, store = parts
    G = build_builtin(registry_entries()["tiny"])
    obama = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    for drain_s, finished in ((0.0, False), (120.0, True)):
        engine = Engine(G, queue, store, vgg=load_vgg16(width=0.125),
                        settings=EngineSettings(name=f"drain{drain_s}", invert_steps=200, drain_s=drain_s))
        job = Job(op="invert", user_id="erin", adapter="web")
        await queue.enqueue(job, photo=obama)
        stop = asyncio.Event()
        sub = await queue.listen_progress("web")
        task = asyncio.create_task(engine.run(stop))
        running = False
        while not running:
            running = any(e.job_id == job.job_id and e.step > 0 for e in await queue.read_progress(sub, 0.1))
        await sub.aclose()
        stop.set()
        await asyncio.wait_for(task, 60)
        assert bool(await client.exists(queue.keys.done(job.job_id))) is finished
        pending = await client.xpending_range(queue.keys.jobs, "engines", min="-", max="+", count=10)
        assert len(pending) == (0 if finished else 1)  # unfinished: still pending, for another engine to take
        if not finished:  # leave the queue clean for the next round
            await client.xack(queue.keys.jobs, "engines", pending[0]["message_id"])


async def test_a_photo_being_aligned_does_not_hold_back_the_inversions_in_flight(parts, monkeypatch):
    """dlib takes a good part of a second per photo on a CPU: the continuous engine aligns a newcomer's photo beside
    its ticks, so a face already being found goes on and is answered while that photo is still being aligned (here
    held back until the first face is answered; an engine that waited for the alignment would never answer it)."""
    import threading

    import engine.handlers.invert as wk

    queue, store = parts
    obama = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    slow_photo = obama + b"\0"  # the same face; this copy's alignment waits for the gate
    gate, real = threading.Event(), wk.align_photo

    def align(photo, resolution):
        if photo == slow_photo:
            assert gate.wait(30), "the first face was never answered while this photo was being aligned"
        return real(photo, resolution)

    monkeypatch.setattr(wk, "align_photo", align)
    engine = Engine(build_builtin(registry_entries()["tiny"]), queue, store, vgg=load_vgg16(width=0.125),
                    settings=EngineSettings(name="e1", invert_steps=60, progress_every=5))
    first, second = Job(op="invert", user_id="alice", adapter="web"), Job(op="invert", user_id="bob", adapter="web")
    await queue.enqueue(first, photo=obama)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    sub = await queue.listen_progress("web")
    while not any(p.job_id == first.job_id and p.step >= 5
                  for p in await queue.read_progress(sub, timeout_s=0.2)):
        pass  # the first face is being found
    await queue.enqueue(second, photo=slow_photo)
    answers: list[ResultEvent] = []
    try:
        async with asyncio.timeout(60):
            while len(answers) < 2:
                for entry_id, event in await queue.read_events("web", "web-test", block_ms=200):
                    await queue.ack_event("web", entry_id)
                    answers.append(event)
                    gate.set()  # the first answer is in: let the second photo's alignment end
    finally:
        gate.set()
        await sub.aclose()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [a.job_id for a in answers] == [first.job_id, second.job_id]
    assert all(a.type == "done" for a in answers), answers


def test_without_overrides_an_engine_runs_the_default_recipes_cpu_preset(G):
    """No `invert_steps`: an inversion on a CPU runs the seed recipe's CPU preset, a refine half of it, a redo all
    of it; an edit refine half of StyleCLIP's 300 steps."""
    from types import SimpleNamespace

    from engine.invert import CPU_STEPS

    services = Services(G, SimpleNamespace(), None, vgg=None)
    assert services.invert_steps() == CPU_STEPS == 750
    assert (services.refine_steps("invert"), services.refine_steps("invert", restart=True)) == (375, 750)
    assert services.refine_steps("edit") == 150
