"""A mixed workload through the real bot core, a real Redis and a real engine process, for both schedulers.

    python benchmarks/load.py [--redis redis://127.0.0.1:6379/15] [--duration 60] [--rate auto] [--users 40]

Simulated users send commands with Poisson arrivals (by default 60 % /invert with a photo, 25 % /edit, 15 %
"stronger" on an earlier edit) for `--duration` seconds to a `stylebot engine` (tiny model, CPU, the recipes'
full step counts) run once with `[engine] scheduler = "static"` and once with "continuous". It prints, per kind of
command and per scheduler, p50 and p95 of the time from the command to its answer, and the throughput.

`--rate auto` first times each kind of job alone (on an idle engine) and sends at half the load one engine can
carry: rate = 0.5 / (mean time of a job, weighted by the mix). Goals (issue 13, tiny on a 2-core CPU): stronger
p95 under 1 s while optimisations are in flight; invert p95 at half load no more than 1.3x a lone invert; the
continuous throughput no lower than the static one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/: its queue.py shadows the stdlib's

import numpy as np  # noqa: E402

from bot.config import ChatConfig, LimitsConfig  # noqa: E402
from bot.core import BotCore, Command, Reaction  # noqa: E402
from storage.connect import connect  # noqa: E402
from storage.keys import Keys  # noqa: E402
from storage.latents import LatentStore, StoredLatent  # noqa: E402
from storage.queue import JobQueue  # noqa: E402

PHOTO = (ROOT / "tests" / "fixtures" / "faces" / "obama.jpg").read_bytes()
ADAPTER = "bench"


class Bench:
    """One engine process (one scheduler) on a fresh key prefix, and the bot core that sends it commands."""

    def __init__(self, redis_url: str, scheduler: str, users: int):
        self.url, self.scheduler, self.users = redis_url, scheduler, users
        self.keys = Keys(f"bench-{uuid.uuid4().hex[:6]}:")
        self.sent: dict[str, tuple[str, float]] = {}        # job id -> (kind, sent at)
        self.answered: dict[str, float] = {}               # job id -> answered at
        self.failed: list[str] = []

    async def __aenter__(self) -> "Bench":
        self.folder = tempfile.TemporaryDirectory()
        cfg = Path(self.folder.name) / "config.toml"
        cfg.write_text(f'[engine]\ndevice = "cpu"\nmodel = "tiny"\nscheduler = "{self.scheduler}"\n\n'
                       f'[redis]\nurl = "{self.url}"\nprefix = "{self.keys.prefix}"\n')
        self.client = connect(self.url)
        self.queue = JobQueue(self.client, self.keys)
        self.store = LatentStore(self.client, self.keys)
        self.core = BotCore(self.queue, self.store, LimitsConfig(max_jobs_per_user=1000, max_queue=100_000),
                            chat=ChatConfig())
        await self.queue.ensure_groups(adapters=(ADAPTER,))
        rng = np.random.default_rng(0)
        for i in range(self.users):
            w0 = (rng.standard_normal((8, 64)) * 0.5).astype(np.float32)
            await self.store.set_face(self.uid(i), StoredLatent(w0, "tiny"))
            await self.store.set_result(self.uid(i), "edit0", StoredLatent(
                w0 + 0.05, "tiny", meta={"op": "edit", "prompt": "angry", "strength": 1.0}, w0=w0))
        self.engine = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(cfg), "engine"],
                                       cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not await self.queue.engines_online():
            await asyncio.sleep(0.2)
        self.reader = asyncio.create_task(self._read_answers())
        return self

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        self.engine.send_signal(signal.SIGTERM)
        self.engine.wait(120)
        async for key in self.client.scan_iter(match=f"{self.keys.prefix}*"):
            await self.client.delete(key)
        await self.client.aclose()
        self.folder.cleanup()

    @staticmethod
    def uid(i: int) -> str:
        return f"{ADAPTER}:u{i}"

    async def _read_answers(self) -> None:
        while True:
            for entry_id, event in await self.queue.read_events(ADAPTER, "bench", count=200, block_ms=200):
                await self.queue.ack_event(ADAPTER, entry_id)
                if event["type"] != "progress":
                    self.answered[event["job_id"]] = time.perf_counter()
                    if event["type"] != "done":
                        self.failed.append(event.get("error", "?"))

    async def send(self, kind: str, user: int) -> str:
        """One command of `kind` from user number `user`; returns its job id."""
        uid = self.uid(user)
        t0 = time.perf_counter()
        if kind == "invert":
            reply = await self.core.handle(Command(ADAPTER, uid, f"u{user}", "/invert", photo=PHOTO))
        elif kind == "edit":
            reply = await self.core.handle(Command(ADAPTER, uid, f"u{user}", "/edit a smiling face"))
        else:
            reply = await self.core.react(Reaction(ADAPTER, uid, "edit0", "stronger"))
        assert reply.job_id, reply.text
        self.sent[reply.job_id] = (kind, t0)
        return reply.job_id

    async def wait(self, job_ids, timeout: float = 1800) -> None:
        deadline = time.perf_counter() + timeout
        while not all(j in self.answered for j in job_ids):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{sum(j not in self.answered for j in job_ids)} jobs unanswered")
            await asyncio.sleep(0.05)

    def latency(self, job_id: str) -> float:
        return self.answered[job_id] - self.sent[job_id][1]


async def lone_times(bench: Bench, kinds: list[str]) -> dict[str, float]:
    """Each kind of job alone on an idle engine (median of 3)."""
    out = {}
    for kind in kinds:
        times = []
        for i in range(3):
            job = await bench.send(kind, i)
            await bench.wait([job])
            times.append(bench.latency(job))
        out[kind] = statistics.median(times)
    return out


async def load(bench: Bench, mix: dict[str, float], rate: float, duration: float, seed: int) -> dict:
    """Poisson arrivals at `rate` per second for `duration` seconds; per kind: n, p50, p95; throughput."""
    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    before = set(bench.sent)
    tasks, start, user = [], time.perf_counter(), 0
    while time.perf_counter() - start < duration:
        await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(bench.send(rng.choices(kinds, weights)[0], user % bench.users)))
        user += 1
    jobs = await asyncio.gather(*tasks)
    await bench.wait(jobs)
    out = {}
    for kind in kinds:
        lat = sorted(bench.latency(j) for j in jobs if bench.sent[j][0] == kind)
        if lat:
            out[kind] = (len(lat), statistics.median(lat), lat[max(0, round(0.95 * len(lat)) - 1)])
    first = min(bench.sent[j][1] for j in jobs)
    out["throughput"] = len(jobs) / (max(bench.answered[j] for j in jobs) - first)
    assert before.isdisjoint(jobs)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per scheduler")
    ap.add_argument("--rate", default="auto", help="commands per second, or auto (half of one engine's capacity)")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--mix", default="invert=0.6,edit=0.25,stronger=0.15")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    print(f"CPU threads {os.cpu_count()}, tiny model, full recipes; mix {mix}", flush=True)

    results, lone = {}, {}
    for scheduler in ("static", "continuous"):
        async with Bench(args.redis, scheduler, args.users) as bench:
            lone[scheduler] = await lone_times(bench, list(mix))
            print(f"{scheduler:10} lone jobs: " + ", ".join(f"{k} {v:.2f} s" for k, v in lone[scheduler].items()),
                  flush=True)
            if args.rate == "auto":
                service = sum(mix[k] * lone["static"][k] for k in mix) / sum(mix.values())
                args.rate = f"{0.5 / service:.3f}"
                print(f"rate: {args.rate} commands/s (half of one engine's capacity, from the static lone times)")
            results[scheduler] = await load(bench, mix, float(args.rate), args.duration, args.seed)
            if bench.failed:
                print(f"  {len(bench.failed)} failed: {bench.failed[:3]}")

    print(f"\n{'kind':10} {'scheduler':11} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'p95 / lone':>10}")
    for kind in mix:
        for scheduler in ("static", "continuous"):
            if kind in results[scheduler]:
                n, p50, p95 = results[scheduler][kind]
                print(f"{kind:10} {scheduler:11} {n:4d} {p50:7.2f} {p95:7.2f} {p95 / lone[scheduler][kind]:10.2f}")
    s, c = results["static"]["throughput"], results["continuous"]["throughput"]
    print(f"throughput: static {s:.2f} jobs/s, continuous {c:.2f} jobs/s (ratio {c / s:.2f})")


if __name__ == "__main__":
    asyncio.run(main())
