"""Queue latency and throughput on a real Redis.

    python benchmarks/queue.py [--redis redis://127.0.0.1:6379/15] [--users 50] [--jobs 2000]

1. Command-to-acknowledgement latency: `--users` simulated users send /status-free commands (/share, then /edit
   with a face present) at the same moment through the bot core; p50 / p95 of the time until each reply.
   Goal: p95 < 300 ms on a 2-core machine.
2. Jobs per second through the queue with a no-op engine operation: enqueue, claim in batches of 8, finish.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: this file shadows the stdlib queue

import numpy as np  # noqa: E402

from bot.core import BotCore, Command  # noqa: E402
from storage.connect import connect  # noqa: E402
from storage.keys import Keys  # noqa: E402
from storage.latents import LatentStore, StoredLatent  # noqa: E402
from storage.queue import Job, JobQueue  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2000)
    args = ap.parse_args()

    client = connect(args.redis)
    keys = Keys(f"bench-{uuid.uuid4().hex[:6]}:")
    queue = JobQueue(client, keys)
    await queue.ensure_groups(adapters=("web",))
    store = LatentStore(client, keys)
    core = BotCore(queue, store)
    try:
        for i in range(args.users):
            await store.set_face(f"web:u{i}", StoredLatent(np.zeros((18, 512), np.float32), "ffhq-1024"))

        async def user(i: int) -> float:
            t0 = time.perf_counter()
            reply = await core.handle(Command("web", f"web:u{i}", f"u{i}", "/edit really angry face"))
            assert reply.job_id, reply.text
            return time.perf_counter() - t0

        latencies = sorted(await asyncio.gather(*(user(i) for i in range(args.users))))
        p50 = 1000 * statistics.median(latencies)
        p95 = 1000 * latencies[max(0, int(round(0.95 * len(latencies))) - 1)]
        print(f"command -> acknowledgement, {args.users} users at once: p50 {p50:.1f} ms, p95 {p95:.1f} ms")

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
                await queue.finish(job, {"text": "ok"})
            done += len(jobs)
        run = time.perf_counter() - t0
        print(f"no-op jobs: enqueue {args.jobs / enq:.0f}/s, claim+finish {args.jobs / run:.0f}/s")
    finally:
        async for key in client.scan_iter(match=f"{keys.prefix}*"):
            await client.delete(key)
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
