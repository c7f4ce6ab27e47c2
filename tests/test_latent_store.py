"""Per-user latents on a real Redis: round trips, TTLs, consent, and /forget leaving nothing behind."""

from __future__ import annotations

import uuid

import numpy as np
import pytest_asyncio

from storage.keys import Keys
from storage.queue import JobQueue
from storage.latents import LatentStore, StoredLatent


@pytest_asyncio.fixture
async def store(client):
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    yield LatentStore(client, keys, latent_ttl_s=100, result_ttl_s=50)
    async for key in client.scan_iter(match=f"{keys.prefix}*"):
        await client.delete(key)


async def test_face_latent_round_trip_with_ttl(store):
    ws = np.random.default_rng(0).standard_normal((18, 512)).astype(np.float32)
    await store.set_face("alice", StoredLatent(ws, "ffhq-1024", meta={"psnr": 31.5}))
    back = await store.face("alice")
    assert np.array_equal(back.ws, ws) and back.model_id == "ffhq-1024" and back.meta == {"psnr": 31.5}
    assert 0 < await store.r.ttl(store.keys.latent("alice")) <= 100
    assert await store.face("bob") is None


async def test_result_latents_keep_the_edit_start(store):
    w0 = np.zeros((8, 64), np.float32)
    w = np.ones((8, 64), np.float32)
    await store.set_result("alice", "r1", StoredLatent(w, "tiny", meta={"prompt": "angry"}, w0=w0))
    back = await store.result("alice", "r1")
    assert np.array_equal(back.w0, w0) and np.array_equal(back.ws, w) and back.meta["prompt"] == "angry"
    assert 0 < await store.r.ttl(store.keys.result_latent("alice", "r1")) <= 50


async def test_share_and_forget_everything(store):
    await store.set_face("alice", StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
    await store.set_result("alice", "r1", StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
    await store.share("alice", True)
    await store.set_face("bob", StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
    assert await store.is_shared("alice") and not await store.is_shared("bob")
    queue = JobQueue(store.r, store.keys)
    assert await queue.forget("alice", "web") == (4, 0)  # face, result, consent, the index of her keys; no jobs
    left = [k async for k in store.r.scan_iter(match=f"{store.keys.prefix}*alice*")]
    assert left == []
    assert await store.face("bob") is not None  # only alice's keys went
