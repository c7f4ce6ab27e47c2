"""Regenerate tests/fixtures/invert_parity.safetensors: the seed notebook's own inversion loop, run on tiny networks.

    git clone https://github.com/ChoiDae1/StyleGAN_Project /tmp/StyleGAN_Project
    python scripts/make_invert_parity.py --seed /tmp/StyleGAN_Project

The seed project's `Image2StyleGAN.ipynb` inverts a photo with the StyleGAN1 PyTorch port that it carries
(`PyTorch-StyleGAN-Face-Editting/stylegan_model.py`). This script runs, from the clone (nothing of them is stored
here), that file's `G_synthesis` and the notebook's cells for the VGG16 feature extractor, the loss and the
optimisation loop, with these substitutions, which change what the loop is given, not what it does:
- the generator is the port's `G_synthesis` at our `stylegan1-tiny` architecture (32 px) holding the weights of our
  `stylegan1-tiny` (engine.registry.build_builtin; its noise strengths, zero as built, drawn from NOISE_SEED:
  fingerprints.with_noise_strengths, which the test calls too), with each noise layer's noise fixed to our
  constant noise maps: the proof uses constant noise on both sides (the port draws new noise at every call unless
  `.noise` is set; our `invert(..., noise_mode="random")` does that for users);
- `models.vgg16(pretrained=True)` is our VGG16 of an eighth of the width with random weights (engine.perceptual,
  laid out as torchvision's, so the notebook's indices 1, 3, 13, 20 are the same layers);
- `resolution` is the model's 32 px (the notebook's 1024), so its `Upsample(scale_factor=256 / resolution)`
  upsamples to 256 px here;
- the target is a face the tiny generator drew (uint8, read as `ToTensor` reads a photo: x / 255), in place of
  `image_reader(...)`; `iteration` is STEPS (the notebook's 1500); `np.save` writes into a temporary folder.
The latent and Adam's moments after every optimiser step, and the loss of every step are recorded (CPU, float32).
tests/test_invert_parity.py checks `invert(..., recipe="seed")` and the continuous pool against them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.images import to_uint8  # noqa: E402
from engine.perceptual import load_vgg16  # noqa: E402
from engine.registry import build_builtin, registry_entries  # noqa: E402
from fingerprints import (  # noqa: E402
    RecordingAdam,
    fingerprint,
    source_commit,
    with_noise_strengths,
    write_fixture,
)

OUT = ROOT / "tests" / "fixtures" / "invert_parity.safetensors"
NOTEBOOK = "Image2StyleGAN.ipynb"
PORT = Path("PyTorch-StyleGAN-Face-Editting") / "stylegan_model.py"
CELLS = {"features": 13, "loss": 15, "loop": 17}  # the notebook's code cells that the loop needs, by index
STEPS = 20
VGG_WIDTH, VGG_SEED = 0.125, 11
TARGET_SEED = 5
NOISE_SEED, NOISE_SCALE = 3, 0.5


def notebook_cells(clone: Path) -> dict[str, str]:
    cells = json.loads((clone / NOTEBOOK).read_text())["cells"]
    return {name: "".join(cells[i]["source"]) for name, i in CELLS.items()}


def port_synthesis(clone: Path, G) -> torch.nn.Module:
    """The seed's copy of the port's G_synthesis at G's architecture, holding G's synthesis weights and noise."""
    spec = types.ModuleType("stylegan_model")
    exec(compile((clone / PORT).read_text(), str(clone / PORT), "exec"), spec.__dict__)
    cfg = G.cfg
    synthesis = spec.G_synthesis(dlatent_size=cfg.w_dim, resolution=cfg.img_resolution, fmap_base=cfg.fmap_base,
                                 fmap_max=cfg.fmap_max)
    ours = {k[len("synthesis."):]: v for k, v in G.state_dict().items() if k.startswith("synthesis.")}
    synthesis.load_state_dict(ours, strict=True)
    layers = [m for m in synthesis.modules() if type(m).__name__ == "NoiseLayer"]
    for layer, mine in zip(layers, G.noise_layers(), strict=True):
        layer.noise = mine.noise_const.clone()
    return synthesis.eval()


def run_notebook(clone: Path, G, vgg, target_u8: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The notebook's loop on `target_u8` (uint8 [R, R, 3]): latents and Adam's two moments after every step
    (each [STEPS, 1, num_ws, w_dim]), losses [STEPS]."""
    cells = notebook_cells(clone)
    losses: list[float] = []
    ns: dict = {
        "torch": torch, "nn": torch.nn, "np": np, "OrderedDict": OrderedDict,
        "optim": types.SimpleNamespace(Adam=RecordingAdam),
        "models": types.SimpleNamespace(vgg16=lambda pretrained: vgg),
        "device": "cpu", "resolution": G.img_resolution,
        "g_synthesis": port_synthesis(clone, G),
        "image_reader": lambda path, resize=None: torch.from_numpy(target_u8).permute(2, 0, 1)[None].float() / 255,
        "imshow": lambda tensor: None,
    }
    exec(compile(cells["features"], NOTEBOOK, "exec"), ns)
    exec(compile(cells["loss"], NOTEBOOK, "exec"), ns)
    inner = ns["loss_function"]

    def recording_loss(*args):
        mse, perceptual = inner(*args)
        losses.append(float(mse + perceptual))
        return mse, perceptual

    ns["loss_function"] = recording_loss
    loop = cells["loop"]
    for theirs, ours in (("iteration = 1500", f"iteration = {STEPS}"),
                         ("torch.zeros((1, 18, 512)", f"torch.zeros((1, {G.num_ws}, {G.w_dim})")):
        assert theirs in loop, f"the notebook's loop no longer says {theirs!r}"
        loop = loop.replace(theirs, ours)
    RecordingAdam.trail = []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            exec(compile(loop, NOTEBOOK, "exec"), ns)
        finally:
            os.chdir(cwd)
    return (*RecordingAdam.stacked(), torch.tensor(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", required=True, type=Path, help="local clone of ChoiDae1/StyleGAN_Project")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)

    G = build_builtin(registry_entries()["stylegan1-tiny"])
    built = fingerprint(G)
    with_noise_strengths(G, NOISE_SEED, NOISE_SCALE)
    vgg = load_vgg16(width=VGG_WIDTH, seed=VGG_SEED)
    torch.manual_seed(TARGET_SEED)
    with torch.no_grad():
        target = to_uint8(G.synthesis(G.mapping(torch.randn(1, G.z_dim), None, truncation_psi=0.7)))[0]
    ws, m, v, losses = run_notebook(args.seed, G, vgg, target)
    print(f"seed notebook: {STEPS} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"latent moved {ws[-1].norm():.3f}")

    tensors = {"seed.target": torch.from_numpy(np.ascontiguousarray(target)), "seed.ws": ws[:, 0], "seed.m": m[:, 0],
               "seed.v": v[:, 0], "seed.losses": losses}
    # The networks (2 MB) and the noise strengths are not stored: all are drawn from fixed seeds by our code on
    # torch's CPU generator, which draws the same numbers on every machine; the networks' fingerprints say when a
    # change of ours makes them others.
    meta = {"source": f"ChoiDae1/StyleGAN_Project {source_commit(args.seed)} {NOTEBOOK} cells {CELLS}, {PORT}",
            "model": "stylegan1-tiny", "noise_seed": str(NOISE_SEED), "noise_scale": str(NOISE_SCALE),
            "steps": str(STEPS), "vgg_width": str(VGG_WIDTH), "vgg_seed": str(VGG_SEED),
            "model_fingerprint": built, "vgg_fingerprint": fingerprint(vgg),
            "noise": "constant (our noise_const maps set as the port's NoiseLayer.noise)",
            "machine": "CPU float32, 1 thread"}
    write_fixture(args.out, tensors, meta)


if __name__ == "__main__":
    main()
