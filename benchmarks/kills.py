"""Engines killed at random moments: every job answered once, none blamed, and how long a kill costs.

    python benchmarks/kills.py [--redis redis://127.0.0.1:6379/15] [--jobs 100] [--kills 5] [--steps 30]

Real `stylebot engine` processes (tiny model, CPU) on a real Redis, `[queue] heartbeat_ttl_s` 3 and a reclaim time
of 10 minutes, so that a dead engine's jobs can only come back through its expired heartbeat. First one job alone
(the job's own time) and eight at once (its time in a full pool, which is what a dead engine's jobs meet when they
are taken over), then `--jobs` inversions with one engine that is SIGKILLed `--kills` times at random moments and
started again at once each time, under the same name as `stylebot run` and any supervisor do (`--names new`: a new
name each time, so that the dead engine's jobs come back only once its heartbeat has expired). Prints, per kill, how
long each job that the dead engine held took from the kill to its answer, their median against heartbeat TTL + the
job's time, and whether every job was answered exactly once with none blamed on its user. With a single engine,
every takeover also waits for the new process to start (printed); with `--spare`, a second engine that is never
killed runs beside it and takes over.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from storage.connect import connect  # noqa: E402
from storage.keys import ENGINE_GROUP, Keys  # noqa: E402
from storage.queue import JobQueue  # noqa: E402
from storage.records import Job, ResultEvent  # noqa: E402

FACE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faces" / "obama.jpg"
TTL = 3


def engine(cfg: Path, name: str, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(cfg), "engine", "--name", name,
                             "--invert-steps", str(steps)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--spare", action="store_true", help="a second engine that is never killed takes over")
    ap.add_argument("--names", choices=["same", "new"], default="same",
                    help="the restarted engine's name: the dead one's (it resumes its jobs at once) or a new one")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    def name(k: int) -> str:
        return "e0" if args.names == "same" else f"e{k}"
    photo = FACE.read_bytes()
    client = connect(args.redis)
    keys = Keys(f"bench-{uuid.uuid4().hex[:6]}:")
    queue = JobQueue(client, keys)
    await queue.ensure_groups(adapters=("web",))
    answered: dict[str, tuple[float, ResultEvent]] = {}
    counts: collections.Counter = collections.Counter()

    async def pump(until, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            for entry_id, event in await queue.read_events("web", "bench", count=200, block_ms=100):
                await queue.ack_event("web", entry_id)
                counts[event.job_id] += 1
                answered.setdefault(event.job_id, (time.monotonic(), event))

    with tempfile.TemporaryDirectory() as folder:
        cfg = Path(folder) / "config.toml"
        cfg.write_text(f'[engine]\ndevice = "cpu"\nmodel = "tiny"\n\n[weights]\ndir = "{folder}/w"\n\n'
                       f'[redis]\nurl = "{args.redis}"\nprefix = "{keys.prefix}"\n\n'
                       f"[queue]\nreclaim_idle_s = 600.0\nheartbeat_ttl_s = {TTL}\n")
        try:
            started = time.monotonic()
            proc = engine(cfg, "warm", args.steps)
            lone = Job(op="invert", user_id="web:lone", adapter="web")
            while not await queue.engines_online():
                await asyncio.sleep(0.1)
            startup_s = time.monotonic() - started
            t0 = time.monotonic()
            await queue.enqueue(lone, photo=photo)
            await pump(lambda: lone.job_id in answered)
            job_s = answered[lone.job_id][0] - t0
            full = [Job(op="invert", user_id=f"web:full{i}", adapter="web") for i in range(8)]
            t0 = time.monotonic()
            for job in full:  # a full pool: what a dead engine's jobs meet when they are taken over
                await queue.enqueue(job, photo=photo)
            await pump(lambda: all(j.job_id in answered for j in full))
            pool_s = statistics.median(answered[j.job_id][0] - t0 for j in full)
            proc.terminate()
            proc.wait(30)

            jobs = [Job(op="invert", user_id=f"web:u{i}", adapter="web") for i in range(args.jobs)]
            for job in jobs:
                await queue.enqueue(job, photo=photo)
            by_entry = {entry_id.decode(): fields[b"id"].decode() for entry_id, fields in await client.xrange(keys.jobs)}
            spare = engine(cfg, "spare", args.steps) if args.spare else None
            proc = engine(cfg, name(0), args.steps)
            kills = []
            for k in range(1, args.kills + 1):
                target = len(answered) + rng.randint(1, max(1, args.jobs // (args.kills + 1)))
                await pump(lambda: len(answered) >= target)
                await asyncio.sleep(rng.uniform(0, 1.0))
                held = await client.xpending_range(keys.jobs, ENGINE_GROUP, min="-", max="+", count=1000,
                                                   consumername=name(k - 1))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills.append((time.monotonic(), [by_entry[h["message_id"].decode()] for h in held]))
                proc = engine(cfg, name(k), args.steps)
            await pump(lambda: all(j.job_id in answered for j in jobs))
            await pump(lambda: False, timeout=2)
            for p in (proc, spare):
                if p is not None:
                    p.terminate()
                    p.wait(30)
        finally:
            async for key in client.scan_iter(match=f"{keys.prefix}*"):
                await client.delete(key)
            await client.aclose()

    waits = []
    for i, (at, held) in enumerate(kills, 1):
        times = [answered[j][0] - at for j in held if j in answered]
        waits += times
        print(f"kill {i}: the dead engine held {len(held)} job(s); kill to answer "
              + ", ".join(f"{t:.1f} s" for t in sorted(times)))
    blamed = [j for j, (_, e) in answered.items() if "try another photo" in e.error]
    print(f"an engine process starts in {startup_s:.1f} s (until its first heartbeat)"
          + ("; a spare engine that is never killed takes over" if args.spare else
             "; the only engine is the restarted one, so every takeover waits for it to start too")
          + f"; restarted under {'the same name' if args.names == 'same' else 'a new name'}")
    median = statistics.median(waits) if waits else float("nan")
    print(f"one job alone: {job_s:.1f} s; 8 at once (a full pool): {pool_s:.1f} s each (median); heartbeat TTL {TTL} s")
    print(f"median kill-to-answer {median:.1f} s; heartbeat TTL + the job's time: {TTL + job_s:.1f} s with a lone "
          f"job's time, {TTL + pool_s:.1f} s with a full pool's")
    print(f"{len([j for j in jobs if j.job_id in answered])} of {len(jobs)} answered, "
          f"{sum(1 for j in jobs if counts[j.job_id] > 1)} twice, {len(blamed)} blamed on their user, "
          f"{sum(1 for j in jobs if j.job_id in answered and answered[j.job_id][1].type == 'failed')} failed")
    reasons = collections.Counter(e.error for _, e in answered.values() if e.type == "failed")
    for reason, n in reasons.items():
        print(f"  {n} x {reason!r}")


if __name__ == "__main__":
    asyncio.run(main())
