"""The engine worker against a real Redis with the tiny model: photos in, reconstructions out, bad photos answered."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest_asyncio
from PIL import Image
import io

from conftest import FIXTURES
from engine.perceptual import load_vgg16
from engine.registry import build_builtin, registry_entries
from engine.worker import Worker, WorkerSettings
from storage.keys import Keys
from storage.latents import LatentStore
from storage.queue import Job, JobQueue


@pytest_asyncio.fixture
async def parts(client):
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    queue = JobQueue(client, keys, reclaim_idle_ms=60_000)
    await queue.ensure_groups(adapters=("web",))
    yield queue, LatentStore(client, keys)
    async for key in client.scan_iter(match=f"{keys.prefix}*"):
        await client.delete(key)


async def _run_until_answered(worker: Worker, queue: JobQueue, n: int, timeout: float = 60) -> list[dict]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    answers: list[dict] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(answers) < n and asyncio.get_running_loop().time() < deadline:
        for entry_id, event in await queue.read_events("web", "web-test", block_ms=200):
            await queue.ack_event("web", entry_id)
            if event["type"] != "progress":
                answers.append(event)
    stop.set()
    await asyncio.wait_for(task, 30)
    return answers


async def test_invert_jobs_get_an_image_and_bad_photos_a_reason(parts):
    queue, store = parts
    G = build_builtin(registry_entries()["tiny"])
    worker = Worker(G, queue, store, vgg=load_vgg16(width=0.125),
                    settings=WorkerSettings(name="e1", invert_steps=10, progress_every=5))
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

    answers = {a["job_id"]: a for a in await _run_until_answered(worker, queue, 3)}
    good = answers[jobs["good"].job_id]
    assert good["type"] == "done" and "PSNR" in good["text"]
    assert Image.open(io.BytesIO(good["payload"])).size == (32, 32)
    assert answers[jobs["noface"].job_id]["error"].startswith("no face found")
    assert "not an image" in answers[jobs["notimage"].job_id]["error"]
    face = await store.face("alice")
    assert face.model_id == "tiny" and face.ws.shape == (8, 64)
    assert await store.face("bob") is None
    assert await queue.pending_count() == 0
    assert await queue.photo(jobs["good"]) is None  # input photos are kept only until the job finishes
