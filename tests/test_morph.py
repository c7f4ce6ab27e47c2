"""Morph frames and their GIF / MP4 encodings on the tiny model."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from engine.morph import encode_gif, encode_mp4, layer_mask, morph, weights
from engine.registry import build_builtin, registry_entries


@pytest.fixture(scope="module")
def G():
    return build_builtin(registry_entries()["tiny"])


@pytest.fixture(scope="module")
def latents(G):
    torch.manual_seed(7)
    with torch.no_grad():
        return G.mapping(torch.randn(2, G.z_dim), None, truncation_psi=0.7)


def test_morph_starts_at_a_ends_at_b_and_loops(G, latents):
    wa, wb = latents
    video = morph(G, wa, wb, frames=6, easing="linear")
    with torch.no_grad():
        from engine.images import to_uint8
        ia, ib = to_uint8(G.synthesis(latents))
    assert video.shape == (6 + 4, 32, 32, 3)
    assert np.array_equal(video[0], ia) and np.array_equal(video[5], ib)
    assert np.array_equal(video[6], video[4]) and np.array_equal(video[-1], video[1])  # ping-pong back to A
    assert weights(3, "linear") == [0.0, 0.5, 1.0]
    assert weights(5, "cosine")[1] < 0.25  # eased: slow start


def test_layer_ranges_split_the_ws(G):
    masks = {name: layer_mask(G, name) for name in ("coarse", "middle", "fine", "all")}
    assert masks["all"].sum() == G.num_ws
    assert (masks["coarse"] + masks["middle"] + masks["fine"] == masks["all"]).all()
    assert masks["coarse"][:3].tolist() == [1, 1, 1]


def test_gif_loops_with_one_palette_and_fits_a_budget(G, latents):
    video = morph(G, latents[0], latents[1], frames=8)
    data = encode_gif(video)
    gif = Image.open(io.BytesIO(data))
    assert gif.format == "GIF" and gif.n_frames == len(video) and gif.info.get("loop") == 0
    has_global, local_tables = _gif_color_tables(data)
    assert has_global and local_tables == 0  # every frame uses the one global palette
    big = np.repeat(np.repeat(video, 8, axis=1), 8, axis=2)  # 256 px frames
    small = encode_gif(big, max_bytes=len(encode_gif(big)) // 3)
    assert len(small) <= len(encode_gif(big)) // 3
    assert Image.open(io.BytesIO(small)).size[0] < 256


def _gif_color_tables(data: bytes) -> tuple[bool, int]:
    """(global colour table present, number of frames with a local colour table), by walking the GIF blocks."""
    def skip_sub_blocks(i: int) -> int:
        while data[i]:
            i += data[i] + 1
        return i + 1

    packed = data[10]
    i = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    local = 0
    while data[i] != 0x3B:
        if data[i] == 0x21:  # extension: introducer, label, sub-blocks
            i = skip_sub_blocks(i + 2)
        elif data[i] == 0x2C:  # image descriptor: 9 bytes, optional local table, LZW code size, sub-blocks
            flags = data[i + 9]
            i += 10
            if flags & 0x80:
                local += 1
                i += 3 * 2 ** ((flags & 7) + 1)
            i = skip_sub_blocks(i + 1)
        else:
            raise AssertionError(f"unexpected GIF block {data[i]:#x}")
    return bool(packed & 0x80), local


def test_mp4_decodes_with_the_right_frames(G, latents):
    video = morph(G, latents[0], latents[1], frames=6)
    data = encode_mp4(np.repeat(np.repeat(video, 4, axis=1), 4, axis=2))
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == len(video) and decoded[0].shape == (128, 128, 3)
