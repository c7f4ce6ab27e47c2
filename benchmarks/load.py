"""A mixed workload through the real bot core, a real Redis and a real engine process.

    python benchmarks/load.py [--redis redis://127.0.0.1:6379/15] [--duration 60] [--rate auto] [--users 40]
                              [--model tiny|ffhq-256] [--invert-steps N] [--edit-steps N] [--in-flight 8]
                              [--max-active auto|N]

Simulated users send commands with Poisson arrivals (by default 60 % /invert with a photo, 25 % /edit, 15 %
"stronger" on an earlier edit) for `--duration` seconds to a `stylebot engine` (CPU, the recipes' step counts
unless `--invert-steps` / `--edit-steps` shorten them). It prints, per kind of command, p50 and p95 of the time from
the command to its answer, and the throughput. `--model ffhq-256` runs the engine on the ffhq-256 architecture with
random weights (imported into a temporary weights folder), full-width VGG16 and ViT-B-32 with random weights.

`--rate auto` first times each kind of job alone (on an idle engine) and sends at half the load one engine can
carry: rate = 0.5 / (mean time of a job, weighted by the mix). Then `--in-flight` inversions are sent at once and,
while they run, one "stronger" every second: their p50 / p95 and how many of the inversions were still unanswered
when each was answered. Goals (issue 13, on a 2-core CPU, tiny and the ffhq-256 architecture): stronger p95 under
1 s while 8 optimisations are in flight; invert p95 at half load no more than 1.3x a lone invert. Beside the run it
prints the floor of a scheduler under which jobs do not get cheaper together: the same arrivals served one at a time
at the lone times, and the engine's throughput against that floor's. (The static scheduler these were once compared
with is gone; its last figures are in docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from benchmarks.gpu import build  # noqa: E402
from bot.config import ChatConfig, LimitsConfig  # noqa: E402
from bot.core import BotCore, Command, Reaction  # noqa: E402
from engine.checkpoints import save_safetensors  # noqa: E402
from engine.encoder_training import EncoderTrainer, TrainSettings, save_checkpoint  # noqa: E402
from engine.registry import WeightsCache, import_file  # noqa: E402
from storage.connect import connect  # noqa: E402
from storage.keys import Keys  # noqa: E402
from storage.latents import LatentStore, StoredLatent  # noqa: E402
from storage.queue import JobQueue  # noqa: E402

PHOTO = (ROOT / "tests" / "fixtures" / "faces" / "obama.jpg").read_bytes()
ADAPTER = "bench"


class Bench:
    """One engine process on a fresh key prefix, and the bot core that sends it commands."""

    def __init__(self, args: argparse.Namespace):
        self.url, self.users, self.args = args.redis, args.users, args
        self.keys = Keys(f"bench-{uuid.uuid4().hex[:6]}:")
        self.sent: dict[str, tuple[str, float]] = {}        # job id -> (kind, sent at)
        self.answered: dict[str, float] = {}               # job id -> answered at
        self.first: dict[str, float] = {}                  # job id -> first answer at (an encoder's face)
        self.failed: list[str] = []

    async def __aenter__(self) -> "Bench":
        self.folder = tempfile.TemporaryDirectory()
        folder = Path(self.folder.name)
        model, edit = "tiny", ""
        shape = (8, 64)
        if self.args.model == "ffhq-256":  # the architecture with random weights, imported as a user would
            G = build("ffhq-256", "cpu")
            save_safetensors(G, folder / "ffhq-256.safetensors")
            model, shape = "ffhq-256-random", (G.num_ws, G.w_dim)
            import_file(folder / "ffhq-256.safetensors", model, WeightsCache(folder / "weights"))
            edit = '[edit]\nclip_model = "ViT-B-32"\nclip_pretrained = ""\n\n'  # random weights: offline
        else:
            G = build("tiny", "cpu")
        if self.args.encoder:  # first answers: an e4e encoder of the model, untrained (a pass costs the same)
            trainer = EncoderTrainer(G, None, settings=TrainSettings(batch_size=2, val_samples=2))
            (folder / "weights" / "encoders").mkdir(parents=True, exist_ok=True)
            save_checkpoint(trainer.checkpoint(), folder / "weights" / "encoders" / f"{model}.pt")
        cfg = folder / "config.toml"
        cfg.write_text(f'[engine]\ndevice = "cpu"\nmodel = "{model}"\n'
                       f'max_active = {json.dumps(self.args.max_active)}\n\n'
                       f'[weights]\ndir = "{folder / "weights"}"\n\n{edit}'
                       f'[invert]\nencoder = "{"auto" if self.args.encoder else "none"}"\n\n'
                       f'[redis]\nurl = "{self.url}"\nprefix = "{self.keys.prefix}"\n')
        self.client = connect(self.url)
        self.queue = JobQueue(self.client, self.keys)
        self.store = LatentStore(self.client, self.keys)
        self.core = BotCore(self.queue, self.store, LimitsConfig(max_jobs_per_user=1000, max_queue=100_000),
                            chat=ChatConfig())
        await self.queue.ensure_groups(adapters=(ADAPTER,))
        rng = np.random.default_rng(0)
        for i in range(self.users):
            w0 = (rng.standard_normal(shape) * 0.5).astype(np.float32)
            await self.store.set_face(self.uid(i), StoredLatent(w0, model))
            await self.store.set_result(self.uid(i), "edit0", StoredLatent(
                w0 + 0.05, model, meta={"op": "edit", "prompt": "angry", "strength": 1.0}, w0=w0))
        steps = [arg for flag, n in (("--invert-steps", self.args.invert_steps),
                                     ("--edit-steps", self.args.edit_steps)) if n for arg in (flag, str(n))]
        self.log = open(folder / "engine.log", "w")
        self.engine = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(cfg), "engine", *steps],
                                       cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        while not await self.queue.engines_online():
            if self.engine.poll() is not None:
                raise SystemExit(f"the engine exited: {(folder / 'engine.log').read_text()[-2000:]}")
            await asyncio.sleep(0.2)
        self.reader = asyncio.create_task(self._read_answers())
        return self

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        self.engine.send_signal(signal.SIGTERM)
        self.engine.wait(120)
        self.log.close()
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
                await self.queue.ack_event(ADAPTER, entry_id, ref=event.ref)
                if event.first:
                    self.first[event.job_id] = time.perf_counter()
                    continue
                self.answered[event.job_id] = time.perf_counter()
                if event.type != "done":
                    self.failed.append(event.error or "?")

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

    def first_latency(self, job_id: str) -> float:
        """Time to the first answer: the encoder's face, else the only answer."""
        return self.first.get(job_id, self.answered[job_id]) - self.sent[job_id][1]


