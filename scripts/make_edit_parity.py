"""Regenerate tests/fixtures/edit_parity.safetensors: StyleCLIP's own optimisation loop and the seed project's
StyleCLIP notebook, run on tiny networks.

    git clone https://github.com/orpatashnik/StyleCLIP /tmp/StyleCLIP
    git clone https://github.com/ChoiDae1/StyleGAN_Project /tmp/StyleGAN_Project
    pip install openai-clip 'setuptools<81'   # OpenAI's `clip` package, as both sources use (needs pkg_resources)
    python scripts/make_edit_parity.py --styleclip /tmp/StyleCLIP --seed /tmp/StyleGAN_Project

Nothing of theirs is stored here: the script runs, from the clones,
- StyleCLIP's `optimization/run_optimization.py` `main(args)` with its own `criteria/clip_loss.py` (recipe
  "styleclip"), and
- the seed notebook `StyleCLIP.ipynb`'s cells for its CLIPLoss, its arguments, its `get_lr` and set-up, and its loop
  (recipe "seed"),
with these substitutions, which change what the loops are given, not what they do:
- CLIP is OpenAI's `clip.model.CLIP` (from the `clip` package, as `clip.load` builds it) at our tiny CLIP's
  architecture (ViT, 224 px, patch 32, QuickGELU: ViT-B/32's design at a fraction of the width) holding the weights
  of our `stylebot-tiny-clip` (engine/clip_configs/, seed 0); `clip.load` returns it; `clip.tokenize` is theirs;
- the generator is our StyleGAN2 at ARCH (64 px, so that the pooling really averages: kernel 64 // 32 = 2), seeded
  weights, constant noise; StyleCLIP's `models.stylegan2.model.Generator` (rosinality's, which needs CUDA ops to
  import) is a wrapper that calls it for `g_ema([latent], input_is_latent=True, randomize_noise=False)`, and the
  notebook's `g_synthesis` is its synthesis; our generator's agreement with NVIDIA's is proven apart
  (tests/test_stylegan2_parity.py);
- the start latent is w0 below (`--latent_path`, a file in a temporary folder); `--stylegan_size` 64; `--step`
  and the notebook's `args.step` are STEPS (theirs 300 and 150); the prompt is PROMPT on both (the notebook's cell
  says 'really sad face'); the notebook's `AvgPool2d(kernel_size=32)` (for its
  1024 px model) is `kernel_size=64 // 32`, the rule StyleCLIP's own file writes as `stylegan_size // 32`;
- StyleCLIP's IDLoss (unused at its default id_lambda 0, but built, loading ArcFace weights) is a stub;
  `--save_intermediate_image_every 0` (its image saving passes torchvision a keyword that torchvision has since
  removed; the loop's numbers do not depend on it); `.cuda()` is the identity; the notebook writes its images into a
  temporary folder.
The latent and Adam's moments after every optimiser step, and the CLIP loss of every step are recorded (CPU, float32).
tests/test_edit_parity.py checks `edit(..., recipe="styleclip" | "seed")` and the continuous pool against them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.edit import TINY_CLIP, ClipScorer  # noqa: E402
from engine.registry import FAMILIES  # noqa: E402
from fingerprints import RecordingAdam, fingerprint, source_commit, write_fixture  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "edit_parity.safetensors"
NOTEBOOK = "StyleCLIP.ipynb"
CELLS = {"clip_loss": 19, "args": 21, "setup": 22, "loop": 24}  # the notebook's code cells the loop needs, by index
ARCH = {"z_dim": 64, "w_dim": 64, "img_resolution": 64, "channel_base": 1024, "channel_max": 32, "conv_clamp": 256}
GENERATOR_SEED = 7
LATENT_SEED = 5
PROMPT = "really angry face"
STEPS = 20


def build_generator(arch: dict, seed: int):
    """Our StyleGAN2 at `arch` with seeded random weights (the test rebuilds it the same way)."""
    config_cls, generator_cls = FAMILIES["stylegan2"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return generator_cls(config_cls(**arch), model_id="edit-parity").eval().requires_grad_(False)


def start_latent(G, seed: int) -> torch.Tensor:
    """[1, num_ws, w_dim]: a truncated w of a seeded z, broadcast."""
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.mapping(z, None, truncation_psi=0.7).clone()


def openai_clip(ours: torch.nn.Module) -> torch.nn.Module:
    """OpenAI's CLIP class at the tiny CLIP's architecture, holding its weights (the keys are the same)."""
    from clip.model import CLIP

    v, t = ours.visual, ours.transformer
    model = CLIP(embed_dim=ours.text_projection.shape[1], image_resolution=v.image_size[0],
                 vision_layers=len(v.transformer.resblocks), vision_width=v.conv1.out_channels,
                 vision_patch_size=v.patch_size[0], context_length=ours.context_length, vocab_size=ours.vocab_size,
                 transformer_width=t.width, transformer_heads=t.resblocks[0].attn.num_heads,
                 transformer_layers=len(t.resblocks))
    model.load_state_dict(ours.state_dict(), strict=True)
    return model.eval().requires_grad_(False)


class ReferenceGenerator(torch.nn.Module):
    """Stands in for rosinality's Generator in StyleCLIP's script: our generator, W+ input, constant noise."""

    G = None

    def __init__(self, size, style_dim, n_mlp):
        super().__init__()
        assert size == ReferenceGenerator.G.img_resolution, (size, ReferenceGenerator.G.img_resolution)

    def load_state_dict(self, state, strict=True):
        return None

    def mean_latent(self, n):
        return ReferenceGenerator.G.mapping.w_avg[None].clone()

    def forward(self, styles, input_is_latent=False, randomize_noise=True, input_is_stylespace=False,
                return_latents=False):
        assert input_is_latent and not randomize_noise and not input_is_stylespace and not return_latents
        return ReferenceGenerator.G.synthesis(styles[0], noise_mode="const"), None


@contextmanager
def cuda_is_cpu():
    """`.cuda()` on tensors and modules is the identity while the reference runs."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


