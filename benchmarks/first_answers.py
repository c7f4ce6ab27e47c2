"""First answers to /invert: what an encoder trained by `stylebot encoder train` gives at once, and how many steps the
seed recipe's optimisation then needs from its W+ to reach what it reaches from zeros in its full CPU budget.

    python benchmarks/first_answers.py [--model tiny,stylegan1-tiny,ffhq-256] [--targets 4] [--train-minutes 2]
                                       [--steps 750] [--plot docs/images/first-answers.png]

For each model: an e4e encoder is trained for it (as `stylebot encoder train` does, for `--train-minutes`; a file
from an earlier run under `--encoders` is used instead when it holds this generator), self-inversion targets are
drawn as benchmarks/invert.py draws them (known W+, psi 0.7, every noise layer at strength 0.3, targets rendered
with random noise that no recipe can reproduce), and then:
- the encoder's own PSNR (one pass, one render) and the seconds that pass and render take per face;
- the seed recipe from zeros for `--steps` (its CPU preset, 750) and from the encoder's W+ for as many, PSNR after
  every `--every` steps (the previews the loop renders anyway, each step's image before its update);
- the first step at which the run from the encoder reaches the PSNR the run from zeros ends with, and its ratio to
  `--steps` (goal: at most a quarter).
`--plot` draws PSNR against steps, both runs of each model, into one PNG.

The built-in models and the ffhq-256 architecture (as benchmarks/gpu.py builds it) have random weights: these numbers
measure the mechanism (an encoder's start against zeros), not faces; the published encoders' numbers on real faces
are in README.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its queue.py would shadow the stdlib

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.gpu import build, feature_vgg  # noqa: E402
from benchmarks.invert import with_noise_strength  # noqa: E402
from engine.encoder_training import EncoderTrainer, TrainSettings, save_checkpoint  # noqa: E402
from engine.encoders import load_encoder  # noqa: E402
from engine.checkpoints import CheckpointError  # noqa: E402
from engine.handlers.invert import first_guess  # noqa: E402
from engine.images import to_uint8  # noqa: E402
from engine.invert import invert, psnr  # noqa: E402
from engine.lpips import load_lpips  # noqa: E402
from engine.perceptual import load_vgg16  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny,stylegan1-tiny,ffhq-256", help="models, comma-separated")
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--steps", type=int, default=750, help="the seed recipe's steps (its CPU preset: 750)")
    ap.add_argument("--every", type=int, default=10, help="steps between two PSNR points of the curves")
    ap.add_argument("--train-minutes", type=float, default=2.0, help="training of each model's encoder")
    ap.add_argument("--encoders", default="/tmp/stylebot-bench-encoders", help="folder of the trained encoders")
    ap.add_argument("--noise-strength", type=float, default=0.3)
    ap.add_argument("--plot", help="write PSNR against steps to this PNG")
    args = ap.parse_args()
    curves = {}
    for i, name in enumerate(args.model.split(",")):
        if i:
            print()
        curves[name] = run_model(name, args)
    if args.plot:
        draw(curves, args.steps, Path(args.plot))
        print(f"\nwrote {args.plot}")


def run_model(name: str, args) -> dict:
    G = with_noise_strength(build(name, torch.device("cpu")), args.noise_strength)
    G.model_id = name
    encoder = trained_encoder(G, Path(args.encoders) / f"{name}.pt", args.train_minutes)
    torch.manual_seed(1234)
    with torch.no_grad():
        z = torch.randn(args.targets, G.z_dim)
        targets = to_uint8(G.synthesis(G.mapping(z, None, truncation_psi=0.7), noise_mode="random"))
    started = time.perf_counter()
    guesses = [first_guess(encoder, G, t) for t in targets]
    per_face = (time.perf_counter() - started) / len(targets)
    start_ws = torch.stack([ws for ws, _ in guesses])
    encoder_psnr = float(np.mean([psnr(image, t) for (_, image), t in zip(guesses, targets)]))
    print(f"model {name} ({G.img_resolution} px), {args.targets} targets, {torch.get_num_threads()} threads: "
          f"the encoder's face {encoder_psnr:.2f} dB PSNR, {per_face * 1000:.0f} ms a face (one pass + one render)")
    vgg = feature_vgg(G, torch.device("cpu"))
    curves = {}
    for start, init in (("zeros", None), ("encoder", start_ws)):
        points: list[tuple[int, float]] = []

        def preview(step: int, images: np.ndarray) -> None:
            if step % args.every == 0:
                points.append((step, float(np.mean([psnr(a, b) for a, b in zip(images, targets)]))))

        t0 = time.perf_counter()
        result = invert(G, vgg, targets, recipe="seed", steps=args.steps, init_ws=init, preview=preview,
                        preview_every=1)
        points.insert(0, (0, encoder_psnr if init is not None else start_psnr(G, targets)))
        points.append((args.steps, float(np.mean(result.psnr))))
        curves[start] = points
        marks = [s for s in (0, 10, 50, 100, 200, 375) if s < args.steps]
        along = ", ".join(f"{p:.2f} at {s}" for s, p in points if s in marks)
        print(f"  seed recipe from {start:8}: {points[-1][1]:.2f} dB after {args.steps} steps "
              f"({time.perf_counter() - t0:.0f} s; {along})", flush=True)
    goal = curves["zeros"][-1][1]
    reached = next((s for s, p in curves["encoder"] if p >= goal), None)
    if reached is None:
        print(f"  from the encoder: {goal:.2f} dB not reached in {args.steps} steps")
    else:
        print(f"  from the encoder: {goal:.2f} dB (zeros' end) reached after {reached} steps, "
              f"{reached / args.steps:.2f} of {args.steps} (goal: at most 0.25)")
    return curves


def start_psnr(G, targets: np.ndarray) -> float:
    """PSNR of the seed recipe's start (W+ of zeros) rendered."""
    with torch.no_grad():
        image = to_uint8(G.synthesis(torch.zeros(1, G.num_ws, G.w_dim), noise_mode="const"))[0]
    return float(np.mean([psnr(image, t) for t in targets]))


