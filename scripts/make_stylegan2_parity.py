"""Regenerate tests/fixtures/stylegan2_parity.safetensors from a local clone of NVlabs/stylegan2-ada-pytorch.

    python scripts/make_stylegan2_parity.py --reference /tmp/stylegan2-ada-pytorch

(the reference's dnnlib imports `requests`: pip install requests first.)

It builds two tiny generators with the *reference* code (one unconditional with conv_clamp, one conditional with
a short mapping network), gives every parameter and buffer (but the fixed resampling filters) random values drawn
from the case's seed by name (tests/fingerprints.seeded_weights: our generator has the same names, so the tests
draw the same weights without storing them), and records inputs and outputs (reference ops on the CPU, float32,
noise_mode='const' and 'none'), the seeds and the fingerprint of our generator holding those weights. Nothing of
the reference's code, and no weights, are stored: only numbers it computed. tests/test_stylegan2_parity.py checks
our generator against them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from engine.stylegan2 import Generator as OurGenerator, StyleGAN2Config  # noqa: E402
from fingerprints import fingerprint, seeded_weights, source_commit, write_fixture  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "stylegan2_parity.safetensors"
SHAPES_OUT = FIXTURES / "stylegan2_official_shapes.json"

# Our StyleGAN2Config fields for each case; the reference gets the same numbers under its own argument names.
CASES = {
    "a": dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=32, img_channels=3, mapping_layers=8,
              mapping_lr_multiplier=0.01, channel_base=256, channel_max=32, conv_clamp=1.5),
    "b": dict(z_dim=16, c_dim=3, w_dim=24, img_resolution=16, img_channels=3, mapping_layers=2,
              mapping_lr_multiplier=0.01, channel_base=128, channel_max=16, conv_clamp=None),
}
# The official FFHQ architectures (train.py cfg 'stylegan2' for 1024/512, 'paper256' for 256): only the names and
# shapes of their G_ema state dicts are recorded, to prove that our presets load official files with strict=True.
OFFICIAL = {
    "ffhq-1024": dict(CASES["a"], z_dim=512, w_dim=512, img_resolution=1024, channel_base=32768, channel_max=512,
                      conv_clamp=256),
    "ffhq-256": dict(CASES["a"], z_dim=512, w_dim=512, img_resolution=256, channel_base=16384, channel_max=512,
                     conv_clamp=256),
}
WEIGHT_SEEDS = {"a": 2024, "b": 2025}
BATCH = 3
TRUNCATION = dict(psi=0.6, cutoff=3)


def build_reference(cfg: dict):
    from training.networks import Generator  # from the reference clone on sys.path

    return Generator(
        z_dim=cfg["z_dim"], c_dim=cfg["c_dim"], w_dim=cfg["w_dim"], img_resolution=cfg["img_resolution"],
        img_channels=cfg["img_channels"],
        mapping_kwargs=dict(num_layers=cfg["mapping_layers"], lr_multiplier=cfg["mapping_lr_multiplier"]),
        synthesis_kwargs=dict(channel_base=cfg["channel_base"], channel_max=cfg["channel_max"], num_fp16_res=0,
                              conv_clamp=cfg["conv_clamp"], architecture="skip"),
    ).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="local clone of NVlabs/stylegan2-ada-pytorch")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    sys.path.insert(0, str(args.reference))

    torch.manual_seed(2024)
    tensors: dict[str, torch.Tensor] = {}
    fingerprints = {}
    for name, cfg in CASES.items():
        G = build_reference(cfg)
        weights = seeded_weights({k: v.shape for k, v in G.state_dict().items() if not k.endswith("resample_filter")},
                                 WEIGHT_SEEDS[name])
        missing, unexpected = G.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.endswith("resample_filter") for k in missing), (missing, unexpected)
        ours = OurGenerator(StyleGAN2Config(**cfg))
        ours.load_state_dict(G.state_dict(), strict=True)  # the same names, shapes and filters
        fingerprints[name] = fingerprint(ours)
        z = torch.randn([BATCH, cfg["z_dim"]])
        c = torch.randn([BATCH, cfg["c_dim"]]) if cfg["c_dim"] else None
        with torch.no_grad():
            ws = G.mapping(z, c)
            ws_trunc = G.mapping(z, c, truncation_psi=TRUNCATION["psi"], truncation_cutoff=TRUNCATION["cutoff"])
            img_const = G.synthesis(ws, noise_mode="const", force_fp32=True)
            img_none = G.synthesis(ws_trunc, noise_mode="none", force_fp32=True)
        tensors[f"{name}.z"] = z
        if c is not None:
            tensors[f"{name}.c"] = c
        tensors[f"{name}.ws"] = ws
        tensors[f"{name}.ws_trunc"] = ws_trunc
        tensors[f"{name}.img_const"] = img_const
        tensors[f"{name}.img_none"] = img_none
        print(f"case {name}: {sum(p.numel() for p in G.parameters())} parameters, image {tuple(img_const.shape)}")

    shapes = {name: {k: list(v.shape) for k, v in build_reference(cfg).state_dict().items()}
              for name, cfg in OFFICIAL.items()}
    SHAPES_OUT.write_text(json.dumps({"configs": OFFICIAL, "shapes": shapes}, indent=0) + "\n")
    print(f"wrote {SHAPES_OUT}")

    meta = {"cases": json.dumps(CASES), "truncation": json.dumps(TRUNCATION), "weight_seeds": json.dumps(WEIGHT_SEEDS),
            "fingerprints": json.dumps(fingerprints),
            "reference": f"NVlabs/stylegan2-ada-pytorch {source_commit(args.reference)} training/networks.py, "
                         "reference ops, CPU float32"}
    write_fixture(args.out, tensors, meta)


if __name__ == "__main__":
    main()
