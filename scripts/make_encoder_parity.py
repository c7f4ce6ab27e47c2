"""Regenerate tests/fixtures/encoder_parity.safetensors and encoder_published_shapes.json from local clones of the
authors' repositories (omertov/encoder4editing for e4e, eladrich/pixel2style2pixel for pSp).

    git clone https://github.com/omertov/encoder4editing /tmp/encoder4editing
    git clone https://github.com/eladrich/pixel2style2pixel /tmp/pixel2style2pixel
    python scripts/make_encoder_parity.py --e4e /tmp/encoder4editing --psp /tmp/pixel2style2pixel

Their `models/stylegan2/op` package compiles CUDA extensions when it is imported (torch.utils.cpp_extension.load),
which a machine without CUDA cannot do, and `models/encoders/psp_encoders.py` imports it (through
`models.stylegan2.model`, for `EqualLinear`). The encoders run none of it: their heads' `EqualLinear` has no
activation, so it never calls `fused_leaky_relu`, and nothing of an encoder resamples. So, before their modules are
imported, this script puts a pure-torch stand-in for that one package into `sys.modules` (`fused_leaky_relu` and
`FusedLeakyReLU` computed as the CUDA kernel does, an `upfirdn2d` that raises if anything ever called it): the
clones on disk are not changed, and nothing else of theirs is replaced.

For each design it builds the encoder with the authors' class (`Encoder4Editing`, `GradualStyleEncoder`; IR-SE-50
as published) for a 32 px generator, so with 8 ws: ws 0-2 come from the top level, 3-6 from the middle one, 7 from
the fine one, so every head kind, both lateral layers and both upsamplings take part (the published FFHQ encoders
have 18 heads of the same three kinds). Every parameter and running statistic gets random values drawn by name from
the case's seed (tests/fingerprints.seeded_convnet_weights: our encoders have the same names, so the tests draw the
same weights without storing them), and so does the average w. It runs faces drawn from a seed, clamped to [-1, 1]:
two at 64 px (their code takes any size up to 256 px; the heads then stride maps of 1 x 1 as theirs do) and, for
e4e, one at the published 256 px. It records the encoder's output, W+ as their `pSp.forward` makes it
(`codes + latent_avg.repeat(N, 1, 1)`), e4e's output at progressive stage 4 (deltas of ws 1-4 only), and the
fingerprint of our encoder holding those weights. Only numbers their code computed are stored, no weights and no
code. The names and shapes of both published layouts (18 ws) go to encoder_published_shapes.json.
tests/test_encoder_parity.py checks our encoders against them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from engine.encoders import EncoderConfig, build_encoder  # noqa: E402
from fingerprints import fingerprint, seeded_convnet_weights, seeded_weights, source_commit, write_fixture  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "encoder_parity.safetensors"
SHAPES_OUT = FIXTURES / "encoder_published_shapes.json"

GENERATOR_SIZE = 32                          # -> 8 ws
CASES = {"e4e": dict(seed=2701, inputs={"x64": [2, 3, 64, 64], "x256": [1, 3, 256, 256]}),
         "psp": dict(seed=2702, inputs={"x64": [2, 3, 64, 64]})}
STAGE = 4                                    # e4e's ProgressiveStage.Delta4Training


def fused_ops_stand_in() -> types.ModuleType:
    """`models.stylegan2.op` without CUDA: what the encoders could reach of it, in plain torch."""
    op = types.ModuleType("models.stylegan2.op")

    def fused_leaky_relu(input, bias, negative_slope=0.2, scale=2 ** 0.5):
        bias = bias.view(1, -1, *[1] * (input.ndim - 2))
        return F.leaky_relu(input + bias, negative_slope=negative_slope) * scale

    class FusedLeakyReLU(nn.Module):
        def __init__(self, channel, negative_slope=0.2, scale=2 ** 0.5):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(channel))
            self.negative_slope, self.scale = negative_slope, scale

        def forward(self, input):
            return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)

    def upfirdn2d(*args, **kwargs):
        raise NotImplementedError("upfirdn2d is not part of the encoders (stand-in of make_encoder_parity.py)")

    op.fused_leaky_relu, op.FusedLeakyReLU, op.upfirdn2d = fused_leaky_relu, FusedLeakyReLU, upfirdn2d
    return op


def reference_module(clone: Path) -> types.ModuleType:
    """The clone's models/encoders/psp_encoders.py (both repositories name their package `models`: the other's is
    forgotten first)."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("models", "configs")]:
        del sys.modules[name]
    sys.path.insert(0, str(clone))
    try:
        sys.modules["models.stylegan2.op"] = fused_ops_stand_in()
        return importlib.import_module("models.encoders.psp_encoders")
    finally:
        sys.path.remove(str(clone))


