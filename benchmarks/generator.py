"""Generator speed and memory: ms per image for the tiny presets and the FFHQ 1024 architectures (random weights)
of both families: StyleGAN2 (`ffhq-1024`) and StyleGAN1 (`stylegan1-ffhq`).

    python benchmarks/generator.py [--device cpu|cuda] [--models tiny,ffhq-1024,stylegan1-tiny,stylegan1-ffhq]
                                   [--batches 1,8] [--backward]

Each case runs in its own process so that its peak memory (RSS on the CPU, allocator peak on a GPU) is its own.
Timings are the median of `--repeats` runs after one warm-up; synthesis uses noise_mode='const'.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its queue.py would shadow the stdlib


def build(name: str):
    from engine import stylegan1, stylegan2
    from engine.registry import build_builtin, registry_entries

    if name == "ffhq-1024":  # the official architecture, random weights
        return stylegan2.Generator(stylegan2.StyleGAN2Config(), model_id=name).eval()
    if name == "stylegan1-ffhq":
        return stylegan1.Generator(stylegan1.StyleGAN1Config(), model_id=name).eval()
    return build_builtin(registry_entries()[name])


def run_case(name: str, batch: int, device: str, repeats: int, backward: bool) -> dict:
    import torch

    G = build(name).to(device).requires_grad_(False)
    ws = G.mapping.w_avg.repeat(batch, G.num_ws, 1).clone()

    def once() -> float:
        x = ws.clone().requires_grad_(backward)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            img = G.synthesis(x, noise_mode="const")
            if backward:
                img.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [once() for _ in range(repeats)]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"model": name, "batch": batch, "device": device, "pass": "fwd+bwd" if backward else "fwd",
            "ms_per_image": 1000 * statistics.median(times) / batch, "peak_mib": peak,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default="tiny,ffhq-1024,stylegan1-tiny,stylegan1-ffhq")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward w.r.t. ws (inversion cost)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case:
        name, batch, device, backward = json.loads(args.case)
        print(json.dumps(run_case(name, batch, device, args.repeats, backward)))
        return

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    label = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {label}")
    print(f"{'model':14} {'batch':>5} {'pass':>8} {'ms/image':>10} {'peak MiB':>9}")
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for backward in ([False, True] if args.backward else [False]):
                case = json.dumps([name, batch, device, backward])
                p = subprocess.run([sys.executable, __file__, "--case", case, "--repeats", str(args.repeats)],
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    why = "killed: out of memory?" if p.returncode == -9 else p.stderr.strip().splitlines()[-1:]
                    print(f"{name:14} {batch:5d} {'fwd+bwd' if backward else 'fwd':>8} {why}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"{name:14} {batch:5d} {r['pass']:>8} {r['ms_per_image']:10.1f} {r['peak_mib']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
