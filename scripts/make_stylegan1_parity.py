"""Regenerate tests/fixtures/stylegan1_parity.safetensors from a local clone of lernapparat/lernapparat.

    git clone https://github.com/lernapparat/lernapparat /tmp/lernapparat
    python scripts/make_stylegan1_parity.py --reference /tmp/lernapparat

The reference is the "StyleGAN in PyTorch" notebook (style_gan/pytorch_style_gan.ipynb), the port whose
`karras2019stylegan-ffhq-1024x1024.pt` files people use. This script runs the notebook's definition cells from
the clone (nothing of them is stored here), builds small generators with them, gives every parameter random values
drawn by name from a seed (tests/fingerprints.seeded_weights) and each noise layer a noise map drawn from another,
and records the seeds, the port's parameter names and shapes (so that the test draws the same weights without
storing them), the names of its fixed blur buffers (each checked to equal our engine.stylegan1.Blur's kernel, which
the tests put there), inputs and outputs (CPU, float32). Case "a" is 128 px so that the fused upscale (from 128 px)
is covered; case "b" is 32 px with a narrow w. The mapping network is the port's own (512 wide, 18 ws).
tests/test_stylegan1_parity.py checks our generator against them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from engine.stylegan1 import Blur  # noqa: E402
from fingerprints import seeded_in_order, seeded_weights, source_commit, write_fixture  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "stylegan1_parity.safetensors"
NOTEBOOK = Path("style_gan") / "pytorch_style_gan.ipynb"

# The reference G_synthesis arguments per case (our StyleGAN1Config uses the same names for these four).
CASES = {
    "a": dict(w_dim=32, img_resolution=128, fmap_base=256, fmap_max=16),
    "b": dict(w_dim=24, img_resolution=32, fmap_base=64, fmap_max=8),
}
BATCH = 2
SEEDS = {"mapping": 7, "a": 2019, "b": 2020, "noise": 11}  # of the weights drawn by name, and of the noise maps


def load_reference(clone: Path) -> dict:
    """Run the notebook's import and definition cells (not its demos or conversion) and return their names."""
    cells = json.loads((clone / NOTEBOOK).read_text())["cells"]
    ns: dict = {}
    for cell in cells:
        src = "".join(cell["source"])
        if cell["cell_type"] != "code" or "%matplotlib" in src or src.lstrip().startswith(("if 0", "g_all")):
            continue
        exec(compile(src.replace("import IPython", ""), str(clone / NOTEBOOK), "exec"), ns)
    return ns


def draw(module: torch.nn.Module, seed: int, prefix: str) -> dict[str, list[int]]:
    """Give the module's parameters weights drawn by name from `seed`; returns their names (with `prefix`, as in a
    port file) and shapes, which the fixture records."""
    shapes = {prefix + k: list(p.shape) for k, p in module.named_parameters()}
    weights = seeded_weights(shapes, seed)
    with torch.no_grad():
        for k, p in module.named_parameters():
            p.copy_(weights[prefix + k])
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="local clone of lernapparat/lernapparat")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    ref = load_reference(args.reference)

    torch.manual_seed(2019)
    tensors: dict[str, torch.Tensor] = {}
    param_shapes: dict[str, dict[str, list[int]]] = {}
    buffer_names: dict[str, list[str]] = {}

    mapping = ref["G_mapping"]().eval()
    param_shapes["mapping"] = draw(mapping, SEEDS["mapping"], "g_mapping.")
    z = torch.randn([BATCH, 512]) * 1.5
    with torch.no_grad():
        ws = mapping(z)
    tensors["map.z"], tensors["map.ws"] = z, ws.contiguous()
    print(f"mapping: {sum(p.numel() for p in mapping.parameters())} parameters, ws {tuple(ws.shape)}")

    for name, cfg in CASES.items():
        G = ref["G_synthesis"](dlatent_size=cfg["w_dim"], resolution=cfg["img_resolution"],
                               fmap_base=cfg["fmap_base"], fmap_max=cfg["fmap_max"]).eval()
        param_shapes[name] = draw(G, SEEDS[name], "g_synthesis.")
        # its buffers are one fixed blur kernel, learned by nothing: their names are recorded, so that a test can
        # write a port file whole, and the kernel is checked to be ours, which the test puts there
        buffers, kernel = dict(G.named_buffers()), Blur().kernel
        assert all(torch.equal(b, kernel) for b in buffers.values()), "the port's blur kernel is not ours"
        buffer_names[name] = [f"g_synthesis.{k}" for k in buffers]
        noise_layers = [m for m in G.modules() if type(m).__name__ == "NoiseLayer"]
        num_ws = 2 * len(G.blocks)
        ws = torch.randn([BATCH, num_ws, cfg["w_dim"]])
        with torch.no_grad():
            # noise as fixed maps (the notebook's `.noise` attribute), then without noise (zero maps)
            sizes = [int(k.split("x")[0]) for k in G.blocks for _ in (0, 1)]
            maps = seeded_in_order([[1, 1, size, size] for size in sizes], SEEDS["noise"])
            for layer, noise in zip(noise_layers, maps):
                layer.noise = noise
            img_noise = G(ws)
            for layer, noise in zip(noise_layers, maps):
                layer.noise = torch.zeros_like(noise)
            img_none = G(ws)
        tensors[f"{name}.ws"], tensors[f"{name}.img_noise"], tensors[f"{name}.img_none"] = ws, img_noise, img_none
        print(f"case {name}: {sum(p.numel() for p in G.parameters())} parameters, image {tuple(img_noise.shape)}")

    # The full FFHQ 1024 model's state dict names and shapes, to prove that a real port file loads strictly.
    g_all = torch.nn.Sequential()
    g_all.add_module("g_mapping", ref["G_mapping"]())
    g_all.add_module("g_synthesis", ref["G_synthesis"]())
    shapes = {k: list(v.shape) for k, v in g_all.state_dict().items()}
    meta = {"cases": json.dumps(CASES), "seeds": json.dumps(SEEDS), "param_shapes": json.dumps(param_shapes),
            "buffer_names": json.dumps(buffer_names),
            "ffhq_shapes": json.dumps(shapes), "ffhq_parameters": str(sum(p.numel() for p in g_all.parameters())),
            "reference": f"lernapparat/lernapparat {source_commit(args.reference)} {NOTEBOOK}, CPU float32"}
    write_fixture(args.out, tensors, meta)
    print(f"FFHQ model: {meta['ffhq_parameters']} parameters")


if __name__ == "__main__":
    main()
