"""Write NVIDIA's TensorFlow-era network pickles without TensorFlow, laid out as tflib wrote them.

A released file (`stylegan2-ffhq-config-f.pkl`, `karras2019stylegan-ffhq-1024x1024.pkl`) is a pickled tuple
`(G, D, Gs)` of `dnnlib.tflib.network.Network` objects. Each pickles through `Network.__getstate__` as a dict:
version, name, static_kwargs (the build function's keyword arguments), components (Gs's `mapping` and `synthesis`
networks), build_module_src (the module's source text), build_func_name, and variables: (name, numpy value) pairs
under TensorFlow's names, relative to the network (`Dense0/weight`, `4x4/Conv/weight`, `noise0`, Gs's own
`lod` and `dlatent_avg`). `Network` below pickles the same way under the same module path, so the bytes are what a
loader of the real files meets. `stylegan2_tf_shapes` / `stylegan1_tf_shapes` list the variables (names and shapes, TF's
layouts: dense [in, out], conv [kh, kw, in, out]) that NVIDIA's build functions create for given kwargs;
`random_variables` draws values for them from a seed (scripts/make_tf_parity.py records the seed, not the values).
"""

from __future__ import annotations

import math
import pickle
import types
from pathlib import Path

import numpy as np

from official_formats import modules_in_place

MODULE_SRC = "# training/networks_stylegan2.py would be here: a normal pickle.load imports and runs it\n"
# family -> (Gs build function, its components' build functions), as NVIDIA's releases name them.
BUILD = {
    "stylegan2": ("G_main", {"mapping": "G_mapping", "synthesis": "G_synthesis_stylegan2"}),
    "stylegan1": ("G_style", {"mapping": "G_mapping", "synthesis": "G_synthesis"}),
}
PROTOCOL = {"stylegan2": 3, "stylegan1": 4}  # StyleGAN2's training loop: pickle's default; StyleGAN's: the highest


class Network:
    """Pickles as dnnlib.tflib.network.Network (its state dict, rebuilt on load through `__setstate__`)."""

    __module__ = "dnnlib.tflib.network"  # found there while `write_tf_pkl` pickles

    def __init__(self, name: str, build_func_name: str, static_kwargs: dict, variables: list, components=None,
                 module_src: str = MODULE_SRC, version: int = 4):
        self.state = dict(version=version, name=name, static_kwargs=dict(static_kwargs),
                          components=dict(components or {}), build_module_src=module_src,
                          build_func_name=build_func_name, variables=list(variables))

    def __getstate__(self):
        return self.state

    def __setstate__(self, state):
        self.state = state


def tf_generator(family: str, kwargs: dict, variables: dict[str, np.ndarray], *, build_func: str | None = None,
                 module_src: str = MODULE_SRC) -> Network:
    """Gs: variables named 'mapping/...', 'synthesis/...' go to those components, the rest (dlatent_avg) to Gs."""
    func, parts = BUILD[family]
    own = [(k, v) for k, v in variables.items() if "/" not in k or k.split("/")[0] not in parts]
    components = {}
    for part, part_func in parts.items():
        comp_vars = [(k[len(part) + 1:], v) for k, v in variables.items() if k.startswith(part + "/")]
        num_ws = 2 * int(math.log2(int(kwargs.get("resolution", 1024)))) - 2
        comp_kwargs = dict(kwargs, dlatent_broadcast=num_ws) if part == "mapping" else dict(kwargs)
        components[part] = Network(f"G_{part}", part_func, comp_kwargs, comp_vars, module_src=module_src,
                                   version=4 if family == "stylegan2" else 3)
    return Network("Gs", build_func or func, kwargs, own, components, module_src=module_src,
                   version=4 if family == "stylegan2" else 3)