def trained_encoder(G, path: Path, minutes: float):
    """The encoder at `path` if it holds G, else one trained for G for `minutes` (as `stylebot encoder train`:
    LPIPS with a full-width VGG16, default settings) and saved there."""
    try:
        return load_encoder(path, generator=G)
    except (CheckpointError, FileNotFoundError, OSError):
        pass
    trainer = EncoderTrainer(G, load_lpips(load_vgg16(width=1.0)), settings=TrainSettings())
    deadline = time.monotonic() + minutes * 60
    while time.monotonic() < deadline:
        trainer.train_step()
    val = trainer.validate()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(trainer.checkpoint(val_psnr=val), path)
    print(f"trained {G.model_id}'s encoder for {minutes:g} min: {trainer.step} steps, validation {val:.2f} dB "
          f"(the average w: {trainer.baseline_psnr:.2f} dB)")
    return load_encoder(path, generator=G)


COLOURS = [(59, 91, 219), (214, 69, 65), (47, 158, 68), (240, 140, 0), (134, 46, 156), (0, 150, 160)]


def draw(curves: dict[str, dict[str, list[tuple[int, float]]]], steps: int, path: Path) -> None:
    """PSNR (dB) against steps: per model a solid line from the encoder and a dashed one from zeros."""
    w, h, left, right, top, bottom = 900, 520, 70, 230, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [p for model in curves.values() for pts in model.values() for _, p in pts]
    lo, hi = np.floor(min(values)) - 1, np.ceil(max(values)) + 1

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (w - left - right) * step / steps, h - bottom - (h - top - bottom) * (value - lo) / (hi - lo))

    d.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for k in range(0, 11):
        s = steps * k / 10
        x, _ = xy(s, lo)
        d.line([x, h - bottom, x, h - bottom + 5], fill=(120, 120, 120))
        d.text((x - 10, h - bottom + 8), f"{s:.0f}", fill="black")
    for v in np.arange(lo, hi + 0.01, max(1.0, float(np.ceil((hi - lo) / 10)))):
        _, y = xy(0, v)
        d.line([left - 5, y, w - right, y], fill=(230, 230, 230))
        d.text((left - 40, y - 6), f"{v:.0f}", fill="black")
    d.text((left, 12), "self-inversion PSNR (dB) against optimisation steps of the seed recipe, 2 CPU cores, "
                       "random-weight models", fill="black")
    d.text(((w - right + left) / 2 - 20, h - 25), "steps", fill="black")
    for i, (model, runs) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        for start, pts in runs.items():
            line = [xy(s, p) for s, p in pts]
            if start == "encoder":
                d.line(line, fill=colour, width=3)
            else:
                for a, b in zip(line[::2], line[1::2]):  # dashed
                    d.line([a, b], fill=colour, width=2)
        y = top + 10 + 40 * i
        d.line([w - right + 15, y, w - right + 45, y], fill=colour, width=3)
        d.text((w - right + 50, y - 6), f"{model}: from the encoder", fill="black")
        for x0 in range(w - right + 15, w - right + 45, 8):
            d.line([x0, y + 18, x0 + 4, y + 18], fill=colour, width=2)
        d.text((w - right + 50, y + 12), f"{model}: from zeros", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