async def lone_times(bench: Bench, kinds: list[str]) -> dict[str, float]:
    """Each kind of job alone on an idle engine (median of 3); "invert first" too: its first answer."""
    out = {}
    for kind in kinds:
        times, first = [], []
        for i in range(3):
            job = await bench.send(kind, i)
            await bench.wait([job])
            times.append(bench.latency(job))
            first.append(bench.first_latency(job))
        out[kind] = statistics.median(times)
        if kind == "invert":
            out["invert first"] = statistics.median(first)
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
    out = {kind: percentiles([bench.latency(j) for j in jobs if bench.sent[j][0] == kind]) for kind in kinds}
    out["invert first"] = percentiles([bench.first_latency(j) for j in jobs if bench.sent[j][0] == "invert"])
    first = min(bench.sent[j][1] for j in jobs)
    out["throughput"] = len(jobs) / (max(bench.answered[j] for j in jobs) - first)
    out["arrivals"] = sorted((bench.sent[j][1], bench.sent[j][0]) for j in jobs)
    assert before.isdisjoint(jobs)
    return out


def percentiles(latencies: list[float]) -> tuple[int, float, float] | None:
    """(n, p50, p95), or None for no latencies."""
    lat = sorted(latencies)
    return (len(lat), statistics.median(lat), lat[max(0, round(0.95 * len(lat)) - 1)]) if lat else None


def one_at_a_time(arrivals: list[tuple[float, str]], lone: dict[str, float]) -> dict:
    """What a server that runs each job alone, at its lone time, back to back in the order sent, would have
    answered for the same arrivals: the floor for any scheduler under which jobs do not get cheaper by running
    together (on a CPU they barely do: benchmarks/cpu_memory.py measures a pool's cost per row). At half load half
    the jobs arrive while another runs, so even this floor's invert p95 is well above 1.3x a lone invert: for
    Poisson arrivals of equal jobs at half load (M/D/1, simulated) its p95 is 3.0x the lone time. Its throughput is
    taken as the run's is: jobs over the time from the first sent to the last answered."""
    free, latencies = 0.0, {}
    for sent, kind in arrivals:
        free = max(free, sent) + lone[kind]
        latencies.setdefault(kind, []).append(free - sent)
    out: dict = {kind: percentiles(lat) for kind, lat in latencies.items()}
    out["throughput"] = len(arrivals) / (free - arrivals[0][0])
    return out


