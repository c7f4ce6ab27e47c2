"""The style space S: each generator renders from its per-layer styles as from W+, and S is laid out as StyleCLIP's
global directions (global_torch/manipulate.py, StyleCLIP.py, SingleChannel.py) index it."""

from __future__ import annotations

import pytest
import torch

from conftest import close_to_reference
from engine.registry import build_builtin, registry_entries
from engine.stylegan1 import Generator as StyleGAN1, StyleGAN1Config
from engine.stylegan2 import Generator, StyleGAN2Config

# (layer, channel) moved in the tests below: a conv's and a toRGB's for StyleGAN2; for StyleGAN1 an AdaIN scale
# (channel 3) and the same channel's bias (the style's second half).
MOVES = {"stylegan2": [("conv1_resolution_8", 3), ("toRGB_resolution_16", 5)],
         "stylegan1": [("8x8.epi1", 3), ("8x8.epi1", 64 + 3)]}


@pytest.fixture(scope="module")
def generators(parity) -> dict:
    entries = registry_entries()
    out = {name: build_builtin(entries[name]) for name in ("tiny", "stylegan1-tiny")}
    for case in ("a", "b"):  # the StyleGAN2 parity fixture's: case a clamps at 1.5, case b is conditional
        G = Generator(StyleGAN2Config(**parity.cases[case])).eval().requires_grad_(False)
        G.load_state_dict(parity.state(case), strict=True)
        out[f"parity-{case}"] = G
    for arch in ("orig", "resnet"):  # a toRGB in the last block only; resnet adds the skip path
        torch.manual_seed(3)
        G = Generator(StyleGAN2Config(**dict(parity.cases["a"], architecture=arch))).eval().requires_grad_(False)
        out[arch] = G
    return out


def _ws(G, n: int = 3) -> torch.Tensor:
    """n latents with a different w per layer (W+, as an inversion leaves them)."""
    gen = torch.Generator().manual_seed(7)
    c = torch.eye(G.c_dim)[:n] if G.c_dim else None
    ws = G.mapping(torch.randn([n, G.z_dim], generator=gen), c)
    return ws + 0.5 * torch.randn(ws.shape, generator=gen)


@pytest.mark.parametrize("name", ["tiny", "stylegan1-tiny", "parity-a", "parity-b", "orig", "resnet"])
@pytest.mark.parametrize("fused", [False, True])
def test_rendering_from_styles_equals_rendering_from_ws(generators, name, fused):
    """Exactly equal (max abs difference 0): the ws path computes each layer's style with the same affine and renders
    it with the same code, so both paths run the same float32 ops on the same numbers, batch size included."""
    G = generators[name]
    ws = _ws(G)
    with torch.no_grad():
        S = G.synthesis.styles(ws)
        from_ws = G.synthesis(ws, noise_mode="const", fused_modconv=fused)
        from_s = G.synthesis(styles=S, noise_mode="const", fused_modconv=fused)
        none_from_ws = G.synthesis(ws, noise_mode="none", fused_modconv=fused)
        none_from_s = G.synthesis(styles=S, noise_mode="none", fused_modconv=fused)
    assert from_s.shape == (3, G.img_channels, G.img_resolution, G.img_resolution)
    assert (from_s - from_ws).abs().max().item() == 0
    assert (none_from_s - none_from_ws).abs().max().item() == 0
    if name.startswith("parity"):  # seeded noise strengths (the built-in tiny ones start at 0, as in training)
        assert (from_s - none_from_s).abs().max() > 1e-3  # noise_mode reaches the S path


@pytest.mark.parametrize("case", ["a", "b"])
def test_rendering_from_styles_matches_nvidia(parity, generators, case):
    """The S path against the images NVIDIA's code rendered from the fixture's ws (same tolerance as the ws path)."""
    G = generators[f"parity-{case}"]
    with torch.no_grad():
        img = G.synthesis(styles=G.synthesis.styles(parity[f"{case}.ws"]), noise_mode="const")
    assert close_to_reference(img, parity[f"{case}.img_const"])


