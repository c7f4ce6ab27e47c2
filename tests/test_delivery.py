"""Every answer delivered whatever fails, against the real Redis and a running tiny engine: Redis that comes back
without its data, an engine started before Redis, a result stored while its user's quota is released in the same
step."""

from __future__ import annotations

import asyncio

from adapters.base import EventPump
from bot.core import Command
from conftest import FIXTURES, Stack
from conftest import ResultRecorder as Recorder
from storage.queue import Job, JobQueue
from storage.records import Origin, ResultEvent

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()


def say(text: str, user: str = "alice", photo: bytes | None = None) -> Command:
    return Command("web", f"web:{user}", user, text, photo=photo, origin=Origin(user=user))


async def answered(pump: EventPump, rec: Recorder, n: int, timeout: float = 120) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(rec.results) < n:
        assert asyncio.get_running_loop().time() < deadline, "no answer"
        await pump.step(block_ms=200)


async def test_redis_back_without_its_data_under_a_running_system(client):
    """Every key is gone (a Redis restarted without persistence, or flushed) while the engine and the front end
    run: both make their groups again, and the next command is answered."""
    stack = Stack(client)
    await stack.start_engine()
    try:
        rec = Recorder()
        pump = EventPump(stack.core, rec)
        await stack.queue.ensure_groups(adapters=("web",))
        await stack.core.handle(say("/invert", photo=OBAMA))
        await answered(pump, rec, 1)
        async for key in client.scan_iter(match=f"{stack.keys.prefix}*"):  # the whole deployment's data
            await client.delete(key)
        await pump.step(block_ms=100)  # the front end notices first: no group on its results stream
        reply = await stack.core.handle(say("/invert", photo=OBAMA))
        assert reply.job_id
        await answered(pump, rec, 2)
        assert rec.results[-1].ok and rec.results[-1].job_id == reply.job_id
    finally:
        await stack.close()


async def test_an_engine_started_before_redis_waits_for_it(client, unused_tcp_port):
    """No Redis at the engine's address yet: it waits (no exit) and stops cleanly when told to."""
    from storage.connect import connect
    from storage.keys import Keys
    from storage.latents import LatentStore
    from storage.queue import JobQueue

    stack = Stack(client)
    absent = connect(f"redis://127.0.0.1:{unused_tcp_port}/0", pool_timeout_s=1)
    engine = stack.engine
    engine.s.queue = JobQueue(absent, Keys("nowhere:"))
    engine.s.store = LatentStore(absent, Keys("nowhere:"))
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    await asyncio.sleep(3)
    assert not task.done()  # still waiting, not crashed
    stop.set()
    await asyncio.wait_for(task, 30)
    await absent.aclose()
    await stack.close()


async def test_the_quota_place_is_released_in_the_step_that_stores_the_result(client):
    """The user's unfinished-jobs entry goes in the same atomic step as the result is stored: an engine killed
    right after storing cannot leave the user locked out of their places."""
    stack = Stack(client)
    try:
        await stack.queue.ensure_groups(adapters=("web",))
        job = Job(op="edit", user_id="web:alice", adapter="web")
        await stack.queue.enqueue(job)
        assert await client.hlen(stack.keys.user_jobs("web:alice")) == 1
        assert 0 < await client.ttl(stack.keys.user_jobs("web:alice"))  # and a safety TTL, whatever happens
        [claimed], _ = await stack.queue.claim("engine", 1, block_ms=100)
        assert await stack.queue.finish(claimed, ResultEvent.done(claimed, "edited")) == 1
        assert await client.hlen(stack.keys.user_jobs("web:alice")) == 0  # nothing after finish() was needed
    finally:
        await stack.close()


async def test_the_jobs_of_an_engine_whose_heartbeat_expired_are_taken_at_once(client):
    """An engine dies holding a job: as soon as its heartbeat expires another engine takes the job, without
    waiting for the queue's reclaim time (60 s here); a live engine's jobs are left alone."""
    stack = Stack(client)
    try:
        queue = stack.queue
        queue.takeover_every_s = 0
        await queue.ensure_groups()
        await queue.enqueue(Job(op="edit", user_id="web:alice", adapter="web"))
        await queue.beat("doomed", "tiny", 1.0)
        await queue.beat("other", "tiny", 30)
        [held], _ = await queue.claim("doomed", 1, block_ms=100)
        assert await queue.claim("other", 1, block_ms=100) == ([], [])  # doomed is alive: its job stays
        await asyncio.sleep(1.2)  # doomed was SIGKILLed: its heartbeat runs out
        [taken], _ = await queue.claim("other", 1, block_ms=100)
        assert taken.job_id == held.job_id and taken.deliveries == 2
    finally:
        await stack.close()


