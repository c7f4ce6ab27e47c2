"""Our StyleGAN1 against numbers computed by the PyTorch port's own code (scripts/make_stylegan1_parity.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES, close_to_reference, stylegan1_port_state
from engine.stylegan1 import Generator, MappingNetwork, StyleGAN1Config, port_to_ours
from fingerprints import seeded_in_order

PATH = FIXTURES / "stylegan1_parity.safetensors"


@pytest.fixture(scope="module")
def fx():
    meta = safe_open(str(PATH), "pt").metadata()
    return load_file(str(PATH)), meta


def _synthesis(fx, case: str) -> Generator:
    _, meta = fx
    cfg = StyleGAN1Config(**json.loads(meta["cases"])[case], z_dim=8, mapping_layers=1)
    G = Generator(cfg).eval()
    state = G.state_dict()  # the case checks synthesis only: the mapping is ours
    state.update(port_to_ours(stylegan1_port_state(case)))
    G.load_state_dict(state, strict=True)
    layers = G.noise_layers()
    maps = seeded_in_order([layer.noise_const.shape for layer in layers], json.loads(meta["seeds"])["noise"])
    for layer, noise in zip(layers, maps, strict=True):  # as the script drew them
        layer.noise_const.copy_(noise)
    return G


@pytest.mark.parametrize("case", ["a", "b"])
def test_synthesis_matches_the_port(fx, case):
    tensors, _ = fx
    G = _synthesis(fx, case)
    with torch.no_grad():
        img_noise = G.synthesis(tensors[f"{case}.ws"], noise_mode="const")
        img_none = G.synthesis(tensors[f"{case}.ws"], noise_mode="none")
    assert img_noise.shape == tensors[f"{case}.img_noise"].shape
    assert close_to_reference(img_noise, tensors[f"{case}.img_noise"])
    assert close_to_reference(img_none, tensors[f"{case}.img_none"])
    assert (img_noise - img_none).abs().max() > 0.01  # the noise really is part of what is checked


def test_the_fused_upscale_is_what_the_port_does_from_128_px(fx, monkeypatch):
    """Case a reaches 128 px, where the original folds upscale + conv into a transposed conv: with the plain
    upscale there instead, the image differs (at the borders), so the fixture checks that path."""
    import engine.stylegan1 as sg1

    tensors, _ = fx
    G = _synthesis(fx, "a")
    monkeypatch.setattr(sg1, "FUSED_UPSCALE_MIN", 10_000)
    with torch.no_grad():
        img = G.synthesis(tensors["a.ws"], noise_mode="const")
    assert (img - tensors["a.img_noise"]).abs().max() > 1e-3


def test_mapping_matches_the_port(fx):
    tensors, meta = fx
    M = MappingNetwork(StyleGAN1Config())  # the port's: 512 wide, 8 layers, 18 ws
    state = {k[len("mapping."):]: v for k, v in port_to_ours(stylegan1_port_state("mapping")).items()}
    M.load_state_dict(state | {"w_avg": M.w_avg}, strict=True)
    with torch.no_grad():
        ws = M(tensors["map.z"])
        M.w_avg.copy_(torch.randn(512) * 0.01)
        ws_trunc = M(tensors["map.z"], truncation_psi=0.7, truncation_cutoff=8)
    assert ws.shape == (2, 18, 512)
    assert close_to_reference(ws, tensors["map.ws"])
    # the original's truncation: the first 8 ws pulled 30 % of the way to w_avg, the rest untouched
    assert (ws_trunc[:, 8:] == ws[:, 8:]).all()
    assert torch.allclose(ws_trunc[:, :8], M.w_avg + 0.7 * (ws[:, :8] - M.w_avg), atol=1e-7)


def test_ffhq_architecture_has_the_port_names_and_shapes(fx):
    """Every tensor of a real karras2019stylegan-ffhq-1024x1024.pt has its place in ours, with its shape."""
    _, meta = fx
    port = json.loads(meta["ffhq_shapes"])
    G = Generator(StyleGAN1Config())
    ours = {k: list(v.shape) for k, v in G.state_dict().items() if k != "mapping.w_avg"}
    assert ours == {k: v for k, v in port_to_ours(port).items()}
    assert sum(p.numel() for p in G.parameters()) == int(meta["ffhq_parameters"]) == 26_212_019
    assert G.num_ws == 18 and G.w_dim == 512 and G.img_resolution == 1024


def test_batch_is_independent_per_sample(fx):
    tensors, _ = fx
    G = _synthesis(fx, "b")
    with torch.no_grad():
        batch = G.synthesis(tensors["b.ws"])
        single = G.synthesis(tensors["b.ws"][1:2])
    assert close_to_reference(single, batch[1:2])
