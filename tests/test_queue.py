"""The job queue on a real Redis: nothing lost, nothing posted twice, dead engines' jobs taken over."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest_asyncio

from storage.keys import Keys
from storage.queue import Job, JobQueue
from storage.records import ResultEvent


@pytest_asyncio.fixture
async def queue(client):
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    q = JobQueue(client, keys, max_deliveries=2, reclaim_idle_ms=50)
    await q.ensure_groups(adapters=("web",))
    yield q
    async for key in client.scan_iter(match=f"{keys.prefix}*"):
        await client.delete(key)


async def test_a_job_is_answered_once_and_its_photo_dropped(queue):
    job = Job(op="invert", user_id="u1", adapter="web", params={"steps": 5})
    assert await queue.enqueue(job, photo=b"jpeg bytes") == 1
    jobs, exhausted = await queue.claim("engine-a", count=8, block_ms=100)
    assert [j.job_id for j in jobs] == [job.job_id] and not exhausted
    assert await queue.photo(jobs[0]) == b"jpeg bytes"
    assert await queue.finish(jobs[0], ResultEvent.done(jobs[0], "here is your face")) == 1
    assert await queue.photo(jobs[0]) is None
    events = await queue.read_events("web", "web-1", block_ms=100)
    assert [(e.job_id, e.type, e.text) for _, e in events] == [(job.job_id, "done", "here is your face")]
    for entry_id, _ in events:
        await queue.ack_event("web", entry_id)
    assert await queue.read_events("web", "web-1", block_ms=50) == []
    assert await queue.pending_count() == 0


async def test_a_dead_engines_job_is_reclaimed_and_posted_once(queue):
    job = Job(op="invert", user_id="u1", adapter="web")
    await queue.enqueue(job)
    taken, _ = await queue.claim("engine-a", count=1, block_ms=100)  # engine-a dies without acknowledging
    await asyncio.sleep(0.1)
    again, _ = await queue.claim("engine-b", count=1, block_ms=100)
    assert [j.job_id for j in again] == [job.job_id] and again[0].deliveries == 2
    assert await queue.finish(again[0], ResultEvent.done(again[0], "b")) == 1
    assert await queue.finish(taken[0], ResultEvent.done(taken[0], "a, late")) == 0  # the zombie's is not posted
    events = await queue.read_events("web", "web-1", block_ms=100)
    assert [e.text for _, e in events] == ["b"]


async def test_a_job_delivered_too_often_fails_with_a_reason(queue):
    job = Job(op="invert", user_id="u1", adapter="web")
    await queue.enqueue(job)
    for consumer in ("a", "b"):
        await queue.claim(consumer, count=1, block_ms=100)
        await asyncio.sleep(0.1)
    jobs, exhausted = await queue.claim("c", count=1, block_ms=100)
    assert not jobs and [j.job_id for j in exhausted] == [job.job_id]
    await queue.fail(exhausted[0], "this job crashed the engine 3 times; try another photo")
    events = await queue.read_events("web", "web-1", block_ms=100)
    assert events[0][1].type == "failed" and "crashed the engine" in events[0][1].error
    assert await queue.pending_count() == 0


async def test_a_restarted_adapter_still_gets_what_finished_while_it_was_down(queue):
    job = Job(op="edit", user_id="u2", adapter="web")
    await queue.enqueue(job)
    jobs, _ = await queue.claim("engine", count=1, block_ms=100)
    await queue.finish(jobs[0], ResultEvent.done(jobs[0], "edited"))
    first = await queue.read_events("web", "web-1", block_ms=100)  # read, then the adapter crashes before posting
    assert [e.type for _, e in first] == ["done"]
    again = await queue.read_events("web", "web-1", block_ms=100)  # restarted: its unacknowledged events come back
    assert [e.type for _, e in again] == ["done"]


async def test_progress_is_published_never_stored(queue):
    """Progress (with its face preview) goes to whoever listens and leaves nothing in Redis."""
    job = Job(op="invert", user_id="u3", adapter="web")
    await queue.enqueue(job)
    jobs, _ = await queue.claim("engine", count=1, block_ms=100)
    sub = await queue.listen_progress("web")
    await queue.progress(jobs[0], 5, 10, preview=b"\xff\xd8 jpeg", eta_s=2.25)
    events = await queue.read_progress(sub, timeout_s=2)
    assert [(e.step, e.total, e.preview, e.eta_s) for e in events] == [(5, 10, b"\xff\xd8 jpeg", 2.2)]
    assert await queue.r.xlen(queue.keys.results("web")) == 0
    await sub.aclose()


async def test_a_damaged_result_entry_is_skipped_not_fatal(queue):
    """An entry without an event (a foreign writer, a damaged stream) is logged, acknowledged and skipped; the
    results behind it still arrive."""
    await queue.ensure_groups(adapters=("web",))
    await queue.r.xadd(queue.keys.results("web"), {"junk": "1"})
    job = Job(op="edit", user_id="u4", adapter="web")
    await queue.enqueue(job)
    jobs, _ = await queue.claim("engine", count=1, block_ms=100)
    await queue.finish(jobs[0], ResultEvent.done(jobs[0], "edited"))
    events = await queue.read_events("web", "web-1", block_ms=100)
    assert [e.text for _, e in events] == ["edited"]


async def test_queue_position_counts_waiting_and_running_jobs(queue):
    positions = [await queue.enqueue(Job(op="invert", user_id=f"u{i}", adapter="web")) for i in range(3)]
    assert positions == [1, 2, 3]
    await queue.claim("engine", count=1, block_ms=100)
    assert await queue.pending_count() == 3


async def test_a_result_comes_back_as_it_was_stored(queue):
    """What the engine says about a result (what it shows, its image, whom it names) reaches the adapter whole."""
    job = Job(op="morph", user_id="u5", adapter="web")
    await queue.enqueue(job)
    [claimed], _ = await queue.claim("engine", count=1, block_ms=100)
    sent = ResultEvent.done(claimed, "morph, 4 frames", media="animation", shows="morph", result_id=job.job_id,
                            model="tiny", engine="engine", payload=b"GIF89a frames")
    assert await queue.finish(claimed, sent) == 1
    [(_, event)] = await queue.read_events("web", "web-1", block_ms=100)
    assert event == sent and event.epoch  # the user's epoch at admission, for the message link


async def test_a_result_stored_by_the_previous_version_is_still_posted(queue):
    """Results wait up to a day to be posted: one stored before `media` and `shows` (its `kind` and `result_kind`)
    reads as the same result."""
    old = {"job_id": "j1", "user_id": "u6", "engine": "e", "epoch": "", "type": "done", "model": "tiny",
           "text": "edited", "kind": "image", "result_id": "j1", "result_kind": "edit"}
    await queue.r.hset(queue.keys.result_data("j1"), mapping={"event": json.dumps(old), "payload": b"png"})
    await queue.r.xadd(queue.keys.results("web"), {"ref": "j1"})
    [(_, event)] = await queue.read_events("web", "web-1", block_ms=100)
    assert (event.media, event.shows, event.text, event.payload) == ("image", "edit", "edited", b"png")


async def test_the_heartbeat_says_whether_the_model_has_random_weights(queue):
    """The web chat warns that a built-in model's faces look like nothing: the engine's heartbeat tells it."""
    await queue.beat("e1", "tiny", 30, random_weights=True)
    await queue.beat("e2", "ffhq-1024", 30)
    assert await queue.engines_online() == {"e1": "tiny", "e2": "ffhq-1024"}
    assert await queue.random_weights("e1") and not await queue.random_weights("e2")
    await queue.leave("e1")
    assert not await queue.random_weights("e1")
