"""Regenerate tests/fixtures/global_directions_parity.safetensors: StyleCLIP's global directions computed by
StyleCLIP's own functions, on tiny inputs.

    git clone https://github.com/orpatashnik/StyleCLIP /tmp/StyleCLIP
    python scripts/make_global_directions_parity.py --styleclip /tmp/StyleCLIP

Nothing of theirs is stored here. The script reads, from the clone, the source of `imagenet_templates`,
`zeroshot_classifier`, `GetDt`, `GetBoundary` and `SplitS` (global_torch/StyleCLIP.py) and of `Manipulator.MSCode`
(global_torch/manipulate.py) and runs them unchanged; only those definitions are executed (importing the files
would also load their StyleGAN code, matplotlib and a CUDA device, which the maths does not use). Given to them:
- `clip`: a module whose `tokenize` is open_clip's `tokenize` (OpenAI's BPE tokenizer as open_clip copies it,
  77 tokens) and a model that is our `stylebot-tiny-clip` (engine/clip_configs/, seed 0, random weights), the
  open_clip model whose `encode_text` returns unnormalised text features as OpenAI's does; `.cuda()` is the
  identity (their code calls it; CPU, float32 here);
- `M` (their Manipulator, as an argument of SplitS and MSCode): the tiny generator's layout
  (`build_builtin(registry_entries()["tiny"])`, 32 px, 11 styled layers): `s_names` its layers in S's order;
  `mindexs` the indices of its conv layers, by the rule their hard-coded ffhq list follows (every layer but the
  toRGBs; checked below against their list for the 1024 px names); `dlatents` S of N_IMAGES latents;
  `code_std` a random positive std per layer (the shape of S_mean_std's second half);
- fs3: random unit rows [CONVS_COVERED channels, clip_dim], covering the convs up to 16 px and leaving the 32 px
  convs out, as the published FFHQ fs3 covers the convs up to 128 px of 26 layers;
- beta: the midpoint of the widest gap between sorted |r| values from the 70th to the 90th percentile, so that no
  channel's |r| lies near it.
"""

from __future__ import annotations

import argparse
import ast
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.edit import TINY_CLIP, ClipScorer  # noqa: E402
from engine.global_directions import IMAGENET_TEMPLATES  # noqa: E402
from engine.registry import build_builtin, registry_entries  # noqa: E402
from fingerprints import fingerprint, source_commit, write_fixture  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "global_directions_parity.safetensors"
TEXTS = ("smiling face", "face")          # target, neutral: their classnames = [target, neutral]
N_IMAGES, SEED = 3, 11
ALPHAS = (-3.0, 0.0, 4.5)                # their M.alpha: the step axis of MSCode's codes
FFHQ_MINDEXS = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24]   # manipulate.py's SetGParameters


def their_definitions(path: Path, names: set[str], ns: dict) -> dict:
    """Execute just the named top-level functions / assignments (or methods, as `Class.method`) of a source file."""
    tree = ast.parse(path.read_text())
    picked = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            picked.append(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets):
            picked.append(node)
        elif isinstance(node, ast.ClassDef):
            picked += [m for m in node.body if isinstance(m, ast.FunctionDef) and f"{node.name}.{m.name}" in names]
    exec(compile(ast.Module(body=picked, type_ignores=[]), str(path), "exec"), ns)
    return ns


@contextmanager
def cuda_is_identity():
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def ffhq_names() -> list[str]:
    """manipulate.py's GetSName for block_resolutions 4 .. 1024 (for checking the mindexs rule)."""
    names = ["conv1_resolution_4", "toRGB_resolution_4"]
    for res in (8, 16, 32, 64, 128, 256, 512, 1024):
        names += [f"conv0_resolution_{res}", f"conv1_resolution_{res}", f"toRGB_resolution_{res}"]
    return names