@contextmanager
def recording_clip_loss(losses: list[float], cls):
    """Record every value of a CLIPLoss class's forward (the CLIP term of each step's loss)."""
    inner = cls.forward

    def forward(self, image, text):
        out = inner(self, image, text)
        losses.append(float(out.detach().reshape(-1)[0]))
        return out

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = inner


def run_styleclip(clone: Path, G, clip_model, w0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """StyleCLIP's run_optimization.main on w0: latents and Adam's moments after every step (each [STEPS, 1,
    num_ws, w_dim]), CLIP losses [STEPS]."""
    import clip

    ReferenceGenerator.G = G
    stubs = {"models.stylegan2.model": types.SimpleNamespace(Generator=ReferenceGenerator),
             "criteria.id_loss": types.SimpleNamespace(IDLoss=lambda opts: None)}
    saved_modules = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    sys.path.insert(0, str(clone))
    saved_load = clip.load
    clip.load = lambda name, device=None, **kw: (clip_model, None)
    losses: list[float] = []
    try:
        sys.modules.pop("optimization.run_optimization", None)
        sys.modules.pop("criteria.clip_loss", None)
        import criteria.clip_loss
        from optimization import run_optimization

        run_optimization.optim = types.SimpleNamespace(Adam=RecordingAdam)
        RecordingAdam.trail = []
        with tempfile.TemporaryDirectory() as tmp, cuda_is_cpu(), \
                recording_clip_loss(losses, criteria.clip_loss.CLIPLoss):
            torch.save({"g_ema": {}}, Path(tmp) / "g.pt")
            torch.save(w0, Path(tmp) / "w0.pt")
            args = Namespace(description=PROMPT, ckpt=str(Path(tmp) / "g.pt"), stylegan_size=G.img_resolution,
                             lr_rampup=0.05, lr=0.1, step=STEPS, mode="edit", l2_lambda=0.008, id_lambda=0.0,
                             latent_path=str(Path(tmp) / "w0.pt"), truncation=0.7, work_in_stylespace=False,
                             save_intermediate_image_every=0, results_dir=str(Path(tmp) / "results"),
                             ir_se50_weights="")
            run_optimization.main(args)
    finally:
        clip.load = saved_load
        sys.path.remove(str(clone))
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return (*RecordingAdam.stacked(), torch.tensor(losses))


def notebook_cells(clone: Path) -> dict[str, str]:
    cells = json.loads((clone / NOTEBOOK).read_text())["cells"]
    return {name: "".join(cells[i]["source"]) for name, i in CELLS.items()}


def substitute(code: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for theirs, ours in pairs:
        assert theirs in code, f"the notebook no longer says {theirs!r}"
        code = code.replace(theirs, ours)
    return code


def run_seed_notebook(clone: Path, G, clip_model, w0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The seed notebook's StyleCLIP cells on w0: latents and Adam's moments after every step, CLIP losses."""
    import clip
    import torchvision

    cells = notebook_cells(clone)
    saved_load = clip.load
    clip.load = lambda name, device=None, **kw: (clip_model, None)
    ns: dict = {"torch": torch, "device": "cpu", "latent_code_init": w0.clone(), "img_name": "face",
                "g_synthesis": lambda w: G.synthesis(w, noise_mode="const")}
    losses: list[float] = []
    cwd = os.getcwd()
    try:
        exec(compile(substitute(cells["clip_loss"], (("kernel_size=32", f"kernel_size={G.img_resolution // 32}"),)),
                     NOTEBOOK, "exec"), ns)
        exec(compile(substitute(cells["args"], (("args.step = 150", f"args.step = {STEPS}"),
                                                ("args.description = 'really sad face'",
                                                 f"args.description = {PROMPT!r}"))), NOTEBOOK, "exec"), ns)
        ns["optim"] = types.SimpleNamespace(Adam=RecordingAdam)
        setup = substitute(cells["setup"], (("from torch import optim\n", ""),))
        exec(compile(setup, NOTEBOOK, "exec"), ns)
        RecordingAdam.trail = []
        with tempfile.TemporaryDirectory() as tmp, recording_clip_loss(losses, ns["CLIPLoss"]):
            os.chdir(tmp)
            ns["torchvision"] = torchvision
            exec(compile(cells["loop"], NOTEBOOK, "exec"), ns)
    finally:
        os.chdir(cwd)
        clip.load = saved_load
    return (*RecordingAdam.stacked(), torch.tensor(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--styleclip", required=True, type=Path, help="local clone of orpatashnik/StyleCLIP")
    ap.add_argument("--seed", required=True, type=Path, help="local clone of ChoiDae1/StyleGAN_Project")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)

    G = build_generator(ARCH, GENERATOR_SEED)
    ours = ClipScorer(TINY_CLIP, None).model
    theirs = openai_clip(ours)
    w0 = start_latent(G, LATENT_SEED)
    tensors = {"w0": w0[0]}
    for name, run in (("styleclip", lambda: run_styleclip(args.styleclip, G, theirs, w0)),
                      ("seed", lambda: run_seed_notebook(args.seed, G, theirs, w0))):
        ws, m, v, losses = run()
        assert ws.shape[0] == STEPS and losses.shape[0] == STEPS, (ws.shape, losses.shape)
        print(f"{name}: {STEPS} steps, CLIP loss {losses[0]:.5f} -> {losses[-1]:.5f}, "
              f"latent moved {(ws[-1] - w0).abs().max():.4f}")
        tensors |= {f"{name}.ws": ws[:, 0], f"{name}.m": m[:, 0], f"{name}.v": v[:, 0], f"{name}.clip_losses": losses}

    # The networks are not stored: both are built from fixed seeds by our code on torch's CPU generator, which draws
    # the same numbers on every machine; their fingerprints say when a change of ours makes them others.
    meta = {"source": f"orpatashnik/StyleCLIP {source_commit(args.styleclip)} optimization/run_optimization.py "
                      f"criteria/clip_loss.py; ChoiDae1/StyleGAN_Project {source_commit(args.seed)} {NOTEBOOK} "
                      f"cells {CELLS}",
            "arch": json.dumps(ARCH), "generator_seed": str(GENERATOR_SEED), "prompt": PROMPT, "steps": str(STEPS),
            "generator_fingerprint": fingerprint(G), "clip": TINY_CLIP, "clip_fingerprint": fingerprint(ours),
            "noise": "constant (our noise_const maps on both sides)", "machine": "CPU float32, 1 thread"}
    write_fixture(args.out, tensors, meta)


if __name__ == "__main__":
    main()
