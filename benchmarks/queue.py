"""Queue latency and throughput on a real Redis.

    python benchmarks/queue.py [--redis redis://127.0.0.1:6379/15] [--users 50] [--rounds 3] [--jobs 2000]
                               [--max-connections 64] [--pool-timeout 5]

Prints the machine first (cores, CPU model, load average, Python, Redis, date): figures from another machine, or
from this one while something else runs, are not comparable.

1. Command-to-acknowledgement latency: `--users` simulated users send a command at the same moment through the bot
   core, on a client pool like the product's (`[redis] max_connections`, `pool_timeout_s`): an /edit (each user has a
   face), then an /invert with a real photo (checked, decoded off the event loop, queued). One warm-up round (new
   connections, scripts loaded), then `--rounds` rounds of fresh users; p50 / p95 over all their answers. An answer
   "busy" (no free connection in time, or the queue full) is an answer: counted and printed, never a crash.
   Goal: p95 < 300 ms on a 2-core machine.
2. Jobs per second through the queue with a no-op engine operation: enqueue, claim in batches of 8, finish.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: this file shadows the stdlib queue

import numpy as np  # noqa: E402

from bot.config import LimitsConfig  # noqa: E402
from bot.core import BUSY, BotCore, Command  # noqa: E402
from storage.connect import connect  # noqa: E402
from storage.keys import Keys  # noqa: E402
from storage.latents import LatentStore, StoredLatent  # noqa: E402
from storage.queue import UNLIMITED, JobQueue  # noqa: E402
from storage.records import Job, ResultEvent  # noqa: E402

PHOTO = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faces" / "obama.jpg"


def machine() -> str:
    """Cores, CPU model, load average, Python: what the figures depend on."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{usable} cores usable of {os.cpu_count()} ({model}), load average {load}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up round")
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--max-connections", type=int, default=64, help="as [redis] max_connections")
    ap.add_argument("--pool-timeout", type=float, default=5.0, help="as [redis] pool_timeout_s")
    args = ap.parse_args()

    client = connect(args.redis, max_connections=args.max_connections, pool_timeout_s=args.pool_timeout)
    keys = Keys(f"bench-{uuid.uuid4().hex[:6]}:")
    queue = JobQueue(client, keys)
    await queue.ensure_groups(adapters=("web",))
    store = LatentStore(client, keys)
    # the queue bound is not what is measured here: every round's jobs fit
    core = BotCore(queue, store, LimitsConfig(max_queue=UNLIMITED))
    photo = PHOTO.read_bytes()
    server = await client.info("server")
    print(f"machine: {machine()}; Redis {server.get('redis_version')} at {re.sub(r'//[^@/]*@', '//', args.redis)}; "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"settings: {args.users} users at once, {args.rounds} rounds after a warm-up, pool of "
          f"{args.max_connections} connections (wait up to {args.pool_timeout:g} s)")
    try:
        async def user(uid: str, text: str, with_photo: bool) -> tuple[float, str]:
            t0 = time.perf_counter()
            reply = await core.handle(Command("web", uid, uid.removeprefix("web:"), text,
                                              photo=photo if with_photo else None))
            status = "queued" if reply.job_id else "busy" if reply.text.startswith(BUSY) else "refused"
            if status == "refused":
                print(f"  unexpected answer: {reply.text}")
            return time.perf_counter() - t0, status

        for label, text, with_photo in (("/edit", "/edit really angry face", False),
                                        (f"/invert with a {PHOTO.stat().st_size // 1024} KiB photo", "/invert", True)):
            latencies, answers, cold = [], {"queued": 0, "busy": 0, "refused": 0}, []
            for r in range(args.rounds + 1):  # round 0 warms up: new connections, scripts loaded
                users = [f"web:r{r}u{i}{'p' if with_photo else ''}" for i in range(args.users)]
                if not with_photo:
                    for uid in users:
                        await store.set_face(uid, StoredLatent(np.zeros((18, 512), np.float32), "ffhq-1024"))
                timed = await asyncio.gather(*(user(uid, text, with_photo) for uid in users))
                if not r:
                    cold = sorted(t for t, _ in timed)
                    continue
                latencies += [t for t, _ in timed]
                for _, status in timed:
                    answers[status] += 1
            latencies.sort()
            p50, p95 = 1000 * statistics.median(latencies), 1000 * percentile(latencies, 0.95)
            print(f"command -> acknowledgement, {label}, {args.users} users at once: p50 {p50:.1f} ms, "
                  f"p95 {p95:.1f} ms ({answers['queued']} queued, {answers['busy']} busy, "
                  f"{answers['refused']} refused); warm-up round p50 {1000 * statistics.median(cold):.1f} ms, "
                  f"p95 {1000 * percentile(cold, 0.95):.1f} ms")

        await client.delete(keys.jobs)
        await queue.ensure_groups(adapters=("web",))
        t0 = time.perf_counter()
        for i in range(args.jobs):
            await queue.enqueue(Job(op="noop", user_id=f"web:n{i % 100}", adapter="web"))
        enq = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = 0
        while done < args.jobs:
            jobs, _ = await queue.claim("bench", 8, block_ms=100)
            for job in jobs:
                await queue.finish(job, ResultEvent.done(job, "ok"))
            done += len(jobs)
        run = time.perf_counter() - t0
        print(f"no-op jobs, one after another: enqueue {args.jobs / enq:.0f}/s, claim+finish {args.jobs / run:.0f}/s")
    finally:
        async for key in client.scan_iter(match=f"{keys.prefix}*"):
            await client.delete(key)
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
