"""StyleCLIP's global directions (engine/global_directions.py) against StyleCLIP's own functions: the fixture was
computed by global_torch's GetDt, GetBoundary, SplitS and MSCode on the tiny CLIP and the tiny generator's layout
(scripts/make_global_directions_parity.py says what they were given)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.edit import TINY_CLIP, ClipScorer
from engine.global_directions import (IMAGENET_TEMPLATES, DirectionError, apply_direction, channel_relevance,
                                      global_direction, text_direction)
from engine.registry import build_builtin, registry_entries
from fingerprints import fingerprint

PATH = Path(__file__).parent / "fixtures" / "global_directions_parity.safetensors"
# Float32 throughout, on both sides. delta t: the same open_clip model on the same 79-prompt batch, the same
# normalise / mean / normalise; only the last normalisation is numpy's on their side, torch's on ours (a few ulps of
# a unit vector). r = fs3 . dt is a 64-term float32 dot product, summed in a different order by numpy and torch
# (error about 64 * 2^-24 of |r| <= 1); the boundary and the edited S are r / max |r| times std, plus s: a few ulps
# more. 1e-5 bounds all of it with a wide margin on any CPU, and beta sits at least SELECTION_MARGIN from every |r|,
# so the same channels are selected whatever the summation order.
TOL = 1e-5
SELECTION_MARGIN = 1e-4


@pytest.fixture(scope="module")
def ref():
    tensors, meta = load_file(str(PATH)), safe_open(str(PATH), "pt").metadata()
    G = build_builtin(registry_entries()["tiny"])
    clip = ClipScorer(TINY_CLIP, None)
    assert fingerprint(G) == meta["generator_fingerprint"] and fingerprint(clip.model) == meta["clip_fingerprint"], (
        "the tiny networks the fixture was computed with are no longer what our builders make: "
        "rerun scripts/make_global_directions_parity.py")
    layers = meta["layers"].split(",")
    assert layers == list(G.synthesis.style_channels(torgb=True))
    pick = lambda kind: {n: tensors[f"{kind}.{n}"] for n in layers}  # noqa: E731
    return {"G": G, "clip": clip, "meta": meta, "dt": tensors["dt"], "fs3": tensors["fs3"], "beta": float(meta["beta"]),
            "alphas": [float(a) for a in meta["alphas"].split(",")], "boundary": pick("boundary"), "codes": pick("codes"), "S": pick("S"),
            "std": pick("std"), "channels": G.synthesis.style_channels(torgb=True)}


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = (ours - theirs).abs().max().item()
    assert err <= TOL * max(theirs.abs().max().item(), 1.0), err


def test_text_direction_is_their_getdt(ref):
    assert len(IMAGENET_TEMPLATES) == 79
    dt = text_direction(ref["clip"], ref["meta"]["target"], ref["meta"]["neutral"])
    _close(dt, ref["dt"])
    assert abs(torch.linalg.vector_norm(dt).item() - 1) < 1e-6


def test_channels_and_split_are_their_getboundary(ref):
    r = ref["fs3"] @ ref["dt"]
    assert (r.abs() - ref["beta"]).abs().min() > SELECTION_MARGIN        # selection cannot flip on rounding
    ds = global_direction(ref["fs3"], ref["dt"], ref["std"], ref["channels"], ref["beta"])
    assert list(ds) == list(ref["boundary"])
    kept = 0
    for name, theirs in ref["boundary"].items():
        _close(ds[name], theirs)
        assert torch.equal(ds[name] != 0, theirs != 0), name                # the same channels, exactly
        kept += int((theirs != 0).sum())
        if "RGB" in name or name.endswith(f"_{ref['G'].img_resolution}"):  # toRGBs, convs past fs3
            assert not ds[name].any(), name
    assert kept == int(ref["meta"]["num_c"]) and 0 < kept < len(r)


def test_edit_is_their_mscode_and_renders(ref):
    ds = global_direction(ref["fs3"], ref["dt"], ref["std"], ref["channels"], ref["beta"])
    G, S = ref["G"], ref["S"]
    images = []
    for k, alpha in enumerate(ref["alphas"]):
        edited = apply_direction(S, ds, alpha)
        for name in S:
            _close(edited[name], ref["codes"][name][:, k])
        with torch.no_grad():
            images.append(G.synthesis(styles=edited, noise_mode="const"))
    assert (images[0] - images[1]).abs().max() > 0.01 and (images[2] - images[1]).abs().max() > 0.01


def test_alpha_zero_renders_the_original_exactly(ref):
    G = ref["G"]
    ws = G.mapping(torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(3)), None)
    ds = global_direction(ref["fs3"], ref["dt"], ref["std"], ref["channels"], ref["beta"])
    with torch.no_grad():
        original = G.synthesis(ws, noise_mode="const")
        edited = G.synthesis(styles=apply_direction(G.synthesis.styles(ws), ds, 0.0), noise_mode="const")
    assert torch.equal(edited, original)


def test_beta_above_every_channel_gives_no_edit(ref):
    """Theirs divides 0 by 0 here (a NaN image, recorded in the fixture's metadata); ours leaves the face as it is."""
    assert ref["meta"]["theirs_nan_when_beta_above_max"] == "True"
    r = ref["fs3"] @ ref["dt"]
    beta = r.abs().max().item() * 1.01
    assert not channel_relevance(ref["fs3"], ref["dt"], beta).any()
    ds = global_direction(ref["fs3"], ref["dt"], ref["std"], ref["channels"], beta)
    assert not any(d.any() for d in ds.values())
    G = ref["G"]
    ws = G.mapping(torch.randn([1, G.z_dim], generator=torch.Generator().manual_seed(4)), None)
    with torch.no_grad():
        edited = G.synthesis(styles=apply_direction(G.synthesis.styles(ws), ds, 10.0), noise_mode="const")
        assert torch.equal(edited, G.synthesis(ws, noise_mode="const"))


def test_fs3_that_does_not_fit_the_generator_is_refused(ref):
    fs3, dt, std, channels = ref["fs3"], ref["dt"], ref["std"], ref["channels"]
    with pytest.raises(DirectionError, match="end inside layer"):
        global_direction(fs3[:-10], dt, std, channels, 0.0)
    with pytest.raises(DirectionError, match="more than"):
        global_direction(torch.randn(1000, dt.shape[0]), dt, std, channels, 0.0)
    with pytest.raises(DirectionError, match="do not fit"):
        global_direction(fs3, dt[:-1], std, channels, 0.0)