@pytest.mark.parametrize("name", ["tiny", "stylegan1-tiny"])
def test_styles_are_batched_and_named_with_their_widths(generators, name):
    """S for N latents at once: one [N, channels] tensor per layer, as `style_channels` names them, and each row is
    that latent's own (equal to its styles computed alone, to float rounding of a batched matmul)."""
    G = generators[name]
    ws = _ws(G, n=4)
    with torch.no_grad():
        S = G.synthesis.styles(ws)
        alone = G.synthesis.styles(ws[2:3])
    assert list(S) == list(G.synthesis.style_channels())
    blocks = len(G.cfg.block_resolutions)  # StyleGAN1: an AdaIN per w; StyleGAN2 (skip): 1 + 2 per block convs, 1 toRGB
    assert len(S) == (G.num_ws if G.cfg.family == "stylegan1" else 2 * blocks - 1 + blocks)
    for layer, c in G.synthesis.style_channels().items():
        assert S[layer].shape == (4, c)
        assert torch.allclose(S[layer][2:3], alone[layer], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "stylegan1-tiny"])
def test_moving_one_channel_changes_that_face_and_moving_it_back_restores_it(generators, name):
    G = generators[name]
    ws = _ws(G)
    with torch.no_grad():
        S = G.synthesis.styles(ws)
        before = G.synthesis(styles=S, noise_mode="const")
        for layer, channel in MOVES[G.cfg.family]:
            moved = {k: v.clone() for k, v in S.items()}
            moved[layer][0, channel] += 5 * S[layer][:, channel].std() + 1  # face 0 only
            after = G.synthesis(styles=moved, noise_mode="const")
            assert (after[0] - before[0]).abs().max() > 1e-2, (layer, channel)
            assert torch.equal(after[1:], before[1:])  # the other faces of the batch are untouched
            moved[layer][0, channel] = S[layer][0, channel]
            assert torch.equal(G.synthesis(styles=moved, noise_mode="const"), before)


def test_ffhq_1024_style_space_is_the_one_styleclip_indexes():
    """Built on the meta device (no 30 M weights allocated). S at 1024 px: 26 layers (17 convs, 9 toRGBs), 9,088
    channels; the convs alone, 6,048. StyleCLIP's fs3.npy (global_torch/npy/ffhq, 5,376 x 512) has a row per
    channel of the convs up to 128 px: SingleChannel.py keeps `mindexs <= 16` (S index 16 is toRGB_resolution_128),
    i.e. 9 layers of 512 (4 to 64 px, conv1_resolution_4 first) + conv0_resolution_128 (512) + conv1_resolution_128
    (256) = 5,376; StyleCLIP.py's SplitS lays fs3's rows onto the conv layers in this order and zeroes the rest."""
    with torch.device("meta"):
        G = Generator(StyleGAN2Config())
    S = G.synthesis.style_channels()
    expected_names = []
    for res in (4, 8, 16, 32, 64, 128, 256, 512, 1024):  # manipulate.py's GetSName
        expected_names += ([] if res == 4 else [f"conv0_resolution_{res}"]) + [f"conv1_resolution_{res}",
                                                                              f"toRGB_resolution_{res}"]
    assert list(S) == expected_names
    assert (len(S), sum(S.values())) == (26, 9088)
    convs = G.synthesis.style_channels(torgb=False)
    mindexs = [i for i, name in enumerate(S) if not name.startswith("toRGB")]
    assert mindexs == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24]  # manipulate.py's M.mindexs
    assert (len(convs), sum(convs.values())) == (17, 6048)
    assert sum(c for i, c in zip(mindexs, convs.values()) if i <= 16) == 5376

    with torch.device("meta"):
        G1 = StyleGAN1(StyleGAN1Config())
    S1 = G1.synthesis.style_channels()  # 18 AdaINs, each 2 x its channels (scales, biases)
    assert (len(S1), sum(S1.values())) == (18, 2 * (4 * 2 * 512 + 2 * (256 + 128 + 64 + 32 + 16)))


@pytest.mark.parametrize("arch", ["orig", "resnet"])
def test_orig_and_resnet_have_one_torgb_style(generators, arch):
    names = list(generators[arch].synthesis.style_channels())
    assert [n for n in names if n.startswith("toRGB")] == ["toRGB_resolution_32"] and names[-1] == "toRGB_resolution_32"


def test_synthesis_takes_ws_or_styles(generators):
    G = generators["tiny"]
    S = G.synthesis.styles(_ws(G))
    with pytest.raises(ValueError, match="one of the two"):
        G.synthesis(_ws(G), styles=S)
    with pytest.raises(ValueError, match="one of the two"):
        G.synthesis()
    with pytest.raises(ValueError, match="missing \\['toRGB_resolution_32'\\]"):
        G.synthesis(styles={k: v for k, v in S.items() if k != "toRGB_resolution_32"})
    with pytest.raises(ValueError, match="conv1_resolution_8"):
        G.synthesis(styles={**S, "conv1_resolution_8": S["conv1_resolution_8"][:, :5]})
