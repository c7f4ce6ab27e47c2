"""Regenerate tests/fixtures/tf_parity.safetensors: tiny TensorFlow-layout network pickles and what the references
render from them.

    python scripts/make_tf_parity.py --reference /tmp/stylegan2-ada-pytorch --port /tmp/lernapparat

(NVIDIA's dnnlib and legacy.py import `requests` and `click`: pip install them first.)

For each case it draws random TensorFlow variables (NVIDIA's names, shapes and layouts, tests/tf_formats.py) and
writes them as a TF-era `(G, D, Gs)` pickle with stub `dnnlib.tflib.network.Network` classes, no TensorFlow needed.

- StyleGAN2 cases (config F `skip`; config E `orig`; `resnet` with a label embedding and conv_clamp, as
  StyleGAN2-ADA's TensorFlow release writes them): NVIDIA's own converter, `legacy.load_network_pkl` from the
  clone, turns the pickle into their PyTorch generator, which computes ws from z (with and without truncation) and
  images (noise_mode 'const' and 'none', reference ops, CPU float32).
- StyleGAN1 case: the variables are mapped onto the PyTorch port's names by the conversion cell of lernapparat's
  notebook (its `key_translate` / `weight_translate`, run from the clone), and the port's own modules render them:
  mapping, the original's truncation (`Truncation` with the pickle's psi and cutoff), synthesis with the pickle's
  noise maps and without noise.

The fixture stores only numbers: the seeds of the variables (tf_formats.random_variables draws them, so that
tests/test_tf_pickles.py writes the same pickles with the same stub code), the kwargs in the metadata, inputs and
outputs. No weights, and nothing of the references' code, are stored.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from fingerprints import source_commit, write_fixture  # noqa: E402
from tf_formats import random_variables, tf_generator, to_numpy_scalars, write_tf_pkl  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "tf_parity.safetensors"
NOTEBOOK = Path("style_gan") / "pytorch_style_gan.ipynb"
CONVERSION_FUNCTIONS = ("key_translate", "weight_translate")  # defined in the notebook's conversion cell

# Gs static kwargs per case, as the training scripts pass them (what a released file carries).
CASES = {
    "f": ("stylegan2", dict(num_channels=3, resolution=32, label_size=0, latent_size=16, dlatent_size=16,
                            mapping_layers=2, mapping_fmaps=16, fmap_base=128, fmap_max=16)),
    "orig": ("stylegan2", dict(num_channels=3, resolution=16, label_size=0, latent_size=8, dlatent_size=12,
                               mapping_layers=1, fmap_base=64, fmap_max=16, architecture="orig")),
    "resnet": ("stylegan2", dict(num_channels=3, resolution=16, label_size=2, latent_size=8, dlatent_size=8,
                                 mapping_layers=2, mapping_fmaps=8, fmap_base=64, fmap_max=16, architecture="resnet",
                                 conv_clamp=1.5, num_fp16_res=2, w_avg_beta=0.995)),
    "sg1": ("stylegan1", dict(num_channels=3, resolution=32, label_size=0, latent_size=16, dlatent_size=16,
                              mapping_layers=2, mapping_fmaps=16, fmap_base=64, fmap_max=8, truncation_psi=0.6,
                              truncation_cutoff=4)),
}
VARIABLE_SEEDS = {"f": 2020, "orig": 2021, "resnet": 2022, "sg1": 2023}
BATCH = 2
TRUNCATION_PSI = 0.5  # StyleGAN2 cases: the PyTorch API's truncation, from the file's dlatent_avg


def nvidia_generator(reference: Path, pkl: Path):
    """NVIDIA's PyTorch generator, converted from the TF pickle's Gs by their legacy.py: the two steps of
    `load_network_pkl` for the generator (its unpickler with the Network stub, `convert_tf_generator`); the tiny
    pickles' discriminator is a stand-in that their D converter would not take."""
    if str(reference) not in sys.path:
        sys.path.insert(1, str(reference))
    import legacy  # from the reference clone

    with open(pkl, "rb") as f:
        _G, _D, Gs = legacy._LegacyUnpickler(f).load()
    return legacy.convert_tf_generator(Gs).eval()


def stylegan2_case(name: str, kwargs: dict, variables: dict, reference: Path, tmp: Path) -> dict[str, torch.Tensor]:
    pkl = tmp / f"{name}.pkl"
    write_tf_pkl(pkl, tf_generator("stylegan2", kwargs, to_numpy_scalars(variables)), family="stylegan2")
    G = nvidia_generator(reference, pkl)
    z = torch.randn([BATCH, G.z_dim])
    c = torch.nn.functional.one_hot(torch.arange(BATCH) % G.c_dim, G.c_dim).float() if G.c_dim else None
    with torch.no_grad():
        ws = G.mapping(z, c)
        ws_trunc = G.mapping(z, c, truncation_psi=TRUNCATION_PSI)
        img_const = G.synthesis(ws, noise_mode="const", force_fp32=True)
        img_none = G.synthesis(ws_trunc, noise_mode="none", force_fp32=True)
    out = {"z": z, "ws": ws, "ws_trunc": ws_trunc, "img_const": img_const, "img_none": img_none}
    if c is not None:
        out["c"] = c
    print(f"case {name}: NVIDIA's converter -> {type(G).__name__} {sum(p.numel() for p in G.parameters())} "
          f"parameters, architecture {G.synthesis.b4.architecture!r}, image {tuple(img_const.shape)}")
    return out


