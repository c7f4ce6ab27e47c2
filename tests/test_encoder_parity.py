"""Our e4e and pSp encoders against numbers the authors' own code computed (scripts/make_encoder_parity.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES, close_to_reference
from engine.encoders import EncoderCheckpoint, EncoderConfig, PyramidEncoder, build_encoder
from fingerprints import fingerprint, seeded_convnet_weights, seeded_weights

PARITY = FIXTURES / "encoder_parity.safetensors"

# How close our W+ must come to theirs: PARITY_REL_TOL (1e-4 of the output's largest magnitude, at least 1), as for
# the generators. Both are the same float32 torch ops (conv2d, batch norm, PReLU, bilinear interpolation, linear) in
# the same order, so on the machine and thread count that made the fixture (AMD EPYC, 2 threads) they agree to the
# bit; another CPU or thread count (another SIMD width or convolution blocking in oneDNN) rounds each sum
# differently: on 1 thread ours differs from the fixture by up to 1.4e-6 (256 px) and 3.6e-7 (64 px). With the
# seeded weights each unit keeps about the scale of its input, so rounding is not amplified through the 24 units
# and 4 to 6 head convolutions: the same encoders in float64 differ from float32 by at most 3.6e-6 at 256 px
# (1.2e-6 of the output's scale) and 3.4e-7 at 64 px, so any two float32 evaluations, whatever the order of their
# sums, stay within about 2.4e-6 of the scale of each other: 40 times under the bar. Real defects are far above it:
# bilinear upsampling without aligned corners moves W+ by 0.013, the heads' leaky slope at 0.2 instead of 0.01 by
# 0.2, and the two faces' W+ differ by 0.03 to 0.1.


@pytest.fixture(scope="module")
def fixture():
    meta = safe_open(str(PARITY), "pt").metadata()
    return load_file(str(PARITY)), {k: json.loads(v) for k, v in meta.items() if k != "reference"}


def _ours(fixture, kind: str) -> tuple[PyramidEncoder, dict[str, torch.Tensor]]:
    """Our encoder holding the weights the fixture's case was computed with, and the case's inputs and average w."""
    _, meta = fixture
    case = meta["cases"][kind]
    n_styles = EncoderConfig.styles_for(meta["generator_size"])
    with torch.device("meta"):  # no random init of 123 M weights that the draw replaces
        enc = build_encoder(EncoderConfig(kind=kind, n_styles=n_styles))
    state = enc.state_dict()
    counters = {k: torch.zeros((), dtype=torch.long) for k in state if k.endswith("num_batches_tracked")}
    weights = seeded_convnet_weights({k: v.shape for k, v in state.items() if k not in counters}, case["seed"])
    enc = enc.to_empty(device="cpu")
    enc.load_state_dict(weights | counters, strict=True)
    assert fingerprint(enc) == meta["fingerprints"][kind], (
        "our encoder no longer holds the weights the fixture was computed with: regenerate it with "
        "scripts/make_encoder_parity.py")
    extra = seeded_weights({"latent_avg": [n_styles, 512], **case["inputs"]}, case["seed"] + 1)
    return enc.eval(), {k: (v if k == "latent_avg" else v.clamp(-1, 1)) for k, v in extra.items()}


@pytest.fixture(scope="module")
def e4e(fixture):
    return _ours(fixture, "e4e")


@pytest.fixture(scope="module")
def psp(fixture):
    return _ours(fixture, "psp")


def _checkpoint(enc: PyramidEncoder, latent_avg: torch.Tensor) -> EncoderCheckpoint:
    return EncoderCheckpoint(encoder=enc, latent_avg=latent_avg, decoder_fingerprint="", decoder_resolution=32,
                             path="fixture")


@pytest.mark.parametrize("kind", ["e4e", "psp"])
def test_encoders_give_the_references_w_plus(request, fixture, kind):
    """Two 64 px faces: the encoder's output, and W+ with the average w added as their pSp.forward adds it."""
    tensors, _ = fixture
    enc, inputs = request.getfixturevalue(kind)
    with torch.no_grad():
        codes = enc(inputs["x64"])
        wplus = _checkpoint(enc, inputs["latent_avg"]).encode(inputs["x64"])
    assert codes.shape == (2, 8, 512)
    assert close_to_reference(codes, tensors[f"{kind}.x64.codes"])
    assert close_to_reference(wplus, tensors[f"{kind}.x64.wplus"])
    # not trivial: each face has its own W+, far beyond the bar
    assert (codes[0] - codes[1]).abs().max() > 100 * 1e-4 * max(codes.abs().max().item(), 1.0)


def test_e4e_at_the_published_input_size(fixture, e4e):
    """One face at 256 px, the size their transforms feed: every head strides its level down to 1 x 1."""
    tensors, _ = fixture
    enc, inputs = e4e
    with torch.no_grad():
        wplus = _checkpoint(enc, inputs["latent_avg"]).encode(inputs["x256"])
    assert close_to_reference(wplus, tensors["e4e.x256.wplus"])


def test_e4e_progressive_stage_adds_only_the_first_deltas(fixture, e4e):
    """At their ProgressiveStage 4, ws 1-4 get their deltas and ws 5-7 stay w0, as in their forward."""
    tensors, meta = fixture
    enc, inputs = e4e
    with torch.no_grad():
        partial = enc(inputs["x64"], deltas=meta["stage"])
    assert close_to_reference(partial, tensors[f"e4e.x64.stage{meta['stage']}"])
    assert torch.equal(partial[:, 5], partial[:, 0]) and torch.equal(partial[:, 7], partial[:, 0])


@pytest.mark.parametrize("kind", ["e4e", "psp"])
def test_the_published_layout_has_the_authors_names_and_shapes(kind):
    """Every parameter and buffer of the authors' FFHQ encoders (18 ws), with its shape, and nothing else: their
    checkpoints' `encoder.*` keys load as they are."""
    ref = json.loads((FIXTURES / "encoder_published_shapes.json").read_text())
    with torch.device("meta"):
        enc = build_encoder(EncoderConfig(kind=kind))
    assert {k: list(v.shape) for k, v in enc.state_dict().items()} == ref["shapes"]
    assert sum(p.numel() for p in enc.parameters()) == 267_136_704


def test_an_input_larger_than_the_heads_are_built_for_is_refused():
    """Their heads would fold a map larger than 1 x 1 into the batch without a word; ours refuse the input."""
    enc = build_encoder(EncoderConfig(n_styles=2, stem=8, stages=((8, 1), (8, 1), (8, 1), (8, 1)), w_dim=8,
                                      se_reduction=4, input_size=32))
    with pytest.raises(ValueError, match="at most 32 px"):
        enc(torch.zeros(1, 3, 64, 64))