def build_reference(mod: types.ModuleType, kind: str, generator_size: int) -> nn.Module:
    if kind == "e4e":  # e4e's opts: stylegan_size; n_styles = 2 log2(size) - 2 inside
        return mod.Encoder4Editing(50, "ir_se", argparse.Namespace(stylegan_size=generator_size))
    n_styles = int(math.log(generator_size, 2)) * 2 - 2  # as pSp.__init__ computes opts.n_styles
    return mod.GradualStyleEncoder(50, "ir_se", argparse.Namespace(n_styles=n_styles, input_nc=3))


def learned(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Shapes of what the seeded weights replace: all but the batch norms' step counters."""
    return {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e4e", required=True, type=Path, help="local clone of omertov/encoder4editing")
    ap.add_argument("--psp", required=True, type=Path, help="local clone of eladrich/pixel2style2pixel")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    clones = {"e4e": args.e4e, "psp": args.psp}

    tensors: dict[str, torch.Tensor] = {}
    fingerprints, published = {}, {}
    for kind, case in CASES.items():
        mod = reference_module(clones[kind])
        with torch.device("meta"):  # names and shapes only, no gigabyte of weights
            published[kind] = {k: list(v.shape) for k, v in build_reference(mod, kind, 1024).state_dict().items()}
        enc = build_reference(mod, kind, GENERATOR_SIZE).eval()
        state = enc.state_dict()
        weights = seeded_convnet_weights(learned(state), case["seed"])
        enc.load_state_dict(state | weights, strict=True)
        ours = build_encoder(EncoderConfig(kind=kind, n_styles=enc.style_count))
        ours.load_state_dict(enc.state_dict(), strict=True)  # the same names and shapes
        fingerprints[kind] = fingerprint(ours)
        extra = seeded_weights({"latent_avg": [enc.style_count, 512], **case["inputs"]}, case["seed"] + 1)
        latent_avg = extra.pop("latent_avg")
        with torch.no_grad():
            for name, x in extra.items():
                codes = enc(x.clamp(-1, 1))
                tensors[f"{kind}.{name}.codes"] = codes
                tensors[f"{kind}.{name}.wplus"] = codes + latent_avg.repeat(codes.shape[0], 1, 1)  # pSp.forward's
                if kind == "e4e" and name == "x64":
                    enc.set_progressive_stage(mod.ProgressiveStage(STAGE))
                    tensors[f"{kind}.{name}.stage{STAGE}"] = enc(x.clamp(-1, 1))
                    enc.set_progressive_stage(mod.ProgressiveStage.Inference)
        print(f"{kind}: {sum(p.numel() for p in enc.parameters())} parameters, "
              f"{ {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(kind)} }")

    assert published["e4e"] == published["psp"], "the two published layouts differ"
    SHAPES_OUT.write_text(json.dumps({"layouts": ["Encoder4Editing(50, 'ir_se', stylegan_size=1024)",
                                                  "GradualStyleEncoder(50, 'ir_se', n_styles=18)"],
                                      "shapes": published["e4e"]}, indent=0) + "\n")
    print(f"wrote {SHAPES_OUT}")
    meta = {"cases": json.dumps(CASES), "generator_size": str(GENERATOR_SIZE), "stage": str(STAGE),
            "fingerprints": json.dumps(fingerprints),
            "reference": f"omertov/encoder4editing {source_commit(args.e4e)}, eladrich/pixel2style2pixel "
                         f"{source_commit(args.psp)}: models/encoders/psp_encoders.py, CPU float32, "
                         f"torch {torch.__version__}"}
    write_fixture(args.out, tensors, meta)


if __name__ == "__main__":
    main()