async def test_an_engine_death_is_charged_only_to_a_job_that_ran_alone(client):
    """Engines die (no clean-up, as under SIGKILL) while one job runs beside another and a third is merely held: the
    held job is judged nothing however often it is handed out again (a resume under the same name included), the two
    running ones become suspects (each death beside others counted once), and a suspect is failed, in one line
    naming its own fault, only after two deaths while it ran alone."""
    from engine.loop import given_up

    stack = Stack(client)
    try:
        queue = stack.queue
        queue.reclaim_idle_ms = 0
        await queue.ensure_groups()
        jobs = [Job(op="edit", user_id=f"web:u{i}", adapter="web") for i in range(3)]
        for job in jobs:
            await queue.enqueue(job)
        held, _ = await queue.claim("e1", 3, block_ms=100)
        await queue.running(held[:2], alone=False)  # e1 dies running two; the third waits, claimed
        for restart in range(6):  # e1 restarted under its name each time and dying again: a resume is no delivery
            queue._resumed.discard("e1")
            again, exhausted = await queue.claim("e1", 3, block_ms=100)
            assert not exhausted and [j.job_id for j in again] == [j.job_id for j in jobs]
            assert [j.suspect for j in again] == [1, 1, 0] and not any(j.faults for j in again)
        bystander, culprit = again[0], again[1]
        for death in (1, 2):  # the culprit, run alone, kills its engine twice
            await queue.running([culprit], alone=True)
            queue._resumed.discard("e1")
            again, exhausted = await queue.claim("e1", 3, block_ms=100)
            if death == 1:
                assert not exhausted and {j.job_id: j.faults for j in again}[culprit.job_id] == 1
        assert [j.job_id for j in exhausted] == [culprit.job_id]
        assert given_up(exhausted[0]) == ("this job made the engine fail 2 times when it ran on its own; try "
                                          "another photo or prompt")
        assert {j.job_id for j in again} == {bystander.job_id, jobs[2].job_id} and not any(j.faults for j in again)
        await queue.raised(bystander, alone=False)  # a shared step raised: a suspect again, no fault
        await queue.raised(bystander, alone=True)   # raised alone: its own fault, once
        again, _ = await queue.claim("e2", 3, block_ms=100)
        assert {j.job_id: (j.suspect, j.faults) for j in again}[bystander.job_id] == (2, 1)
    finally:
        await stack.close()


def test_the_redis_that_run_starts_keeps_what_it_was_told_across_a_crash(tmp_path, unused_tcp_port):
    """`stylebot run`'s own Redis writes an append-only file every second: a write older than a second survives
    a kill -9 of the server."""
    import time

    import redis as sync_redis

    from bot.serve import start_redis

    url, proc = start_redis(f"redis://127.0.0.1:{unused_tcp_port}/0", str(tmp_path))
    try:
        sync_redis.from_url(url).set("told", "queued")
        time.sleep(1.5)
    finally:
        proc.kill()
        proc.wait()
    url, proc = start_redis(f"redis://127.0.0.1:{unused_tcp_port}/0", str(tmp_path))
    try:
        assert sync_redis.from_url(url).get("told") == b"queued"
    finally:
        proc.kill()
        proc.wait()


async def test_a_front_end_down_while_a_thousand_jobs_finish_posts_every_result_once(client):
    """The web chat is down while 1,000 jobs finish, each with its progress (published to nobody): when it comes
    back every result is posted exactly once; progress never pushed a result out, and the stream is empty after."""
    stack = Stack(client)
    try:
        queue = stack.queue
        await queue.ensure_groups(adapters=("web",))
        jobs = [Job(op="edit", user_id=f"web:u{i % 50}", adapter="web") for i in range(1000)]
        for job in jobs:
            await queue.enqueue(job)
        while True:
            claimed, _ = await queue.claim("engine", 100, block_ms=100)
            if not claimed:
                break
            for job in claimed:
                for step in range(0, 21, 5):
                    await queue.progress(job, step, 20, preview=b"\xff\xd8 jpeg" if step == 10 else None)
                await queue.finish(job, ResultEvent.done(job, "edited"))
        rec = Recorder()
        pump = EventPump(stack.core, rec)  # the front end comes back
        for _ in range(100):
            if not await pump.step(block_ms=100):
                break
        posted = [r.job_id for r in rec.results]
        assert sorted(posted) == sorted(j.job_id for j in jobs) and len(set(posted)) == 1000
        assert await client.xlen(stack.keys.results("web")) == 0
    finally:
        await stack.close()


