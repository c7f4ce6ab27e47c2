"""The continuous-batching pool: a row alone is exactly `invert()` / `edit()`; rows that join and leave mid-way
end where their lone runs end (within the rounding of sums over another batch size); a broken row leaves alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.edit import edit
from engine.invert import invert
from engine.perceptual import load_vgg16
from engine.registry import build_builtin, registry_entries
from engine.pool import OptimisationPool


def run(pool: OptimisationPool, joins: dict[str, tuple[int, callable]]) -> dict:
    """Tick until every row is done; `joins`: key -> (tick at which it joins, how it joins)."""
    out, tick = {}, 0
    while len(out) < len(joins):
        for key, (at, add) in joins.items():
            if at == tick:
                add(key)
        for done in pool.tick().finished:
            out[done.key] = done
        tick += 1
    return out


def test_a_row_alone_is_exactly_invert_and_edit(G, vgg, clip, faces):
    """Same losses, same schedule, same Adam (RowAdam is torch's Adam bit for bit): equal to the last bit."""
    ws, images = faces
    pool = OptimisationPool(G, vgg=vgg, clip=clip)
    [got] = run(pool, {"a": (0, lambda k: pool.add_inversion(k, images[0], steps=12))}).values()
    ref = invert(G, vgg, images[:1], steps=12)
    assert torch.equal(got.ws, ref.ws[0]) and np.array_equal(got.image, ref.images[0])
    assert np.array_equal(got.losses, ref.losses[:, 0]) and got.psnr == ref.psnr[0]

    [got] = run(pool, {"e": (0, lambda k: pool.add_edit(k, ws[1], "a smiling face", steps=12))}).values()
    ref = edit(G, clip, ws[1:2], "a smiling face", steps=12)
    assert torch.equal(got.ws, ref.ws[0]) and np.array_equal(got.image, ref.images[0])
    assert got.similarity == pytest.approx(ref.similarity[0], abs=1e-6)


def test_rows_joining_and_leaving_end_where_they_would_alone(G, vgg, clip, faces):
    """An inversion runs 6 steps while another inversion joins at tick 2 and an edit joins at 1 and leaves at 4.
    Each ends where it ends alone, to within 1e-3 of the distance it moved: float32 sums over another batch size
    round differently (~1e-7), and Adam's per-coordinate normalisation amplifies that with steps (test_invert.py
    measured ~1e-6 of the distance after 5 steps); mixing rows up would be of the order of the distance itself."""
    ws, images = faces
    pool = OptimisationPool(G, vgg=vgg, clip=clip)
    got = run(pool, {
        "a": (0, lambda k: pool.add_inversion(k, images[0], steps=6)),
        "e": (1, lambda k: pool.add_edit(k, ws[2], "an angry face", steps=3)),
        "b": (2, lambda k: pool.add_inversion(k, images[1], steps=5)),
    })
    alone = {"a": invert(G, vgg, images[:1], steps=6).ws[0], "b": invert(G, vgg, images[1:2], steps=5).ws[0],
             "e": edit(G, clip, ws[2:3], "an angry face", steps=3).ws[0]}
    starts = {"a": 0, "b": 0, "e": ws[2]}  # the default inversion recipe (the seed's) starts from zeros
    for key in "abe":
        moved = (alone[key] - starts[key]).norm()
        assert moved > 0 and (got[key].ws - alone[key]).norm() < 1e-3 * moved, key
    assert [got[k].steps for k in "abe"] == [6, 5, 3] and len(pool) == 0


def test_a_row_that_blows_up_leaves_alone_and_the_others_carry_on(G, vgg, clip, faces):
    ws, images = faces
    pool = OptimisationPool(G, vgg=vgg, clip=clip)
    bad = ws[0].clone()
    bad[2, 5] = float("inf")
    got = run(pool, {"good": (0, lambda k: pool.add_inversion(k, images[0], steps=4)),
                     "bad": (0, lambda k: pool.add_edit(k, bad, "a face", steps=4))})
    assert got["bad"].error and got["bad"].steps == 1 and got["bad"].ws is None
    assert got["good"].error is None and got["good"].steps == 4
    ref = invert(G, vgg, images[:1], steps=4).ws[0]
    assert (got["good"].ws - ref).norm() < 1e-3 * ref.norm()  # it moved from zeros by ref.norm()


def test_previews_and_progress_per_row(G, vgg, clip, faces):
    _, images = faces
    pool = OptimisationPool(G, vgg=vgg, clip=clip, preview_every=2)
    pool.add_inversion("a", images[0], steps=5)
    reports = [pool.tick() for _ in range(5)]
    assert [r.progress[0][1:3] for r in reports] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert [(p[1], p[3].shape) for r in reports for p in r.previews] == [(2, (32, 32, 3)), (4, (32, 32, 3))]
    assert reports[-1].finished[0].key == "a" and len(pool) == 0


async def test_a_long_morph_renders_between_ticks_and_makes_the_same_gif(client):
    """A 120-frame morph claimed just before a 2-step inversion: the morph is rendered 4 frames between two ticks,
    so the inversion is answered first (rendered in one go, as before, the morph was answered first); the morph's
    GIF is byte for byte the one the unchunked render (the static engine's `morph()`) gives."""
    import asyncio
    import uuid

    from conftest import FIXTURES
    from engine.morph import encode_gif, morph
    from engine.loop import Engine
    from engine.services import EngineSettings
    from storage.keys import Keys
    from storage.latents import LatentStore, StoredLatent
    from storage.queue import Job, JobQueue

    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    queue, store = JobQueue(client, keys, reclaim_idle_ms=60_000), LatentStore(client, keys)
    await queue.ensure_groups(adapters=("web",))
    G = build_builtin(registry_entries()["tiny"])
    settings = EngineSettings(name="m1", invert_steps=2, morph_chunk=4)
    engine = Engine(G, queue, store, vgg=load_vgg16(width=0.125), settings=settings)
    rng = np.random.default_rng(0)
    faces = {user: rng.standard_normal((8, 64)).astype(np.float32) for user in ("alice", "bob")}
    for user, ws in faces.items():
        await store.set_face(user, StoredLatent(ws, "tiny"))
    morph_job = Job(op="morph", user_id="alice", adapter="web", params={"a": "alice", "b": "bob", "frames": 120})
    invert_job = Job(op="invert", user_id="bob", adapter="web")
    await queue.enqueue(morph_job)
    await queue.enqueue(invert_job, photo=(FIXTURES / "faces" / "obama.jpg").read_bytes())

    stop, answers = asyncio.Event(), []
    task = asyncio.create_task(engine.run(stop))
    try:
        for _ in range(300):
            for entry_id, event in await queue.read_events("web", "web-test", block_ms=200):
                await queue.ack_event("web", entry_id)
                answers.append(event)
            if len(answers) == 2:
                break
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        async for key in client.scan_iter(match=f"{keys.prefix}*"):
            await client.delete(key)
    assert [a.job_id for a in answers] == [invert_job.job_id, morph_job.job_id]
    assert answers[0].type == "done" and "PSNR" in answers[0].text
    video = morph(G, torch.from_numpy(faces["alice"]), torch.from_numpy(faces["bob"]), frames=120)
    assert answers[1].payload == encode_gif(video, max_bytes=settings.max_upload_bytes)
