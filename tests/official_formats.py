"""Write generator checkpoints laid out exactly as the files people download, from a state dict with official names.

- `write_official_pkl`: a StyleGAN2-ADA network pickle. Each network is a `torch_utils.persistence` object whose
  pickled form is `_reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name, state},
  state being the module's `__dict__` (`_parameters`, `_buffers`, `_modules`, `_init_kwargs` as a
  `dnnlib.util.EasyDict`, numpy scalars such as `weight_gain`); tensors pickle as torch pickles them
  (`_rebuild_tensor_v2` over a legacy `torch.save` of the storage).
- `write_rosinality_pt`: `torch.save({"g_ema": state_dict, "latent_avg": w_avg})` under rosinality's names.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def _fake_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        v.__module__, v.__qualname__ = name, k
        setattr(mod, k, v)
    return mod


def _reconstruct_persistent_obj(meta):  # never called by our loader: only its name goes into the pickle
    raise AssertionError("the loader must not call the original reconstructor")


class EasyDict(dict):
    pass


class _Persistent:
    """Pickles as the official persistence wrapper does."""

    def __init__(self, class_name: str, state: dict, module_src: str):
        self.meta = dict(type="class", version=4, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,), None)


def _nest(state: dict[str, torch.Tensor]) -> dict:
    tree: dict = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


PARAM_NAMES = {"weight", "bias", "const", "noise_strength"}


def _module(name: str, tree: dict, module_src: str, init_kwargs: dict | None = None) -> _Persistent:
    params, buffers, children = collections.OrderedDict(), collections.OrderedDict(), collections.OrderedDict()
    for key, value in tree.items():
        if isinstance(value, dict):
            children[key] = _module(key, value, module_src)
        elif key in PARAM_NAMES:
            params[key] = torch.nn.Parameter(value.clone(), requires_grad=False)
        else:
            buffers[key] = value.clone()
    state = {
        "training": False, "_parameters": params, "_buffers": buffers, "_modules": children,
        "_non_persistent_buffers_set": set(), "_forward_hooks": collections.OrderedDict(),
        "_init_args": (), "_init_kwargs": EasyDict(init_kwargs or {}),
        "weight_gain": np.float64(0.125), "activation": "lrelu",
    }
    return _Persistent(name, state, module_src)


def write_official_pkl(path: Path, state: dict[str, torch.Tensor], init_kwargs: dict,
                       module_src: str = "# training/networks.py source would be here\n") -> None:
    mods = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": _fake_module("torch_utils.persistence",
                                                _reconstruct_persistent_obj=_reconstruct_persistent_obj),
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": _fake_module("dnnlib.util", EasyDict=EasyDict),
    }
    with modules_in_place(mods):
        tree = _nest(state)
        kwargs = EasyDict({k: (EasyDict(v) if isinstance(v, dict) else v) for k, v in init_kwargs.items()})
        G = _module("Generator", tree, module_src, kwargs)
        D = _module("Discriminator", {"b4": {"fc": {"weight": torch.randn(2, 2)}}}, module_src)
        data = {"G": G, "D": D, "G_ema": G, "training_set_kwargs": EasyDict(resolution=32), "augment_pipe": None}
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=3)


@contextmanager
def modules_in_place(mods: dict[str, types.ModuleType]):
    """While pickling: `mods` importable under their names (the module paths the pickles record), then as before."""
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def official_init_kwargs(cfg) -> dict:
    """StyleGAN2Config -> the Generator kwargs train.py records in `_init_kwargs`."""
    return dict(z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, img_resolution=cfg.img_resolution,
                img_channels=cfg.img_channels,
                mapping_kwargs=dict(num_layers=cfg.mapping_layers, lr_multiplier=cfg.mapping_lr_multiplier),
                synthesis_kwargs=dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=4,
                                      conv_clamp=cfg.conv_clamp, architecture="skip"))


def to_rosinality(state: dict[str, torch.Tensor], resolution: int, mapping_layers: int) -> dict[str, torch.Tensor]:
    """Official names -> rosinality's (shapes as in its model.py: conv weights [1, O, I, k, k], noise [1])."""
    out: dict[str, torch.Tensor] = {}
    for i in range(mapping_layers):
        out[f"style.{i + 1}.weight"] = state[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = state[f"mapping.fc{i}.bias"]
    out["input.input"] = state["synthesis.b4.const"][None]

    def conv(src: str, dst: str, noise_idx: int) -> None:
        out[f"{dst}.conv.weight"] = state[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = state[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = state[f"{src}.affine.bias"]
        out[f"{dst}.noise.weight"] = state[f"{src}.noise_strength"].reshape(1)
        out[f"{dst}.activate.bias"] = state[f"{src}.bias"]
        out[f"noises.noise_{noise_idx}"] = state[f"{src}.noise_const"][None, None]

    def rgb(src: str, dst: str) -> None:
        out[f"{dst}.conv.weight"] = state[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = state[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = state[f"{src}.affine.bias"]
        out[f"{dst}.bias"] = state[f"{src}.bias"].reshape(1, -1, 1, 1)

    conv("synthesis.b4.conv1", "conv1", 0)
    rgb("synthesis.b4.torgb", "to_rgb1")
    res, i = 8, 0
    while res <= resolution:
        conv(f"synthesis.b{res}.conv0", f"convs.{2 * i}", 2 * i + 1)
        conv(f"synthesis.b{res}.conv1", f"convs.{2 * i + 1}", 2 * i + 2)
        rgb(f"synthesis.b{res}.torgb", f"to_rgbs.{i}")
        res, i = res * 2, i + 1
    return out


def write_rosinality_pt(path: Path, state: dict[str, torch.Tensor], resolution: int, mapping_layers: int) -> None:
    g_ema = to_rosinality(state, resolution, mapping_layers)
    args = argparse.Namespace(size=resolution, n_mlp=mapping_layers, channel_multiplier=2)
    torch.save({"g_ema": g_ema, "latent_avg": state["mapping.w_avg"].clone(), "args": args}, path)
