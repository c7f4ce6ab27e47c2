"""Regenerate tests/fixtures/projector_parity.safetensors: NVIDIA's `project()` run on a tiny generator.

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/stylegan2-ada-pytorch
    pip install requests click imageio lpips   # what the reference imports; LPIPS's own code, see below
    python scripts/make_projector_parity.py --reference /tmp/stylegan2-ada-pytorch

It imports `projector.project` and `training.networks.Generator` from the clone (nothing of them is stored here)
and runs `project()` as it is for STEPS steps on:
- G: the reference's own generator at our built-in `tiny`'s architecture (32 px) holding `tiny`'s weights, with
  noise strengths drawn from NOISE_SEED (fingerprints.with_noise_strengths; the test draws the same ones);
  ours equals the reference generator on random weights (tests/test_stylegan2_parity.py);
- the target: an image that G drew from a random latent (uint8, as projector.py reads a photo);
- `torch.manual_seed(SEED)` before the call, as projector.py's `run_projection` does, so that the noise maps and the
  per-step w noise are the draws our `project(..., seed=SEED)` makes;
- NVIDIA's `vgg16.pt`, which `project()` downloads, replaced by the same thing computed with LPIPS's own code (the
  `lpips` package: its ScalingLayer, its VGG16 slices holding a random full-width VGG16 of ours, `normalize_tensor`
  and the learned linear weights from its wheel): with `return_lpips=True` the model returns, per image, the
  normalised features of each layer scaled by the square root of LPIPS's linear weights and by 1 / sqrt(H * W), so
  that the summed squared difference of two images' features is their LPIPS distance. Its input is [0, 255].
The w after every step (`project()` returns them all) and each noise map after every Adam step (before `project()`
renormalises it; recorded by wrapping its `torch.optim.Adam`) are stored; tests/test_projector_parity.py checks ours.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.images import to_uint8  # noqa: E402
from engine.perceptual import load_vgg16  # noqa: E402
from engine.registry import build_builtin, registry_entries  # noqa: E402
from fingerprints import fingerprint, source_commit, with_noise_strengths, write_fixture  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "projector_parity.safetensors"
STEPS = 20
SEED = 303          # projector.py's default --seed
VGG_SEED = 4
NOISE_SEED, NOISE_SCALE = 2, 0.3
TARGET_SEED = 9


class LPIPSFeatures(torch.nn.Module):
    """What NVIDIA's vgg16.pt computes with return_lpips=True, from the lpips package's own pieces."""

    def __init__(self, vgg):
        super().__init__()
        import lpips

        self.lpips = lpips
        self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
        trunk = self.net.net  # lpips.pretrained_networks.vgg16: slice1..slice5 over torchvision's vgg16().features
        theirs = {f"{i}": m for s in (trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5)
                  for i, m in s._modules.items()}
        for i, module in enumerate(vgg.features):
            if isinstance(module, torch.nn.Conv2d):
                theirs[str(i)].load_state_dict(module.state_dict())
        self.requires_grad_(False)

    def forward(self, images, resize_images=False, return_lpips=True):
        assert return_lpips and not resize_images
        x = self.net.scaling_layer(images / 127.5 - 1)
        out = []
        for k, f in enumerate(self.net.net(x)):
            weight = self.net.lins[k].model[-1].weight  # [1, C, 1, 1], non-negative
            f = self.lpips.normalize_tensor(f) * weight.reshape(1, -1, 1, 1).sqrt() / (f.shape[2] * f.shape[3]) ** 0.5
            out.append(f.flatten(1))
        return torch.cat(out, dim=1)


def build_reference(clone: Path):
    """The reference generator at `tiny`'s architecture holding `tiny`'s weights, with noise strengths drawn from
    NOISE_SEED; returns it and the fingerprint of `tiny` as built."""
    sys.path.insert(0, str(clone))
    from training.networks import Generator

    ours = build_builtin(registry_entries()["tiny"])
    cfg = ours.cfg
    G = Generator(
        z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, img_resolution=cfg.img_resolution,
        img_channels=cfg.img_channels,
        mapping_kwargs=dict(num_layers=cfg.mapping_layers, lr_multiplier=cfg.mapping_lr_multiplier),
        synthesis_kwargs=dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=0,
                              conv_clamp=cfg.conv_clamp, architecture="skip"),
    ).eval()
    built = fingerprint(ours)
    G.load_state_dict(with_noise_strengths(ours, NOISE_SEED, NOISE_SCALE).state_dict(), strict=True)
    return G, built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="local clone of NVlabs/stylegan2-ada-pytorch")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)

    G, tiny_fingerprint = build_reference(args.reference)
    import dnnlib
    import projector

    vgg = load_vgg16(seed=VGG_SEED)
    features = LPIPSFeatures(vgg)

    class _Url:  # `with dnnlib.util.open_url(url) as f: vgg16 = torch.jit.load(f)` -> our substitute
        def __enter__(self):
            return "vgg16.pt"

        def __exit__(self, *exc):
            return False

    dnnlib.util.open_url = lambda url, *a, **k: _Url()
    projector.torch.jit.load = lambda f: features

    torch.manual_seed(TARGET_SEED)
    with torch.no_grad():
        target = to_uint8(G.synthesis(G.mapping(torch.randn(1, G.z_dim), None, truncation_psi=0.5),
                                      noise_mode="const"))[0]
    trail: list[list[torch.Tensor]] = []

    class RecordingAdam(torch.optim.Adam):  # keeps every parameter (w, then the noise maps) after each step
        def step(self, closure=None):
            out = super().step(closure)
            trail.append([p.detach().clone() for p in self.param_groups[0]["params"]])
            return out

    projector.torch.optim.Adam = RecordingAdam
    torch.manual_seed(SEED)
    ws = projector.project(G, torch.from_numpy(target).permute(2, 0, 1), num_steps=STEPS, device=torch.device("cpu"))
    print(f"projector: {STEPS} steps, w moved {(ws[-1, 0] - ws[0, 0]).norm():.4f}")

    assert all(torch.equal(t[0].reshape(-1), w) for t, w in zip(trail, ws[:, 0], strict=True))
    tensors = {"target": torch.from_numpy(np.ascontiguousarray(target)), "w": ws[:, 0].contiguous()}
    for i in range(1, len(trail[0])):  # each noise map after every step, before project() renormalises it
        tensors[f"noise.{i - 1}"] = torch.stack([t[i] for t in trail])
    meta = {"source": f"NVlabs/stylegan2-ada-pytorch {source_commit(args.reference)} projector.py project()",
            "model": "tiny", "noise_seed": str(NOISE_SEED), "noise_scale": str(NOISE_SCALE),
            "model_fingerprint": tiny_fingerprint, "steps": str(STEPS), "seed": str(SEED),
            "vgg_seed": str(VGG_SEED), "vgg_fingerprint": fingerprint(vgg),
            "lpips": "lpips package LPIPS(net='vgg', version 0.1) pieces in place of NVIDIA's vgg16.pt",
            "machine": "CPU float32, 1 thread, reference ops"}
    write_fixture(args.out, tensors, meta)


if __name__ == "__main__":
    main()