def write_tf_pkl(path: Path, Gs: Network, *, family: str = "stylegan2", G: Network | None = None,
                 D: Network | None = None) -> None:
    """Pickle (G, D, Gs) as the training loops did; G defaults to Gs, D to a one-variable discriminator."""
    D = D or Network("D", "D_stylegan2", {}, [("4x4/Conv/weight", np.zeros([3, 3, 2, 2], np.float32))])
    mods = {"dnnlib": types.ModuleType("dnnlib"), "dnnlib.tflib": types.ModuleType("dnnlib.tflib"),
            "dnnlib.tflib.network": types.ModuleType("dnnlib.tflib.network")}
    mods["dnnlib.tflib.network"].Network = Network
    with modules_in_place(mods), open(path, "wb") as f:
        pickle.dump((G or Gs, D, Gs), f, protocol=PROTOCOL[family])


def _nf(kwargs: dict, stage: int, fmap_base: int) -> int:
    return min(int(fmap_base / 2.0 ** stage), int(kwargs.get("fmap_max", 512)))


def _mapping_shapes(kwargs: dict, embed: int) -> dict[str, list[int]]:
    layers, w_dim = int(kwargs.get("mapping_layers", 8)), int(kwargs.get("dlatent_size", 512))
    fmaps = int(kwargs.get("mapping_fmaps", 512))
    shapes, width = {}, int(kwargs.get("latent_size", 512)) + embed
    for i in range(layers):
        out = w_dim if i == layers - 1 else fmaps
        shapes[f"mapping/Dense{i}/weight"], shapes[f"mapping/Dense{i}/bias"] = [width, out], [out]
        width = out
    return shapes


