"""The fast GPU path, measured with the engine's own pool, generator, VGG16 loss and CLIP (random weights): ms per
inversion step at batch 1, ms per sample-step in a pool of 8, and ms per edit step at batch 1, for each arithmetic
path (`[engine] precision` / `compile`); then the bf16 quality guard: self-inversion PSNR (targets the generator drew
from known latents, the same steps) of fp32 against bf16.

    python benchmarks/gpu.py [--model tiny|ffhq-256|ffhq-1024] [--device auto|cpu|cuda] [--steps 20]
                             [--guard-steps 375] [--clip ViT-B-32|tiny] [--nvidia-ref /tmp/stylegan2-ada-pytorch]

Defaults: on CUDA the ffhq-1024 architecture, full VGG16 and ViT-B-32; on a CPU `tiny`, VGG16 at 1/8 width and the
tiny CLIP. Paths: fp32; tf32 + cudnn.benchmark (CUDA only: on a CPU it is fp32); bf16 autocast; bf16 + torch.compile
with CUDA graphs over the pool sizes 1-8 (CUDA only). `--nvidia-ref` times NVIDIA's stylegan2-ada-pytorch generator
(its custom CUDA ops and fp16 layers on a GPU; reference ops, float32 on a CPU) in the same pool, side by side: give
a local clone (`git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/stylegan2-ada-pytorch`; its dnnlib
imports `requests`: pip install requests). Its code is imported from there, never copied.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its queue.py would shadow the stdlib

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.device import compile_synthesis, configure_backends, pool_sizes  # noqa: E402
from engine.edit import TINY_CLIP, ClipScorer  # noqa: E402
from engine.images import to_uint8  # noqa: E402
from engine.invert import invert  # noqa: E402
from engine.perceptual import load_vgg16  # noqa: E402
from engine.registry import ModelEntry, build_builtin, registry_entries  # noqa: E402
from engine.scheduler import OptimisationPool  # noqa: E402

ARCHS = {"ffhq-1024": {}, "ffhq-256": {"img_resolution": 256, "channel_base": 16384}}  # official, random weights
POOL = 8


def build(name: str, device: torch.device):
    entry = registry_entries()[name] if name not in ARCHS else ModelEntry(name=name, arch=ARCHS[name])
    return build_builtin(entry).to(device)


def feature_vgg(G, device: torch.device):
    """VGG16 for inverting with G: width 1/8 beside the 32 px built-ins (as the engine loads it), else full width."""
    return load_vgg16(width=0.125 if G.img_resolution <= 64 else 1.0).to(device)


def nvidia_generator(path: Path, G, device: torch.device):
    """NVIDIA's Generator with G's architecture and weights (the parameter names are the same)."""
    sys.path.insert(0, str(path))
    from training.networks import Generator

    c = G.cfg
    ref = Generator(z_dim=c.z_dim, c_dim=c.c_dim, w_dim=c.w_dim, img_resolution=c.img_resolution,
                    img_channels=c.img_channels,
                    mapping_kwargs=dict(num_layers=c.mapping_layers, lr_multiplier=c.mapping_lr_multiplier),
                    synthesis_kwargs=dict(channel_base=c.channel_base, channel_max=c.channel_max,
                                          conv_clamp=c.conv_clamp, num_fp16_res=4 if device.type == "cuda" else 0))
    ref.load_state_dict(G.state_dict())
    return ref.eval().requires_grad_(False).to(device)


def ms_per_tick(G, vgg, clip, targets, *, kind: str, rows: int, precision: str, synthesis, steps: int) -> float:
    """Median ms of one tick of a pool of `rows` inversions (or edits), after three ticks of warm-up."""
    pool = OptimisationPool(G, vgg=vgg, clip=clip, precision=precision, synthesis=synthesis)
    for i in range(rows):
        if kind == "invert":
            pool.add_inversion(i, targets[i % len(targets)], steps=10**6)
        else:
            pool.add_edit(i, G.mapping.w_avg.reshape(1, -1).repeat(G.num_ws, 1), "a really angry face", steps=10**6)
    times = []
    for _ in range(3 + steps):
        t0 = time.perf_counter()
        pool.tick()  # ends reading the losses back: synchronised
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times[3:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="tiny, ffhq-256 or ffhq-1024 (architectures, random weights); default by device")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20, help="timed ticks per case (median)")
    ap.add_argument("--guard-steps", type=int, default=375, help="inversion steps of the bf16 quality guard (0: skip)")
    ap.add_argument("--guard-targets", type=int, default=4)
    ap.add_argument("--clip", help="open_clip architecture (random weights) or 'tiny'; default by device")
    ap.add_argument("--nvidia-ref", type=Path, help="local clone of NVlabs/stylegan2-ada-pytorch to time beside")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    G = build(args.model or ("ffhq-1024" if cuda else "tiny"), device)
    vgg = feature_vgg(G, device)
    clip_name = args.clip or ("ViT-B-32" if cuda else "tiny")
    clip = ClipScorer(TINY_CLIP if clip_name == "tiny" else clip_name, None, device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        known = G.mapping(torch.randn(max(POOL, args.guard_targets), G.z_dim, device=device), None, truncation_psi=0.7)
        targets = to_uint8(G.synthesis(known, noise_mode="const"))
    label = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {label}; model {G.model_id} ({G.img_resolution} px), VGG16 width "
          f"{vgg.width}, CLIP {clip.name}; median of {args.steps} ticks")
    print(f"{'path':34} {'invert b1 ms/step':>18} {f'pool of {POOL} ms/sample-step':>27} {'edit b1 ms/step':>16}")

    def row(name: str, gen, precision: str, compiled: bool = False) -> None:
        configure_backends(device, precision)
        synthesis = compile_synthesis(gen, pool_sizes(POOL), precision) if compiled else None
        cells = [ms_per_tick(gen, vgg, clip, targets, kind="invert", rows=1, precision=precision, synthesis=synthesis,
                             steps=args.steps),
                 ms_per_tick(gen, vgg, clip, targets, kind="invert", rows=POOL, precision=precision,
                             synthesis=synthesis, steps=args.steps) / POOL,
                 ms_per_tick(gen, vgg, clip, targets, kind="edit", rows=1, precision=precision, synthesis=synthesis,
                             steps=args.steps)]
        print(f"{name:34} {cells[0]:18.1f} {cells[1]:27.1f} {cells[2]:16.1f}", flush=True)

    row("fp32", G, "fp32")
    if cuda:
        row("tf32 + cudnn.benchmark", G, "tf32")
    else:
        print(f"{'tf32 + cudnn.benchmark':34} {'(CUDA only: on a CPU it is fp32)':>18}")
    row("bf16 autocast", G, "bf16")
    if cuda:
        row("bf16 autocast + torch.compile", G, "bf16", compiled=True)
    else:
        print(f"{'bf16 autocast + torch.compile':34} {'(CUDA only: compile = auto is off on a CPU)':>18}")
    if args.nvidia_ref:
        ref = nvidia_generator(args.nvidia_ref, G, device)
        row("NVIDIA reference" + (", tf32 + cudnn.benchmark" if cuda else ", fp32"), ref, "tf32" if cuda else "fp32")

    if not args.guard_steps:
        return
    psnr = {}
    for precision in ("fp32", "bf16"):
        configure_backends(device, precision)
        result = invert(G, vgg, targets[:args.guard_targets], steps=args.guard_steps, precision=precision)
        psnr[precision] = float(np.mean(result.psnr))
    diff = psnr["bf16"] - psnr["fp32"]
    print(f"bf16 quality guard: self-inversion PSNR over {args.guard_targets} targets, {args.guard_steps} steps: "
          f"fp32 {psnr['fp32']:.2f} dB, bf16 {psnr['bf16']:.2f} dB, difference {diff:+.2f} dB: "
          f"{'within' if abs(diff) <= 0.3 else 'NOT within'} 0.3 dB")


if __name__ == "__main__":
    main()
