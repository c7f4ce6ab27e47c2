"""StyleCLIP edits on the tiny generator with a tiny open_clip model (same code path as ViT-B-32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.edit import DEFAULT_EDIT_RECIPE, EDIT_RECIPES, EditError, EditLoss, check_prompt, edit, restyle


@pytest.fixture(scope="module")
def w0(G):
    torch.manual_seed(11)
    with torch.no_grad():
        return G.mapping(torch.randn(2, G.z_dim), None, truncation_psi=0.7)


def test_edit_moves_the_image_toward_the_prompt(G, clip, w0):
    scorer = EditLoss(EDIT_RECIPES[DEFAULT_EDIT_RECIPE], clip, G.img_resolution)
    before = scorer.similarity(G.synthesis(w0[:1]), clip.encode_text(["really angry face"])).item()
    result = edit(G, clip, w0[:1], "really angry face", steps=40)
    assert result.similarity[0] > before + 0.02
    assert result.losses[-1, 0] < result.losses[0, 0]
    assert not torch.equal(result.ws, result.w0)
    assert result.images.shape == (1, 32, 32, 3)


def test_l2_keeps_the_edit_near_the_start(G, clip, w0):
    loose = edit(G, clip, w0[:1], "a smiling face", steps=30, l2=0.0)
    tight = edit(G, clip, w0[:1], "a smiling face", steps=30, l2=1.0)
    assert (tight.ws - tight.w0).norm() < (loose.ws - loose.w0).norm()


def test_batched_edits_equal_single_ones(G, clip, w0):
    """A user's edit does not depend on who shares its batch. Rows never mix, but float32 sums run in another order
    at another batch size (~1e-7 relative), and Adam divides each coordinate by its own gradient RMS, so coordinates
    whose gradient is near zero turn that noise into full-size steps: on the tiny random CLIP the gap grows from
    ~1e-5 of the edit after 4 steps to ~4% after 30 (measured, 1 and 2 threads). So compare early, relative to
    the edit's size: cross-talk between rows would be of the order of the edit itself, 1e3 times the bound."""
    batch = edit(G, clip, w0, ["angry", "smiling"], steps=4)
    single = edit(G, clip, w0[1:], "smiling", steps=4)
    moved = (single.ws[0] - single.w0[0]).norm()
    assert moved > 0
    assert (batch.ws[1] - single.ws[0]).norm() < 1e-3 * moved


def test_stronger_is_one_pass_along_the_same_direction(G, clip, w0):
    result = edit(G, clip, w0[:1], "angry", steps=10)
    same, img = restyle(G, result.w0, result.ws, 1.0)
    assert torch.allclose(same, result.ws) and np.array_equal(img, result.images)
    strong, _ = restyle(G, result.w0, result.ws, 1.5)
    assert torch.allclose(strong - result.w0, 1.5 * (result.ws - result.w0), atol=1e-6)


def test_recipes_and_prompt_limits():
    """The recipes' numbers as their sources print them (their loops are proven step for step in test_edit_parity)."""
    assert DEFAULT_EDIT_RECIPE == "styleclip"
    styleclip, seed = EDIT_RECIPES["styleclip"], EDIT_RECIPES["seed"]
    assert (styleclip.steps, styleclip.l2, styleclip.lr, styleclip.rampup, styleclip.rampdown) == (300, 0.008, 0.1,
                                                                                                   0.05, 0.25)
    assert (seed.steps, seed.l2, seed.lr, seed.rampup, seed.rampdown) == (150, 0.005, 0.1, 0.05, 0.50)
    assert seed.unit_pixels and not styleclip.unit_pixels
    assert check_prompt("  really   angry face ") == "really angry face"
    with pytest.raises(EditError, match="prompt is empty"):
        check_prompt("   ")
    with pytest.raises(EditError, match="keep it under 200"):
        check_prompt("x" * 201)


def test_openai_weights_get_the_quickgelu_network_they_were_trained_with(clip):
    """open_clip's "ViT-B-32" config uses nn.GELU; OpenAI's weights (StyleCLIP's CLIP) were trained with QuickGELU,
    and open_clip would load them into the GELU network with a warning only. Ours asks for QuickGELU whenever the
    pretrained tag says so."""
    from engine.edit import _trained_with_quick_gelu

    assert _trained_with_quick_gelu("ViT-B-32", "openai")
    assert not _trained_with_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not _trained_with_quick_gelu("ViT-B-32", None)
    acts = {type(m).__name__ for m in clip.model.modules() if "GELU" in type(m).__name__}
    assert acts == {"QuickGELU"}  # the tiny CLIP is OpenAI's architecture too


def test_a_clip_that_does_not_take_224_px_is_refused_in_one_line(G, clip, monkeypatch):
    monkeypatch.setattr(clip, "size", 336)
    with pytest.raises(EditError, match="pooling makes 224 px images and CLIP model .* takes 336 px: use a 224 px CLIP"):
        edit(G, clip, torch.zeros(1, G.num_ws, G.w_dim), "angry", steps=1)


def test_uncached_clip_weights_fail_in_seconds_with_what_to_do(tmp_path, monkeypatch):
    import socket
    import time

    from engine.edit import ClipScorer, EditError

    with socket.socket() as s:  # a port nothing listens on: the download server is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(EditError) as e:
        ClipScorer("ViT-B-32", "openai")
    assert time.monotonic() - t0 < 10
    assert str(e.value).startswith("CLIP model ViT-B-32 (openai) is not in open_clip's cache and 127.0.0.1 cannot")
    assert str(e.value).endswith("run once with internet to cache it, or use --clip tiny")


def test_open_clip_chatter_stays_out_of_the_terminal():
    """The engine logs our messages at INFO; building a CLIP must not add open_clip's INFO lines nor its warning
    "No pretrained weights loaded ... initialized randomly" (for the tiny CLIP that is the point): they go to our
    DEBUG log, shown with STYLEBOT_LOG_LEVEL=DEBUG."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = ("from bot.logs import setup_logging; setup_logging(); import logging; "
            "logging.getLogger('stylebot.engine').info('engine ready'); "
            "from engine.edit import TINY_CLIP, ClipScorer; ClipScorer(TINY_CLIP, None)")

    def stderr(**env) -> list[str]:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env={**os.environ, **env})
        assert run.returncode == 0, run.stderr
        return run.stderr.strip().splitlines()

    quiet = stderr()
    assert len(quiet) == 1 and quiet[0].endswith("stylebot.engine engine ready"), quiet
    assert any("open_clip: No pretrained weights loaded" in line for line in stderr(STYLEBOT_LOG_LEVEL="DEBUG"))