def stylegan2_tf_shapes(kwargs: dict) -> dict[str, list[int]]:
    """Variables of NVIDIA's TF StyleGAN2 Gs (G_main, G_mapping, G_synthesis_stylegan2) for `kwargs`."""
    w_dim, labels = int(kwargs.get("dlatent_size", 512)), int(kwargs.get("label_size", 0))
    log2 = int(math.log2(int(kwargs.get("resolution", 1024))))
    arch, channels = kwargs.get("architecture", "skip"), int(kwargs.get("num_channels", 3))

    def nf(stage: int) -> int:
        return _nf(kwargs, stage, int(kwargs.get("fmap_base", 16 << 10)))

    shapes = {"lod": [], "dlatent_avg": [w_dim]}  # G_main's own: level of detail (for revised synthesis), avg w
    if labels:
        shapes["mapping/LabelEmbed/weight"], shapes["mapping/LabelEmbed/bias"] = [labels, w_dim], [w_dim]
    shapes.update(_mapping_shapes(kwargs, w_dim if labels else 0))
    for idx in range(2 * log2 - 3):  # one noise map per conv (num_layers - 1 of them: the last toRGB has none)
        r = 2 ** ((idx + 5) // 2)
        shapes[f"synthesis/noise{idx}"] = [1, 1, r, r]

    def layer(scope: str, fin: int, fout: int, kernel: int = 3, noise: bool = True) -> None:
        shapes[f"{scope}/weight"] = [kernel, kernel, fin, fout]
        shapes[f"{scope}/mod_weight"], shapes[f"{scope}/mod_bias"] = [w_dim, fin], [fin]
        if noise:
            shapes[f"{scope}/noise_strength"] = []
        shapes[f"{scope}/bias"] = [fout]

    shapes["synthesis/4x4/Const/const"] = [1, nf(1), 4, 4]
    layer("synthesis/4x4/Conv", nf(1), nf(1))
    for res in range(2, log2 + 1):
        s = f"synthesis/{2 ** res}x{2 ** res}"
        if res > 2:
            layer(f"{s}/Conv0_up", nf(res - 2), nf(res - 1))
            layer(f"{s}/Conv1", nf(res - 1), nf(res - 1))
            if arch == "resnet":
                shapes[f"{s}/Skip/weight"] = [1, 1, nf(res - 2), nf(res - 1)]
        if arch == "skip" or res == log2:
            layer(f"{s}/ToRGB", nf(res - 1), channels, kernel=1, noise=False)
    return shapes


def stylegan1_tf_shapes(kwargs: dict) -> dict[str, list[int]]:
    """Variables of the original StyleGAN Gs (G_style, G_mapping, G_synthesis), progressive toRGBs included."""
    w_dim, log2 = int(kwargs.get("dlatent_size", 512)), int(math.log2(int(kwargs.get("resolution", 1024))))
    channels = int(kwargs.get("num_channels", 3))

    def nf(stage: int) -> int:
        return _nf(kwargs, stage, int(kwargs.get("fmap_base", 8192)))

    shapes = {"lod": [], "dlatent_avg": [w_dim], **_mapping_shapes(kwargs, 0), "synthesis/lod": []}
    for idx in range(2 * log2 - 2):
        r = 2 ** (idx // 2 + 2)
        shapes[f"synthesis/noise{idx}"] = [1, 1, r, r]

    def epilogue(scope: str, c: int) -> None:
        shapes[f"{scope}/Noise/weight"], shapes[f"{scope}/bias"] = [c], [c]
        shapes[f"{scope}/StyleMod/weight"], shapes[f"{scope}/StyleMod/bias"] = [w_dim, 2 * c], [2 * c]

    c = nf(1)
    shapes["synthesis/4x4/Const/const"] = [1, c, 4, 4]
    epilogue("synthesis/4x4/Const", c)
    shapes["synthesis/4x4/Conv/weight"] = [3, 3, c, c]
    epilogue("synthesis/4x4/Conv", c)
    for res in range(3, log2 + 1):
        s = f"synthesis/{2 ** res}x{2 ** res}"
        shapes[f"{s}/Conv0_up/weight"] = [3, 3, nf(res - 2), nf(res - 1)]
        epilogue(f"{s}/Conv0_up", nf(res - 1))
        shapes[f"{s}/Conv1/weight"] = [3, 3, nf(res - 1), nf(res - 1)]
        epilogue(f"{s}/Conv1", nf(res - 1))
    for res in range(2, log2 + 1):
        shapes[f"synthesis/ToRGB_lod{log2 - res}/weight"] = [1, 1, nf(res - 1), channels]
        shapes[f"synthesis/ToRGB_lod{log2 - res}/bias"] = [channels]
    return shapes


def to_numpy_scalars(variables: dict[str, np.ndarray]) -> dict:
    """Scalar variables as numpy scalars (what `tfutil.run` returns for them: noise_strength, lod), the rest as
    arrays."""
    return {k: (np.float32(v) if np.ndim(v) == 0 else np.asarray(v, np.float32)) for k, v in variables.items()}


def tf_shapes(family: str, kwargs: dict) -> dict[str, list[int]]:
    return (stylegan2_tf_shapes if family == "stylegan2" else stylegan1_tf_shapes)(kwargs)


def random_variables(family: str, kwargs: dict, seed: int) -> dict[str, np.ndarray]:
    """Random values for the variables of a tiny TF generator, drawn in name order from `seed` (numpy's
    RandomState draws the same numbers on every machine): N(0, 1) weights, N(0, 0.25) vectors and scalars (biases,
    strengths, w_avg); the mapping's divided by its learning-rate multiplier, as TensorFlow initialises them (else
    ws would be about 0); `lod` is 0, as in a finished run."""
    rng = np.random.RandomState(seed)
    out = {}
    for name, shape in sorted(tf_shapes(family, kwargs).items()):
        value = rng.randn(*shape) * (0.5 if len(shape) <= 1 else 1.0)
        if name.startswith("mapping/Dense"):
            value = value / kwargs.get("mapping_lrmul", 0.01)
        out[name] = np.zeros(shape) if name.split("/")[-1] == "lod" else value
    return {k: np.asarray(v, np.float32) for k, v in out.items()}