def notebook_conversion(port: Path) -> dict:
    """`key_translate` and `weight_translate` from the notebook's conversion cell (which sits under `if 0:`)."""
    cells = json.loads((port / NOTEBOOK).read_text())["cells"]
    src = next("".join(c["source"]) for c in cells if "def key_translate" in "".join(c["source"]))
    funcs = [node for node in ast.walk(ast.parse(src)) if isinstance(node, ast.FunctionDef)
             and node.name in CONVERSION_FUNCTIONS]
    ns: dict = {"torch": torch}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(port / NOTEBOOK), "exec"), ns)
    return {name: ns[name] for name in CONVERSION_FUNCTIONS}


def stylegan1_case(name: str, kwargs: dict, variables: dict, port: Path) -> dict[str, torch.Tensor]:
    from make_stylegan1_parity import load_reference

    ref, conv = load_reference(port), notebook_conversion(port)
    w_dim, log2 = kwargs["dlatent_size"], int(np.log2(kwargs["resolution"]))
    # The mapping as the port's G_mapping lays it out (pixel norm, dense{i} + leaky ReLU), at this case's sizes.
    layers = [("pixel_norm", ref["PixelNormLayer"]())]
    width = kwargs["latent_size"]
    for i in range(kwargs["mapping_layers"]):
        layers += [(f"dense{i}", ref["MyLinear"](width, w_dim, gain=2 ** 0.5, lrmul=kwargs.get("mapping_lrmul", 0.01),
                                                  use_wscale=True)),
                   (f"dense{i}_act", torch.nn.LeakyReLU(negative_slope=0.2))]
        width = w_dim
    g_all = torch.nn.Sequential(OrderedDict([
        ("g_mapping", torch.nn.Sequential(OrderedDict(layers))),
        ("g_synthesis", ref["G_synthesis"](dlatent_size=w_dim, num_channels=kwargs["num_channels"],
                                           resolution=kwargs["resolution"], fmap_base=kwargs["fmap_base"],
                                           fmap_max=kwargs["fmap_max"])),
    ])).eval()
    # What the notebook's first step saves: Gs's trainables under '<component name>/<variable>'.
    trainables = {f"G_{k}": torch.from_numpy(v) for k, v in variables.items()
                  if k.startswith(("mapping/", "synthesis/")) and not k.split("/")[1].startswith(("noise", "lod"))}
    key, weight = conv["key_translate"], conv["weight_translate"]
    params = {key(k): weight(k, v) for k, v in trainables.items() if "torgb_lod" not in key(k)}
    missing, unexpected = g_all.load_state_dict(params, strict=False)
    assert not unexpected and all(k.endswith("intermediate.kernel") for k in missing), (missing, unexpected)

    noise = {f"g_synthesis.blocks.{2 ** r}x{2 ** r}.epi{j}.top_epi.noise": variables[f"synthesis/noise{2 * r - 5 + j}"]
             for r in range(2, log2 + 1) for j in (1, 2)}
    layers_by_name = dict(g_all.named_modules())
    truncation = ref["Truncation"](torch.from_numpy(variables["dlatent_avg"]), max_layer=kwargs["truncation_cutoff"],
                                   threshold=kwargs["truncation_psi"])
    z = torch.randn([BATCH, kwargs["latent_size"]])
    with torch.no_grad():
        ws = g_all.g_mapping(z).unsqueeze(1).expand(-1, 2 * log2 - 2, -1).contiguous()
        ws_trunc = truncation(ws)
        for layer_name, value in noise.items():
            layers_by_name[layer_name].noise = torch.from_numpy(value)
        img_const = g_all.g_synthesis(ws)
        for layer_name, value in noise.items():
            layers_by_name[layer_name].noise = torch.zeros(value.shape)
        img_none = g_all.g_synthesis(ws_trunc)
    print(f"case {name}: the port's modules, {len(params)} tensors through the notebook's mapping, "
          f"image {tuple(img_const.shape)}")
    return {"z": z, "ws": ws, "ws_trunc": ws_trunc, "img_const": img_const, "img_none": img_none}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="local clone of NVlabs/stylegan2-ada-pytorch")
    ap.add_argument("--port", type=Path, default=Path("/tmp/lernapparat"),
                    help="local clone of lernapparat/lernapparat")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    torch.manual_seed(2020)
    tensors: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, kwargs) in CASES.items():
            variables = random_variables(family, kwargs, VARIABLE_SEEDS[name])
            if family == "stylegan2":
                out = stylegan2_case(name, kwargs, variables, args.reference, Path(tmp))
            else:
                out = stylegan1_case(name, kwargs, variables, args.port)
            tensors.update({f"{name}.{k}": v for k, v in out.items()})
    meta = {"cases": json.dumps(CASES), "variable_seeds": json.dumps(VARIABLE_SEEDS),
            "truncation_psi": str(TRUNCATION_PSI),
            "source": f"NVlabs/stylegan2-ada-pytorch {source_commit(args.reference)} legacy.py load_network_pkl; "
                      f"lernapparat/lernapparat {source_commit(args.port)} {NOTEBOOK} (conversion cell, modules); "
                      "CPU float32"}
    write_fixture(args.out, tensors, meta)


if __name__ == "__main__":
    main()
