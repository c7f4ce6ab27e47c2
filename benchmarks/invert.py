"""Convergence of the inversion recipes on self-inversions: targets the generator drew from known latents.

    python benchmarks/invert.py [--model tiny,stylegan1-tiny] [--targets 4] [--device cpu] [--recipes ...]

For each recipe and step budget (each budget is a full run with its own schedule) it prints the mean PSNR of the
reconstruction against the target as every later render shows it (the model's constant noise), the seconds the run
took and, for the projector recipes, the PSNR with the noise maps that the run optimised (what dropping them costs).
These curves justify the CPU preset of the default recipe, "seed": the smallest budget within 1 dB of its full 1500
steps on both tiny presets (750; within 0.5 dB there would be no preset: stylegan1-tiny loses 0.69 dB at 750).

The built-in models have random weights (their faces are not faces) and zero noise strengths, as a freshly built
StyleGAN has; `--noise-strength` gives every noise layer that strength so that the noise maps matter, as in a
trained model, and the targets are drawn with random noise (`--target-noise`), as a photo has noise that no
recipe's maps hold. Quality claims rest on the recipes' published numbers (README), not on these curves.
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
from engine.invert import PROJECTORS, RECIPES, invert, psnr  # noqa: E402
from engine.lpips import load_lpips  # noqa: E402
from engine.projector import noise_maps, project, renormalize_  # noqa: E402
from engine.registry import WeightsCache, load_model, load_vgg  # noqa: E402

BUDGETS = {"seed": [100, 200, 375, 750, 1500], "lpips-like": [100, 375], "projector": [250, 1000],
           "projector-w+": [50, 100, 250, 500, 1000]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny,stylegan1-tiny", help="model name(s), comma-separated")
    ap.add_argument("--recipes", default=",".join(BUDGETS), help="recipes, comma-separated")
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--noise-strength", type=float, default=0.3, help="every noise layer's strength (0: as built)")
    ap.add_argument("--target-noise", choices=["random", "const"], default="random",
                    help="the targets' noise: random (fair: no recipe has it) or the model's constant maps (which the "
                         "recipes that render with them can reproduce exactly)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-dir", default="~/.cache/stylebot/weights")
    args = ap.parse_args()

    cache = WeightsCache(args.weights_dir)
    for i, name in enumerate(args.model.split(",")):
        if i:
            print()
        run_model(name, cache, args)


def with_noise_strength(G, strength: float):
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith(("noise_strength", "noise.weight")):
                p.fill_(strength)
    return G


def run_model(name: str, cache: WeightsCache, args: argparse.Namespace) -> None:
    G = with_noise_strength(load_model(name, cache, device=args.device), args.noise_strength)
    print(f"model {G.model_id} ({G.img_resolution} px) on {args.device}, {torch.get_num_threads()} threads, "
          f"noise strength {args.noise_strength}, {args.targets} targets with {args.target_noise} noise")
    torch.manual_seed(1234)
    with torch.no_grad():
        z = torch.randn(args.targets, G.z_dim, device=args.device)
        targets = to_uint8(G.synthesis(G.mapping(z, None, truncation_psi=0.7), noise_mode=args.target_noise))
    print(f"{'recipe':13} {'steps':>6} {'PSNR dB':>8} {'min':>6} {'own noise':>10} {'seconds':>8}")
    for recipe in args.recipes.split(","):
        full_width = recipe in PROJECTORS
        vgg, warning = load_vgg(cache, G, full_width=full_width)
        if warning:
            print(f"  ({warning})")
        for steps in BUDGETS[recipe]:
            t0 = time.perf_counter()
            own = ""
            if full_width:
                trail: list = []
                ws, images, _ = project(G, load_lpips(vgg), targets, steps=steps, recipe=PROJECTORS[recipe],
                                        trail=trail)
                scores = [psnr(a, b) for a, b in zip(images, targets)]
                own = f"{np.mean(with_own_noise(G, ws, trail[-1][1:], targets)):10.2f}"
            else:
                scores = invert(G, vgg, targets, recipe=recipe, steps=steps).psnr
            seconds = time.perf_counter() - t0
            print(f"{recipe:13} {steps:6d} {np.mean(scores):8.2f} {min(scores):6.2f} {own:>10} {seconds:8.1f}",
                  flush=True)


def with_own_noise(G, ws: torch.Tensor, maps: list[torch.Tensor], targets: np.ndarray) -> list[float]:
    """PSNR of renders with the noise maps the projection optimised (renormalised as after its last step)."""
    maps = [m.detach().clone() for m in maps]
    renormalize_(maps)
    with torch.no_grad(), noise_maps(G, maps):
        images = to_uint8(G.synthesis(ws.to(G.mapping.w_avg.device), noise_mode="const"))
    return [psnr(a, b) for a, b in zip(images, targets)]


if __name__ == "__main__":
    assert set(BUDGETS) == set(RECIPES), "every recipe has budgets here"
    main()
