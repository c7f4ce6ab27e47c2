"""Time per edit step and per morph frame, on `tiny` and on the ffhq-1024 architecture (random weights: the cost of a
step does not depend on the weights), with the tiny CLIP and with ViT-B-32 (open_clip's architecture, random weights).

    python benchmarks/edit_morph.py [--device cpu] [--steps 3] [--frames 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its queue.py would shadow the stdlib

import torch  # noqa: E402

from engine.edit import TINY_CLIP, ClipScorer, edit  # noqa: E402
from engine.morph import morph  # noqa: E402
from engine.registry import build_builtin, registry_entries  # noqa: E402
from engine.stylegan2 import Generator, StyleGAN2Config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="edit steps timed on ffhq-1024 (tiny: 10x as many)")
    ap.add_argument("--frames", type=int, default=4, help="morph frames timed on ffhq-1024 (tiny: 6x as many)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    cases = [("tiny", build_builtin(registry_entries()["tiny"]).to(dev), TINY_CLIP, 10, 6),
             ("ffhq-1024", Generator(StyleGAN2Config(), model_id="ffhq-1024").eval().to(dev), "ViT-B-32", 1, 1)]
    for name, G, clip_name, more_steps, more_frames in cases:
        clip = ClipScorer(clip_name, None, device=dev)
        with torch.no_grad():
            ws = G.mapping(torch.randn(2, G.z_dim, device=dev), None, truncation_psi=0.7)
        steps, frames = args.steps * more_steps, args.frames * more_frames
        edit(G, clip, ws[:1], "really angry face", steps=1)  # warm-up
        t0 = time.perf_counter()
        edit(G, clip, ws[:1], "really angry face", steps=steps)
        step_ms = 1000 * (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        video = morph(G, ws[0], ws[1], frames=frames, pingpong=False)
        frame_ms = 1000 * (time.perf_counter() - t0) / len(video)
        peak = f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev.type == "cuda" else ""
        print(f"{name} + {clip_name}: edit step {step_ms:.0f} ms (batch 1, {steps} steps), "
              f"morph frame {frame_ms:.0f} ms ({frames} frames){peak}")


if __name__ == "__main__":
    main()
