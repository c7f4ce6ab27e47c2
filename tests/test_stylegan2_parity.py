"""Our StyleGAN2 against numbers computed by NVIDIA's reference implementation (scripts/make_stylegan2_parity.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES, close_to_reference
from engine.stylegan2 import Generator, StyleGAN2Config



def _load(parity, case: str) -> Generator:
    G = Generator(StyleGAN2Config(**parity.cases[case])).eval()
    G.load_state_dict(parity.state(case), strict=True)
    return G


@pytest.mark.parametrize("case", ["a", "b"])
def test_mapping_matches_reference(parity, case):
    G = _load(parity, case)
    z, c = parity[f"{case}.z"], parity.get(f"{case}.c")
    with torch.no_grad():
        ws = G.mapping(z, c)
        ws_trunc = G.mapping(z, c, truncation_psi=parity.truncation["psi"],
                             truncation_cutoff=parity.truncation["cutoff"])
    assert ws.shape == (z.shape[0], G.num_ws, G.w_dim)
    assert close_to_reference(ws, parity[f"{case}.ws"])
    assert close_to_reference(ws_trunc, parity[f"{case}.ws_trunc"])
    # truncation only moved the first `cutoff` ws
    assert (ws_trunc[:, parity.truncation["cutoff"]:] == ws[:, parity.truncation["cutoff"]:]).all()


@pytest.mark.parametrize("case", ["a", "b"])
@pytest.mark.parametrize("fused", [True, False])
def test_synthesis_matches_reference(parity, case, fused):
    G = _load(parity, case)
    with torch.no_grad():
        img_const = G.synthesis(parity[f"{case}.ws"], noise_mode="const", fused_modconv=fused)
        img_none = G.synthesis(parity[f"{case}.ws_trunc"], noise_mode="none", fused_modconv=fused)
    assert img_const.shape == parity[f"{case}.img_const"].shape
    assert close_to_reference(img_const, parity[f"{case}.img_const"])
    assert close_to_reference(img_none, parity[f"{case}.img_none"])
    # the fixture is not trivial: images differ between cases of noise and truncation
    assert (img_const - img_none).abs().max() > 0.01


def test_conv_clamp_is_part_of_the_maths(parity):
    """Case a clamps at 1.5: without the clamp the output is different, so the fixture really checks it."""
    cfg = dict(parity.cases["a"], conv_clamp=None)
    G = Generator(StyleGAN2Config(**cfg)).eval()
    G.load_state_dict(parity.state("a"))
    with torch.no_grad():
        img = G.synthesis(parity["a.ws"], noise_mode="const")
    assert (img - parity["a.img_const"]).abs().max() > 0.01


@pytest.mark.parametrize("name", ["ffhq-1024", "ffhq-256"])
def test_official_architectures_have_official_names_and_shapes(name):
    """Every parameter and buffer of NVIDIA's G_ema exists in ours with the same shape, and nothing else does."""
    ref = json.loads((FIXTURES / "stylegan2_official_shapes.json").read_text())
    G = Generator(StyleGAN2Config(**ref["configs"][name]))
    ours = {k: list(v.shape) for k, v in G.state_dict().items()}
    assert ours == ref["shapes"][name]
    if name == "ffhq-1024":
        assert G.num_ws == 18 and G.img_resolution == 1024
        assert sum(p.numel() for p in G.parameters()) == 30_370_060  # NVIDIA's G_ema parameter count


def test_batch_is_independent_per_sample(parity):
    """A face rendered alone equals the same face rendered in a batch (inversion and morphs rely on it)."""
    G = _load(parity, "a")
    with torch.no_grad():
        batch = G.synthesis(parity["a.ws"])
        single = G.synthesis(parity["a.ws"][1:2])
    assert close_to_reference(single, batch[1:2])
