"""Seed recipe vs default recipe on self-inversion: targets rendered by the generator from known latents.

    python benchmarks/invert.py [--model tiny,stylegan1-tiny] [--targets 4] [--device cpu]

For each recipe and several step budgets it prints the mean final PSNR and seconds; "steps to reach" is the
smallest budget whose mean PSNR reaches the seed recipe's final PSNR at its full 1500 steps. The default recipe's
goal: get there in at most a quarter of the seed's steps (375), and reach at least 30 dB on `tiny`. Several
models (comma-separated) run one after the other: both generator families' tiny presets by default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its queue.py would shadow the stdlib

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.images import to_uint8  # noqa: E402
from engine.invert import invert  # noqa: E402
from engine.registry import WeightsCache, load_model, load_vgg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny,stylegan1-tiny", help="model name(s), comma-separated")
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-dir", default="~/.cache/stylebot/weights")
    args = ap.parse_args()

    cache = WeightsCache(args.weights_dir)
    for i, name in enumerate(args.model.split(",")):
        if i:
            print()
        run_model(name, cache, args)


def run_model(name: str, cache: WeightsCache, args: argparse.Namespace) -> None:
    G = load_model(name, cache, device=args.device)
    vgg, warning = load_vgg(cache, G)
    print(f"model {G.model_id} ({G.img_resolution} px) on {args.device}, {torch.get_num_threads()} threads"
          + (f"; {warning}" if warning else ""))
    torch.manual_seed(1234)
    with torch.no_grad():
        z = torch.randn(args.targets, G.z_dim, device=args.device)
        targets = to_uint8(G.synthesis(G.mapping(z, None, truncation_psi=0.7)))

    budgets = {"seed": [375, 750, 1500], "default": [50, 100, 200, 375]}
    results: dict[str, list[tuple[int, float, float]]] = {}
    print(f"{'recipe':8} {'steps':>6} {'PSNR dB':>8} {'min':>6} {'seconds':>8}")
    for recipe, steps_list in budgets.items():
        for steps in steps_list:
            t0 = time.perf_counter()
            r = invert(G, vgg, targets, recipe=recipe, steps=steps)
            seconds = time.perf_counter() - t0
            results.setdefault(recipe, []).append((steps, float(np.mean(r.psnr)), seconds))
            print(f"{recipe:8} {steps:6d} {np.mean(r.psnr):8.2f} {min(r.psnr):6.2f} {seconds:8.1f}", flush=True)

    goal = results["seed"][-1][1]
    print(f"\nseed recipe, 1500 steps: {goal:.2f} dB")
    for recipe, rows in results.items():
        reached = next(((s, sec) for s, p, sec in rows if p >= goal), None)
        print(f"{recipe:8} reaches it: " + (f"at {reached[0]} steps ({reached[1]:.1f} s)" if reached else "not within "
                                              f"{rows[-1][0]} steps (best {max(p for _, p, _ in rows):.2f} dB)"))


if __name__ == "__main__":
    main()