def conv_indices(names: list[str]) -> list[int]:
    return [i for i, n in enumerate(names) if "RGB" not in n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--styleclip", required=True, type=Path, help="local clone of orpatashnik/StyleCLIP")
    args = ap.parse_args()
    import open_clip

    assert conv_indices(ffhq_names()) == FFHQ_MINDEXS, "the mindexs rule is not theirs"
    scorer = ClipScorer(TINY_CLIP, None)
    clip_module = types.SimpleNamespace(tokenize=open_clip.tokenize)
    ns = their_definitions(args.styleclip / "global_torch" / "StyleCLIP.py",
                           {"imagenet_templates", "zeroshot_classifier", "GetDt", "GetBoundary", "SplitS"},
                           {"np": np, "torch": torch, "copy": __import__("copy"), "clip": clip_module})
    their_definitions(args.styleclip / "global_torch" / "manipulate.py", {"Manipulator.MSCode"}, ns)
    assert tuple(ns["imagenet_templates"]) == IMAGENET_TEMPLATES, "our template strings are not theirs"

    with cuda_is_identity():
        dt = ns["GetDt"](list(TEXTS), scorer.model)                          # [D] float32, unit

    G = build_builtin(registry_entries()["tiny"])
    layers = G.synthesis.style_channels(torgb=True)
    names = list(layers)
    rng = np.random.RandomState(SEED)
    top = f"_{G.img_resolution}"                                            # the block fs3 leaves out
    covered = sum(w for n, w in layers.items() if "RGB" not in n and not n.endswith(top))
    fs3 = rng.randn(covered, dt.shape[0]).astype(np.float32)
    fs3 /= np.linalg.norm(fs3, axis=1, keepdims=True)
    code_std = [(0.2 + rng.rand(w)).astype(np.float32) for w in layers.values()]
    with torch.no_grad():
        ws = G.mapping(torch.from_numpy(rng.randn(N_IMAGES, G.z_dim).astype(np.float32)), None)
        S = G.synthesis.styles(ws)
    dlatents = [S[n].numpy() for n in names]

    r = np.abs(np.dot(fs3, dt))
    srt = np.sort(r)
    lo, hi = int(0.7 * len(srt)), int(0.9 * len(srt))                        # keep 10 to 30 % of the channels
    i = lo + int(np.argmax(np.diff(srt[lo:hi + 1])))
    beta = float((srt[i] + srt[i + 1]) / 2)

    M = types.SimpleNamespace(s_names=names, mindexs=conv_indices(names), dlatents=dlatents, code_std=code_std,
                              alpha=[np.float32(a) for a in ALPHAS], num_images=N_IMAGES, manipulate_layers=None)
    boundary, num_c = ns["GetBoundary"](fs3, dt, M, beta)
    codes = ns["MSCode"](M, dlatents, boundary)                              # per layer [N, steps, channels]
    with np.errstate(all="ignore"):
        above, _ = ns["GetBoundary"](fs3, dt, M, float(r.max()) * 1.01)
    nan_above = all(np.isnan(b).all() for b, n in zip(above, names) if "RGB" not in n and not n.endswith(top))

    tensors = {"dt": torch.from_numpy(dt), "fs3": torch.from_numpy(fs3)}
    for n, b, c, s, sd in zip(names, boundary, codes, dlatents, code_std, strict=True):
        tensors |= {f"boundary.{n}": torch.from_numpy(np.asarray(b, dtype=np.float32)),
                    f"codes.{n}": torch.from_numpy(c), f"S.{n}": torch.from_numpy(s), f"std.{n}": torch.from_numpy(sd)}
    meta = {"source": f"orpatashnik/StyleCLIP {source_commit(args.styleclip)} global_torch/StyleCLIP.py "
                      "(imagenet_templates, zeroshot_classifier, GetDt, GetBoundary, SplitS), "
                      "global_torch/manipulate.py (Manipulator.MSCode)",
            "target": TEXTS[0], "neutral": TEXTS[1], "beta": repr(beta), "alphas": ",".join(map(repr, ALPHAS)),
            "num_c": str(int(num_c)), "layers": ",".join(names), "clip": TINY_CLIP,
            "clip_fingerprint": fingerprint(scorer.model), "generator_fingerprint": fingerprint(G),
            "theirs_nan_when_beta_above_max": str(nan_above)}
    print(f"beta {beta:.6g}, channels kept {num_c} of {covered}; beta above max |r| gives NaN in theirs: {nan_above}")
    write_fixture(OUT, tensors, meta)


if __name__ == "__main__":
    main()
