"""`stylebot engine` as a process on a real Redis: SIGKILL mid-batch loses nothing, SIGTERM exits cleanly."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest_asyncio

from conftest import FIXTURES, REDIS_URL
from storage.keys import Keys
from storage.queue import Job, JobQueue
from storage.records import ResultEvent


@pytest_asyncio.fixture
async def setup(client, tmp_path):
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    cfg = tmp_path / "config.toml"
    # max_active fixed: these engines are killed and restarted, and timing pool sizes at each start is not under test;
    # drain_s 5: a stopped engine may finish rows for drain_s, and the tests wait 30 s for it to exit (with the
    # default 30 s, an engine that was finishing a row when told to stop could not make that wait)
    cfg.write_text(f'[engine]\ndevice = "cpu"\nmodel = "tiny"\nmax_active = 4\ndrain_s = 5.0\n\n'
                   f'[weights]\ndir = "{tmp_path / "w"}"\n\n'
                   f'[redis]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n\n'
                   "[queue]\nreclaim_idle_s = 1.0\nheartbeat_ttl_s = 3\n")
    queue = JobQueue(client, Keys(prefix))
    await queue.ensure_groups(adapters=("web",))
    yield cfg, queue
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)


def start_engine(cfg, name: str, steps: int = 15, poison: Path | None = None) -> subprocess.Popen:
    """A `stylebot engine` process on tiny with `steps` per inversion (the default recipe's tick on tiny takes
    about 3 times the old one's, so these counts are a third of what they were, for the same time per job); with
    `poison`, one that a job with that photo kills (`fakes/poisoned_engine.py`)."""
    program = ["-m", "bot.cli"] if poison is None else [str(Path(__file__).parent / "fakes" / "poisoned_engine.py")]
    return subprocess.Popen([sys.executable, *program, "--config", str(cfg), "engine", "--name", name,
                             "--invert-steps", str(steps)], stdout=subprocess.DEVNULL,
                            stderr=(cfg.parent / f"{name}.log").open("a"),  # a file: a pipe nobody reads fills up
                            env={**os.environ, "POISON_PHOTO": str(poison)} if poison else None)


async def collect(queue: JobQueue, done: list, until, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for entry_id, event in await queue.read_events("web", "web-test", block_ms=200):
            await queue.ack_event("web", entry_id)
            if event.type != "progress":
                done.append(event)


async def test_sigkill_mid_batch_then_another_engine_every_job_answered_once(setup):
    cfg, queue = setup
    photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    jobs = [Job(op="invert", user_id=f"user{i}", adapter="web") for i in range(20)]
    for job in jobs:
        await queue.enqueue(job, photo=photo)

    answers: list[ResultEvent] = []
    first = start_engine(cfg, "engine-a")
    await collect(queue, answers, lambda: len(answers) >= 4, timeout=90)  # one batch done, the next in flight
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert 4 <= len(answers) < 20, "the kill should land mid-run"

    second = start_engine(cfg, "engine-b")
    try:
        await collect(queue, answers, lambda: len(answers) >= 20, timeout=120)
        await collect(queue, answers, lambda: False, timeout=2)  # nothing more may arrive
    finally:
        second.terminate()
        second.wait(30)
    counts = collections.Counter(a.job_id for a in answers)
    assert set(counts) == {j.job_id for j in jobs}
    assert max(counts.values()) == 1, f"posted twice: {[k for k, v in counts.items() if v > 1]}"
    assert all(a.type == "done" for a in answers)
    assert await queue.pending_count() == 0


async def test_sigterm_exits_zero_and_drops_the_heartbeat(setup, client):
    cfg, queue = setup
    engine = start_engine(cfg, "engine-t")
    for _ in range(200):
        if "engine-t" in await queue.engines_online():
            break
        await asyncio.sleep(0.1)
    online = await queue.engines_online()
    exited = engine.poll() is not None
    assert online.get("engine-t") == "tiny", (cfg.parent / "engine-t.log").read_text() if exited else online
    engine.send_signal(signal.SIGTERM)
    assert engine.wait(30) == 0
    assert await queue.engines_online() == {}  # it said it left: no waiting for its heartbeat to expire


async def test_two_engines_share_one_queue(setup, client):
    cfg, queue = setup
    photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    jobs = [Job(op="invert", user_id=f"user{i}", adapter="web") for i in range(16)]
    for job in jobs:
        await queue.enqueue(job, photo=photo)
    engines = [start_engine(cfg, "engine-1", steps=40), start_engine(cfg, "engine-2", steps=40)]
    answers: list[ResultEvent] = []
    try:
        await collect(queue, answers, lambda: len(answers) >= 16, timeout=120)
    finally:
        for e in engines:
            e.terminate()
        for e in engines:
            assert e.wait(30) == 0
    counts = collections.Counter(a.job_id for a in answers)
    assert set(counts) == {j.job_id for j in jobs} and max(counts.values()) == 1
    assert {a.engine for a in answers} == {"engine-1", "engine-2"}  # both took part, with no coordination


async def test_engines_killed_at_random_moments_every_job_answered_once_and_none_blamed(setup, client):
    """40 jobs, an engine SIGKILLed 4 times at random moments and started again each time (a new process, a new
    name, as `stylebot run` does), jobs reclaimed only through the dead engines' expired heartbeats (the queue's
    reclaim time is set to 10 minutes): every job answered exactly once, and none blamed on its user."""
    import random

    cfg, queue = setup
    cfg.write_text(cfg.read_text().replace("reclaim_idle_s = 1.0", "reclaim_idle_s = 600.0")
                   .replace("heartbeat_ttl_s = 3", "heartbeat_ttl_s = 2"))
    photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    jobs = [Job(op="invert", user_id=f"user{i}", adapter="web") for i in range(40)]
    for job in jobs:
        await queue.enqueue(job, photo=photo)
    rng = random.Random(7)
    answers: list[ResultEvent] = []
    engine = start_engine(cfg, "kill-0", steps=10)
    kills = []
    try:
        for k in range(1, 5):
            target = len(answers) + rng.randint(1, 6)
            await collect(queue, answers, lambda: len(answers) >= target, timeout=120)
            await asyncio.sleep(rng.uniform(0, 1.5))  # somewhere inside the next tick, or between two
            engine.send_signal(signal.SIGKILL)
            engine.wait(10)
            kills.append((time.monotonic(), len(answers)))
            engine = start_engine(cfg, f"kill-{k}", steps=10)
        await collect(queue, answers, lambda: len(answers) >= 40, timeout=180)
        await collect(queue, answers, lambda: False, timeout=2)  # nothing more may arrive
    finally:
        engine.terminate()
        engine.wait(30)
    counts = collections.Counter(a.job_id for a in answers)
    assert set(counts) == {j.job_id for j in jobs} and max(counts.values()) == 1
    assert [a.error for a in answers if a.type != "done"] == []  # no job failed for a kill, none blamed
    assert await queue.pending_count() == 0


async def test_a_job_that_kills_its_engine_fails_after_two_deaths_alone_and_no_bystander_does(setup):
    """One photo kills the engine's process whenever it is aligned (an injected fault). It is queued third among
    eight, and the engine (4 rows) is restarted under its name after each death, as `stylebot run` does. The first
    death catches the four jobs claimed first, all running; those four are run again together with nothing beside
    them (the second death), then each alone: the bad job fails in one line after its two deaths alone (four deaths
    in all), and every other job is answered."""
    cfg, queue = setup
    photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    poison = FIXTURES / "faces" / "biden.jpg"
    jobs = [Job(op="invert", user_id=f"user{i}", adapter="web") for i in range(7)]
    bad = Job(op="invert", user_id="poisoner", adapter="web")
    for job in [*jobs[:2], bad, *jobs[2:]]:
        await queue.enqueue(job, photo=poison.read_bytes() if job is bad else photo)
    answers: list[ResultEvent] = []
    engine, deaths = start_engine(cfg, "poisoned", steps=10, poison=poison), 0
    deadline = time.monotonic() + 240
    try:
        while len(answers) < 8 and time.monotonic() < deadline:
            await collect(queue, answers, lambda: len(answers) >= 8, timeout=0.5)
            if engine.poll() is not None:
                assert engine.returncode == -signal.SIGKILL, (cfg.parent / "poisoned.log").read_text()[-3000:]
                deaths += 1
                engine = start_engine(cfg, "poisoned", steps=10, poison=poison)
        await collect(queue, answers, lambda: False, timeout=1)
    finally:
        engine.terminate()
        engine.wait(30)
    by_job = {a.job_id: a for a in answers}
    assert len(answers) == 8 and set(by_job) == {j.job_id for j in [*jobs, bad]}
    assert by_job[bad.job_id].type == "failed"
    assert by_job[bad.job_id].error == ("this job made the engine fail 2 times when it ran on its own; try another "
                                        "photo or prompt")
    assert [by_job[j.job_id].type for j in jobs] == ["done"] * 7
    assert deaths == 4
