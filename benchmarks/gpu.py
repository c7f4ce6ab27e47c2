"""The fast GPU path, measured with the engine's own pool, generator, VGG16 loss and CLIP (random weights): ms per
inversion step at batch 1, ms per sample-step in a pool of 8, and ms per edit step at batch 1, for each arithmetic
path (`[engine] precision` / `compile`); then the bf16 quality guard: self-inversion PSNR (targets the generator drew
from known latents, the same steps) of fp32 against bf16.

    python benchmarks/gpu.py [--model tiny|ffhq-256|ffhq-1024] [--device auto|cpu|cuda] [--steps 20]
                             [--guard-steps 375] [--clip ViT-B-32|tiny] [--nvidia-ref /tmp/stylegan2-ada-pytorch]
                             [--paths fp32,tf32,max_active,bf16,nvidia,guard,bf16-compile,tf32-compile]
                             [--compile-sizes 1,2,4,8]

Defaults: on CUDA the ffhq-1024 architecture, full VGG16 and ViT-B-32; on a CPU `tiny`, VGG16 at 1/8 width and the
tiny CLIP. Paths: fp32; tf32 + cudnn.benchmark (CUDA only); the rows `max_active = "auto"` takes (CUDA only); bf16
autocast; bf16 or tf32 + torch.compile with CUDA graphs over `--compile-sizes` (CUDA only, run last: compiling takes
minutes). Each stage that fails prints its error
and the next one runs; the table is printed again at the end. `--nvidia-ref` times NVIDIA's stylegan2-ada-pytorch
generator (its custom CUDA ops and fp16 layers on a GPU; reference ops, float32 on a CPU) in the same pool, side by
side, and prints how far its images are from ours in float32 and whether its custom ops loaded. Give a local clone
(`git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/stylegan2-ada-pytorch`; its dnnlib imports
`requests`). On recent PyTorch its ops load only once `torch_utils/custom_ops.py`'s `get_plugin` keeps the module
that `torch.utils.cpp_extension.load` returns instead of importing it by name (a change to your clone). Its code is
imported from there, never copied.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
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
from engine.pool import OptimisationPool, auto_max_active  # noqa: E402

ARCHS = {"ffhq-1024": {}, "ffhq-256": {"img_resolution": 256, "channel_base": 16384}}  # official, random weights
POOL = 8
# what --paths can run, in this order; tf32, max_active and the compiled paths run on CUDA only
PATHS = ("fp32", "tf32", "max_active", "bf16", "nvidia", "guard", "bf16-compile", "tf32-compile")


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
    ap.add_argument("--paths", default=",".join(PATHS), help=f"which to run, of {','.join(PATHS)} (default all)")
    ap.add_argument("--compile-sizes", default=",".join(map(str, pool_sizes(POOL))),
                    help="pool sizes the compiled paths are compiled for (the engine: powers of two up to max_active)")
    ap.add_argument("--nvidia-ref", type=Path, help="local clone of NVlabs/stylegan2-ada-pytorch to time beside")
    args = ap.parse_args()
    if unknown := set(args.paths.split(",")) - set(PATHS):
        ap.error(f"unknown --paths {', '.join(sorted(unknown))}: choose from {', '.join(PATHS)}")
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
          f"{vgg.width}, CLIP {clip.name}; median of {args.steps} ticks", flush=True)
    rows: dict[str, list[float]] = {}
    header = f"{'path':40} {'invert b1 ms/step':>18} {f'pool of {POOL} ms/sample-step':>27} {'edit b1 ms/step':>16}"

    def row(name: str, gen, precision: str, compiled: bool = False) -> None:
        configure_backends(device, precision)
        synthesis = compile_synthesis(gen, sizes, precision) if compiled else None
        cells = [ms_per_tick(gen, vgg, clip, targets, kind="invert", rows=1, precision=precision, synthesis=synthesis,
                             steps=args.steps),
                 ms_per_tick(gen, vgg, clip, targets, kind="invert", rows=POOL, precision=precision,
                             synthesis=synthesis, steps=args.steps) / POOL,
                 ms_per_tick(gen, vgg, clip, targets, kind="edit", rows=1, precision=precision, synthesis=synthesis,
                             steps=args.steps)]
        rows[name] = cells
        print(f"{name:40} {cells[0]:18.1f} {cells[1]:27.1f} {cells[2]:16.1f}", flush=True)

    def guarded(stage: str, fn) -> None:
        """One stage; a failure is printed and the next stage runs (a GPU lease is too short to rerun them all)."""
        started = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - reported, and the other measurements still come back
            print(f"{stage} FAILED:\n{traceback.format_exc()}", flush=True)
        print(f"({stage}: {time.perf_counter() - started:.0f} s)", flush=True)

    def nvidia_row(name: str) -> None:
        ref = nvidia_generator(args.nvidia_ref, G, device)
        configure_backends(device, "fp32")
        with torch.no_grad():  # the same function: NVIDIA's generator in float32 against ours
            ws = known[:2]
            ours = G.synthesis(ws, noise_mode="const")
            theirs = ref.synthesis(ws, noise_mode="const", force_fp32=True)
        row(name, ref, "tf32" if cuda else "fp32")
        from torch_utils.ops import bias_act, upfirdn2d  # NVIDIA's, from --nvidia-ref

        plugins = {"bias_act": bias_act._plugin is not None, "upfirdn2d": upfirdn2d._plugin is not None}
        print(f"NVIDIA's generator against ours, float32, same ws: largest difference "
              f"{(ours - theirs).abs().max().item():.2e} (images span {ours.abs().max().item():.2f}); its custom "
              f"CUDA ops loaded: {plugins}", flush=True)

    def quality_guard() -> None:
        psnr = {}
        for precision in ("fp32", "bf16"):
            configure_backends(device, precision)
            result = invert(G, vgg, targets[:args.guard_targets], steps=args.guard_steps, precision=precision)
            psnr[precision] = float(np.mean(result.psnr))
        diff = psnr["bf16"] - psnr["fp32"]
        print(f"bf16 quality guard: self-inversion PSNR over {args.guard_targets} targets, {args.guard_steps} steps: "
              f"fp32 {psnr['fp32']:.2f} dB, bf16 {psnr['bf16']:.2f} dB, difference {diff:+.2f} dB: "
              f"{'within' if abs(diff) <= 0.3 else 'NOT within'} 0.3 dB", flush=True)

    print(header, flush=True)
    wanted = set(args.paths.split(","))
    sizes = tuple(int(n) for n in args.compile_sizes.split(","))
    reference = "NVIDIA reference" + (" (custom ops, fp16 layers), tf32" if cuda else ", fp32")
    stages = {
        "fp32": lambda: row("fp32", G, "fp32"),
        "tf32": lambda: row("tf32 + cudnn.benchmark", G, "tf32"),
        "max_active": lambda: print(f"max_active = \"auto\" here: {auto_max_active(G, vgg, precision='tf32')} rows",
                                    flush=True),
        "bf16": lambda: row("bf16 autocast", G, "bf16"),
        "nvidia": lambda: nvidia_row(reference),
        "guard": quality_guard,
        # last: compiling takes minutes
        "bf16-compile": lambda: row("bf16 autocast + torch.compile", G, "bf16", compiled=True),
        "tf32-compile": lambda: row("tf32 + torch.compile (CUDA's default)", G, "tf32", compiled=True),
    }
    skip = {"tf32": not cuda, "max_active": not cuda, "nvidia": not args.nvidia_ref, "guard": not args.guard_steps,
            "bf16-compile": not cuda, "tf32-compile": not cuda}
    for stage in PATHS:
        if stage in wanted and not skip.get(stage):
            guarded(stage, stages[stage])

    print("\n" + header)
    for name, cells in rows.items():
        print(f"{name:40} {cells[0]:18.1f} {cells[1]:27.1f} {cells[2]:16.1f}")
    if reference in rows:
        ref = rows[reference]
        for name, cells in rows.items():
            if name != reference:
                print(f"{name}: {ref[0] / cells[0]:.2f}x NVIDIA's step at batch 1, {ref[1] / cells[1]:.2f}x at a "
                      f"pool of {POOL}")


if __name__ == "__main__":
    main()
