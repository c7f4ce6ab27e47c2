"""Throughput of batched inversion: 8 targets in one forward/backward pass vs 8 runs one after another.

    python benchmarks/batch.py [--model tiny] [--steps 100] [--n 8] [--device cpu]

Also times one edit step and one morph frame. Goal for inversion: batched at least 1.3x faster on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its queue.py would shadow the stdlib

import torch  # noqa: E402

from engine.edit import TINY_CLIP, ClipScorer, edit  # noqa: E402
from engine.images import to_uint8  # noqa: E402
from engine.invert import invert  # noqa: E402
from engine.morph import morph  # noqa: E402
from engine.registry import WeightsCache, load_model, load_vgg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clip", default=TINY_CLIP)
    ap.add_argument("--weights-dir", default="~/.cache/stylebot/weights")
    args = ap.parse_args()

    cache = WeightsCache(args.weights_dir)
    G = load_model(args.model, cache, device=args.device)
    vgg, _ = load_vgg(cache, G)
    torch.manual_seed(0)
    with torch.no_grad():
        ws = G.mapping(torch.randn(args.n, G.z_dim, device=args.device), None, truncation_psi=0.7)
        targets = to_uint8(G.synthesis(ws))
    print(f"model {G.model_id} ({G.img_resolution} px) on {args.device}, {torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    invert(G, vgg, targets, steps=args.steps)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.n):
        invert(G, vgg, targets[i:i + 1], steps=args.steps)
    serial = time.perf_counter() - t0
    print(f"invert x{args.n}, {args.steps} steps: batched {batched:.1f} s, one by one {serial:.1f} s, "
          f"speed-up {serial / batched:.2f}x")

    clip = ClipScorer(args.clip, "openai", device=args.device)
    for n in (1, args.n):
        t0 = time.perf_counter()
        edit(G, clip, ws[:n], "really angry face", steps=20)
        print(f"edit step, batch {n}: {1000 * (time.perf_counter() - t0) / 20:.1f} ms")
    t0 = time.perf_counter()
    frames = morph(G, ws[0], ws[1], frames=24, pingpong=False)
    print(f"morph frame: {1000 * (time.perf_counter() - t0) / len(frames):.1f} ms")


if __name__ == "__main__":
    main()