async def test_an_engine_keeps_the_jobs_waiting_for_a_row_claimed(client):
    """An engine with room for one row claims an inversion and an edit: the edit waits for the row while the
    inversion runs, and another engine looking for stale jobs meanwhile (reclaim time 1 s) finds none to take, so
    nothing runs twice."""
    import numpy as np

    from storage.latents import StoredLatent

    stack = Stack(client, max_active=1, invert_steps=150)
    stack.queue.reclaim_idle_ms = 1000
    stack.queue.takeover_every_s = 3600  # only the reclaim time is under test here
    try:
        await stack.queue.ensure_groups(adapters=("web",))
        await stack.store.set_face("web:bob", StoredLatent(np.zeros((8, 64), np.float32), "tiny"))
        await stack.queue.enqueue(Job(op="invert", user_id="web:alice", adapter="web"), photo=OBAMA)
        await stack.queue.enqueue(Job(op="edit", user_id="web:bob", adapter="web", params={"prompt": "smile"}))
        sub = await stack.queue.listen_progress("web")
        await stack.start_engine()
        while not any(e.step > 0 for e in await stack.queue.read_progress(sub, 0.1)):
            pass  # the inversion runs
        await sub.aclose()
        while len(stack.engine.claimed) < 2:  # the edit is claimed too, and waits for the inversion's row
            await asyncio.sleep(0.05)
        other = type(stack.queue)(client, stack.keys, reclaim_idle_ms=1000)
        other.takeover_every_s = 3600
        for _ in range(4):  # for 3 s, while the inversion runs and the edit waits
            await asyncio.sleep(0.75)
            taken, _ = await other.claim("other-engine", 8, block_ms=10)
            assert taken == [], [j.op for j in taken]
        assert len(stack.engine.rows) == 1 and len(stack.engine.joining) == 1  # still waiting: the test held
    finally:
        await stack.close()


async def test_an_engine_restarted_under_its_name_takes_up_its_dead_predecessors_jobs_at_once(client):
    """An engine SIGKILLed holding jobs, started again under the same name (as `stylebot run` and any supervisor
    do): it answers them at once, while the dead one's heartbeat (10 minutes here) and the reclaim time (1 minute)
    have not expired, so nothing else would have taken them. A name still held by a live process is refused."""
    import socket
    import subprocess

    import pytest

    from storage.errors import StylebotError

    stack = Stack(client)
    rec = Recorder()
    pump = EventPump(stack.core, rec)
    await stack.queue.ensure_groups(adapters=("web",))
    try:
        for user in ("ann", "bob", "cy"):
            assert (await stack.core.handle(say("/invert", user=user, photo=OBAMA))).job_id
        dead = subprocess.Popen(["true"])
        dead.wait()
        predecessor = JobQueue(client, stack.keys, reclaim_idle_ms=60_000)  # another process's queue
        held, _ = await predecessor.claim("gpu0", 10, block_ms=100)  # it took them, then died
        await predecessor.beat("gpu0", "tiny", 600, holder=f"{socket.gethostname()}:{dead.pid}")
        assert len(held) == 3
        stack.engine.s.name = "gpu0"
        await stack.start_engine()
        await answered(pump, rec, 3, timeout=30)  # reclaiming them would take 60 s
        assert sorted(r.job_id for r in rec.results) == sorted(j.job_id for j in held)
        assert all(r.ok for r in rec.results)
        await stack.close()

        alive = subprocess.Popen(["sleep", "30"])
        try:
            await stack.queue.beat("gpu0", "tiny", 600, holder=f"{socket.gethostname()}:{alive.pid}")
            with pytest.raises(StylebotError, match=r"an engine called gpu0 is running \(.*\); start this one with"):
                await stack.engine.run(asyncio.Event())
        finally:
            alive.kill()
    finally:
        await stack.close()


async def test_a_cancelled_event_pump_stops_and_gives_its_connections_back():
    """Restarts of the pump in one process, each cancelled at a random moment (reading results, progress, or
    subscribing): every one stops at once, and their Redis connections go back to the pool (8 here: a pump that kept
    its subscription would use it up after 8 restarts)."""
    import random
    import uuid

    from bot.core import BotCore
    from conftest import REDIS_URL
    from storage.connect import connect
    from storage.keys import Keys
    from storage.latents import LatentStore

    r = connect(REDIS_URL, max_connections=8, pool_timeout_s=2)
    keys = Keys(f"test-pump-{uuid.uuid4().hex[:8]}:")
    queue = JobQueue(r, keys)
    core = BotCore(queue, LatentStore(r, keys))
    rng = random.Random(26)
    try:
        for i in range(40):
            task = asyncio.create_task(EventPump(core, Recorder()).run(asyncio.Event()))
            await asyncio.sleep(rng.uniform(0, 0.15))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert done and task.cancelled(), f"restart {i}: {'still running' if not done else task.exception()!r}"
    finally:
        async for key in r.scan_iter(match=f"{keys.prefix}*"):
            await r.delete(key)
        await r.aclose()
