"""The edit recipes are their sources, step for step: our latents against the ones StyleCLIP's own script
("styleclip") and the seed project's StyleCLIP notebook ("seed") computed on the same tiny networks
(scripts/make_edit_parity.py: OpenAI's CLIP class holding our tiny CLIP's weights, a 64 px generator so that the
pooling averages, constant noise on both sides)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from engine.edit import EDIT_RECIPES, TINY_CLIP, ClipScorer, edit
from engine.registry import FAMILIES
from engine.pool import OptimisationPool
from fingerprints import fingerprint, steps_from_reference

PATH = FIXTURES / "edit_parity.safetensors"

# Each step is taken from the reference's own state (latent and Adam moments: fingerprints.steps_from_reference), so
# the bound is on one step, not on a trail in which a loop can amplify rounding. Both sides run the same generator,
# the same CLIP weights and the same Adam; what differs is the order of float32 sums (OpenAI's CLIP class against
# open_clip's, `logit_scale * a @ b.T` against our cosine times the scale, the L2 summed per sample), a few ulp of a
# gradient, which Adam divides by the gradient's running RMS: a coordinate whose gradient is near zero can move by
# a visible part of its step. Measured: at most 1.6e-6 (styleclip) and 1.5e-6 (seed) in one step, against steps of
# up to 0.1 (lr) per coordinate. Whole 20-step trails are no such proof: the loop amplifies those differences, to
# 1.2e-4 after 20 steps (styleclip, 1 thread, AMD EPYC) where the same run on 2 threads stayed within 1e-6; the loss
# of every step, checked below, is insensitive to that. What the bound catches (measured, final latent against the reference's): the seed's ramp-down given to
# styleclip 0.049, StyleCLIP's to the seed 0.034, [0, 1] pixels for styleclip 0.14, [-1, 1] pixels for the seed
# 0.18, CLIP's mean/std normalisation 0.07-0.17.
TOL = 1e-4


@pytest.fixture(scope="module")
def fx():
    tensors, meta = load_file(str(PATH)), safe_open(str(PATH), "pt").metadata()
    config_cls, generator_cls = FAMILIES["stylegan2"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(meta["generator_seed"]))
        G = generator_cls(config_cls(**json.loads(meta["arch"])), model_id="edit-parity").eval().requires_grad_(False)
    clip = ClipScorer(meta["clip"], None)
    assert meta["clip"] == TINY_CLIP
    assert fingerprint(G) == meta["generator_fingerprint"] and fingerprint(clip.model) == meta["clip_fingerprint"], (
        "the tiny networks the fixture was computed with are no longer what our builders make: "
        "regenerate it with scripts/make_edit_parity.py")
    return tensors, meta, G, clip


@pytest.mark.parametrize("recipe", ["styleclip", "seed"])
def test_edit_recipe_equals_its_source_at_every_step(fx, recipe):
    tensors, meta, G, clip = fx
    ref, w0, steps, prompt = tensors[f"{recipe}.ws"], tensors["w0"][None], int(meta["steps"]), meta["prompt"]
    # the continuous engine's pool, its Adam state kept row by row between ticks: every step, taken from the
    # reference's own latent and moments, lands on the reference's next latent
    pool = OptimisationPool(G, clip=clip, edit_recipe=recipe)
    pool.add_edit("me", w0[0], prompt, steps=steps)
    worst = steps_from_reference(pool, "me", w0[0], ref, tensors[f"{recipe}.m"], tensors[f"{recipe}.v"], TOL)
    print(f"{recipe}: largest one-step difference {worst:.2g}")
    # edit(), run through all the steps on its own: the loss of every step (the reference's CLIP term plus its L2 at
    # the latent the step started from; 1e-5 of a loss near 1)
    result = edit(G, clip, w0, prompt, recipe=recipe, steps=steps)
    before = torch.cat([w0, ref[:-1]])
    theirs = tensors[f"{recipe}.clip_losses"] + EDIT_RECIPES[recipe].l2 * (before - w0).square().flatten(1).sum(1)
    assert (torch.from_numpy(result.losses[:, 0]) - theirs).abs().max() < 1e-5
    assert (ref[-1] - w0[0]).abs().max() > 0.05  # the latent really travelled during the checked steps


def test_the_recipes_differ_where_the_bound_can_see_it(fx):
    """What the parity test tells apart: each recipe run as the other (ramp-down, pixels, L2) leaves the other's
    reference trail by far more than TOL."""
    tensors, meta, G, clip = fx
    w0, steps, prompt = tensors["w0"][None], int(meta["steps"]), meta["prompt"]
    for ours, theirs in (("styleclip", "seed"), ("seed", "styleclip")):
        other = edit(G, clip, w0, prompt, recipe=ours, steps=steps).ws[0]
        assert (other - tensors[f"{theirs}.ws"][-1]).abs().max() > 100 * TOL