async def in_flight(bench: Bench, n: int, every: float = 1.0) -> dict:
    """`n` inversions at once, then, a second later (the engine has claimed them), one "stronger" every `every`
    seconds until the last inversion is answered: the strongers' n, p50, p95, and the fewest inversions still
    unanswered when a stronger was."""
    inverts = await asyncio.gather(*(bench.send("invert", i % bench.users) for i in range(n)))
    await asyncio.sleep(1.0)
    strongers, unanswered = [], []
    while not all(j in bench.answered for j in inverts):
        job = await bench.send("stronger", (n + len(strongers)) % bench.users)
        strongers.append(job)
        await bench.wait([job])
        unanswered.append(sum(j not in bench.answered for j in inverts))
        await asyncio.sleep(max(0.0, every - bench.latency(job)))
    while unanswered and unanswered[-1] == 0:  # answered after the last inversion: not while any was in flight
        unanswered.pop()
        strongers.pop()
    stats = percentiles([bench.latency(j) for j in strongers])
    if stats is None:
        return {"n": 0}
    return dict(zip(("n", "p50", "p95"), stats), in_flight=min(unanswered),
                invert_s=max(bench.latency(j) for j in inverts))


def auto_or_count(value: str) -> str | int:
    return value if value == "auto" else int(value)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    ap.add_argument("--rate", default="auto", help="commands per second, or auto (half of one engine's capacity)")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--mix", default="invert=0.6,edit=0.25,stronger=0.15")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", choices=["tiny", "ffhq-256"], default="tiny",
                    help="the built-in tiny model, or the ffhq-256 architecture with random weights")
    ap.add_argument("--invert-steps", type=int, help="shorter inversions (default: the recipe's CPU preset)")
    ap.add_argument("--edit-steps", type=int, help="shorter edits (default: the edit recipe's steps)")
    ap.add_argument("--max-active", default="auto", type=auto_or_count,
                    help="the engine's [engine] max_active: auto or a number")
    ap.add_argument("--in-flight", type=int, default=8, help="inversions in flight for the stronger test (0: skip)")
    ap.add_argument("--encoder", action="store_true",
                    help="the engine answers /invert first with an encoder of the model (untrained: a pass costs the "
                         "same); prints the first answers' times as \"invert first\"")
    args = ap.parse_args()
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    steps = f"invert steps {args.invert_steps or 'as the recipe'}, edit steps {args.edit_steps or 'as the recipe'}"
    print(f"CPU threads {os.cpu_count()}, model {args.model}, {steps}, max_active {args.max_active}; mix {mix}",
          flush=True)

    async with Bench(args) as bench:
        lone = await lone_times(bench, list(mix))
        print("lone jobs: " + ", ".join(f"{k} {v:.2f} s" for k, v in lone.items()), flush=True)
        if args.rate == "auto":
            service = sum(mix[k] * lone[k] for k in mix) / sum(mix.values())
            args.rate = f"{0.5 / service:.3f}"
            print(f"rate: {args.rate} commands/s (half of one engine's capacity, from the lone times)")
        result = await load(bench, mix, float(args.rate), args.duration, args.seed)
        flight = await in_flight(bench, args.in_flight) if args.in_flight else None
        if bench.failed:
            print(f"  {len(bench.failed)} failed: {bench.failed[:3]}")

    floor = one_at_a_time(result["arrivals"], lone)  # the same arrivals, each alone at its lone time, back to back
    print(f"\n{'kind':12} {'served by':12} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'p95 / lone':>10}")
    for kind in [*mix, *(["invert first"] if args.encoder and "invert" in mix else [])]:
        for name, table in (("engine", result), ("one-by-one", floor)):
            if table.get(kind):
                n, p50, p95 = table[kind]
                print(f"{kind:12} {name:12} {n:4d} {p50:7.2f} {p95:7.2f} {p95 / lone[kind]:10.2f}")
    print("(one-by-one: each job of the run alone at its lone time, back to back in the order sent)")
    e, f = result["throughput"], floor["throughput"]
    print(f"throughput: engine {e:.3f} jobs/s, one-by-one {f:.3f} jobs/s (ratio {e / f:.2f})")
    if flight is not None and flight["n"]:
        print(f"stronger while {args.in_flight} inversions were in flight: n {flight['n']}, p50 {flight['p50']:.2f} s, "
              f"p95 {flight['p95']:.2f} s; at least {flight['in_flight']} still unanswered at each answer; the last "
              f"inversion took {flight['invert_s']:.1f} s")
    elif flight is not None:
        print(f"stronger while {args.in_flight} inversions were in flight: none answered while they ran")

if __name__ == "__main__":
    asyncio.run(main())
