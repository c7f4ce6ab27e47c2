"""Could latents be stored as float16 (half the bytes)? The rendered difference, measured.

    python benchmarks/latent_fp16.py [--model tiny|ffhq-256|ffhq-1024] [--n 8]

For `--n` latents (w from random z through the mapping network, plus a W+ latent with per-layer offsets as an
inversion leaves it), renders the image from the float32 latent and from the same latent rounded to float16, and
prints the PSNR between the two renders (on [-1, 1] mapped to 8-bit range), the largest pixel difference in 8-bit
steps, and the latent's relative rounding error. Random weights (no pretrained ones can be fetched here): a
trained generator is smoother in w than a random one, so this errs on the side of showing a difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402


def build(name: str):
    from engine import stylegan2
    from engine.registry import build_builtin, registry_entries

    if name == "ffhq-1024":
        return stylegan2.Generator(stylegan2.StyleGAN2Config(), model_id=name).eval()
    if name == "ffhq-256":
        return stylegan2.Generator(stylegan2.StyleGAN2Config(img_resolution=256), model_id=name).eval()
    return build_builtin(registry_entries()[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    G = build(args.model).requires_grad_(False)
    with torch.no_grad():
        ws = G.mapping(torch.randn(args.n, G.z_dim), None)
        ws = ws + 0.3 * torch.randn_like(ws)  # per-layer offsets, as W+ inversions have
        half = ws.half().float()
        a = (G.synthesis(ws, noise_mode="const").clamp(-1, 1) + 1) * 127.5
        b = (G.synthesis(half, noise_mode="const").clamp(-1, 1) + 1) * 127.5
    mse = ((a - b) ** 2).flatten(1).mean(1)
    psnr = 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-12))
    rel = ((ws - half).norm() / ws.norm()).item()
    print(f"model {args.model} ({G.img_resolution} px), {args.n} latents: float16 rounding moves the latent by "
          f"{rel:.1e} of its norm; render PSNR float32 vs float16: min {psnr.min():.1f} dB, median "
          f"{psnr.median():.1f} dB; largest pixel difference {(a - b).abs().max():.2f} of 255")


if __name__ == "__main__":
    main()
