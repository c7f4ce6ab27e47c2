"""NVIDIA's TensorFlow network pickles onto our generators, without TensorFlow.

The files: NVIDIA's StyleGAN2 releases (`stylegan2-ffhq-config-f.pkl`, build function `G_main` with components
`G_mapping` and `G_synthesis_stylegan2`; StyleGAN2-ADA's TensorFlow release names its synthesis `G_synthesis`), the
original StyleGAN ones (`karras2019stylegan-ffhq-1024x1024.pkl`: `G_style` with `G_mapping` and `G_synthesis`), and
the community generators trained with either code (other faces, other datasets). Each is a tuple `(G, D, Gs)` of
`dnnlib.tflib.network.Network` objects, read by engine.safe_pickle as `TensorFlowNetwork` records; `Gs` (the
long-term average of the generator) is the one used, its `dlatent_avg` is our `w_avg`.

`generator_from_tf(Gs)` checks the build functions by name and every keyword argument (unknown ones, and values our
generators do not implement, are refused by name), builds our config, and maps every TensorFlow variable onto our
names: dense weights [in, out] -> [out, in], conv weights [kh, kw, in, out] -> [out, in, kh, kw] (StyleGAN2's
upsampling convs, a transposed convolution in TensorFlow, flipped in space), StyleGAN2's modulation biases + 1 (TF
adds the 1 at run time). A variable that is missing, or left over, is refused by name: nothing is silently dropped.
The names and transposes follow NVIDIA's converter (stylegan2-ada-pytorch `legacy.py`) for StyleGAN2 and the
conversion cell of lernapparat's notebook for StyleGAN1; both are checked against their outputs
(scripts/make_tf_parity.py). Module source inside the pickle is never looked at, let alone run.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np
import torch

from engine import stylegan1
from engine.ops import fir_filter
from engine.safe_pickle import TensorFlowNetwork
from engine.stylegan2 import StyleGAN2Config


class TFNetworkError(ValueError):
    """A TensorFlow network pickle that does not describe a generator we can run; the message is one line."""


# Build functions: the top-level generator's -> (family, {component: accepted build functions}).
BUILD_FUNCTIONS = {
    "G_main": ("stylegan2", {"mapping": ("G_mapping",), "synthesis": ("G_synthesis_stylegan2", "G_synthesis")}),
    "G_style": ("stylegan1", {"mapping": ("G_mapping",), "synthesis": ("G_synthesis",)}),
}


def _int(v: Any) -> int:
    return int(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


# TensorFlow kwarg -> (our config field, TensorFlow's default, conversion). Both families' G_main / G_style take
# the mapping network's and the image's sizes under the same names and defaults.
SHARED_FIELDS: dict[str, tuple[str, Any, Callable]] = {
    "latent_size": ("z_dim", 512, _int),
    "dlatent_size": ("w_dim", 512, _int),
    "resolution": ("img_resolution", 1024, _int),
    "num_channels": ("img_channels", 3, _int),
    "mapping_layers": ("mapping_layers", 8, _int),
    "mapping_lrmul": ("mapping_lr_multiplier", 0.01, float),
}
STYLEGAN2_FIELDS: dict[str, tuple[str, Any, Callable]] = SHARED_FIELDS | {
    "label_size": ("c_dim", 0, _int),
    "fmap_base": ("channel_base", 16 << 10, lambda v: 2 * int(v)),  # TF: nf = fmap_base / (res / 2)
    "fmap_max": ("channel_max", 512, _int),
    "conv_clamp": ("conv_clamp", None, _opt_float),
    "architecture": ("architecture", "skip", str),
}
STYLEGAN1_FIELDS: dict[str, tuple[str, Any, Callable]] = SHARED_FIELDS | {
    "fmap_base": ("fmap_base", 8192, _int),
    "fmap_max": ("fmap_max", 512, _int),
    "truncation_psi": ("truncation_psi", 0.7, _opt_float),  # G_style truncates Gs's output by default
    "truncation_cutoff": ("truncation_cutoff", 8, lambda v: None if v is None else int(v)),
}
# Kwargs our generators implement at one value only (TensorFlow's default); any other value is refused by name.
STYLEGAN2_FIXED = {"mapping_nonlinearity": "lrelu", "nonlinearity": "lrelu", "normalize_latents": True,
                   "use_noise": True, "resample_kernel": [1, 3, 3, 1], "fmap_decay": 1.0, "fmap_min": 1,
                   "init_res": [4, 4], "size": None, "scale_type": None}  # the last three: a community fork's
STYLEGAN1_FIXED = {"label_size": 0, "mapping_nonlinearity": "lrelu", "nonlinearity": "lrelu", "use_wscale": True,
                   "normalize_latents": True, "fmap_decay": 1.0, "use_styles": True, "const_input_layer": True,
                   "use_noise": True, "use_pixel_norm": False, "use_instance_norm": True, "blur_filter": [1, 2, 1],
                   "fused_scale": "auto"}
# Kwargs that do not change what the weights compute (training, run-time and precision options; NVIDIA's converter
# ignores the same): accepted, unused.
IGNORED = frozenset({"truncation_psi", "truncation_cutoff", "truncation_psi_val", "truncation_cutoff_val",
                     "dlatent_avg_beta", "w_avg_beta", "style_mixing_prob", "structure", "num_fp16_res", "dtype",
                     "fused_modconv", "randomize_noise", "dlatent_broadcast", "force_clean_graph", "mapping_func",
                     "synthesis_func", "impl", "verbose"})


def generator_from_tf(net: TensorFlowNetwork) -> tuple[StyleGAN2Config | stylegan1.StyleGAN1Config,
                                                        dict[str, torch.Tensor]]:
    """(our config, our state dict) for a TensorFlow generator `Gs`; raises TFNetworkError with the reason.

    The state includes StyleGAN1's constant noise maps (non-persistent buffers of ours, which the loader copies in).
    """
    func = _field(net, "build_func_name", str)
    if func not in BUILD_FUNCTIONS:
        raise TFNetworkError(f"build function {func!r} is not a generator this loader knows (StyleGAN2's G_main, "
                             "StyleGAN's G_style)")
    family, parts = BUILD_FUNCTIONS[func]
    components = _field(net, "components", dict)
    kwargs = dict(_field(net, "static_kwargs", dict))
    for part, accepted in parts.items():
        comp = components.get(part)
        if not isinstance(comp, TensorFlowNetwork):
            raise TFNetworkError(f"{func} has no {part!r} component")
        comp_func = _field(comp, "build_func_name", str)
        if comp_func not in accepted:
            raise TFNetworkError(f"{part} build function {comp_func!r} is not supported (expected "
                                 f"{' or '.join(accepted)})")
        kwargs.update(_field(comp, "static_kwargs", dict))
    variables = _Variables(_collect(net))
    if family == "stylegan2":
        cfg = _config(StyleGAN2Config, STYLEGAN2_FIELDS, STYLEGAN2_FIXED, kwargs, func)
        state = _stylegan2_state(cfg, variables)
    else:
        cfg = _config(stylegan1.StyleGAN1Config, STYLEGAN1_FIELDS, STYLEGAN1_FIXED, kwargs, func)
        state = _stylegan1_state(cfg, variables)
    left = variables.left_over()
    if left:
        raise TFNetworkError(f"variable {left[0]!r} has no place in the {cfg.label} generator its kwargs describe "
                             f"({len(left)} such)")
    return cfg, state


def _field(net: TensorFlowNetwork, key: str, kind: type):
    value = getattr(net, "state", {}).get(key)
    if not isinstance(value, kind):
        raise TFNetworkError(f"TensorFlow network state has no {kind.__name__} {key!r}")
    return value


def _collect(net: TensorFlowNetwork, prefix: str = "") -> dict[str, np.ndarray]:
    """Every variable under 'component/name', as NVIDIA's converter lists them (Gs's own: 'dlatent_avg')."""
    out: dict[str, np.ndarray] = {}
    for pair in _field(net, "variables", list):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TFNetworkError(f"a variable of {prefix or 'Gs'} is not a (name, value) pair")
        name, value = pair
        if not isinstance(value, (np.ndarray, np.generic)) or value.dtype.kind not in "fiu":
            raise TFNetworkError(f"variable {prefix + name!r} is a {type(value).__name__}, not numbers")
        out[prefix + name] = np.asarray(value)
    for name, comp in _field(net, "components", dict).items():
        if not isinstance(comp, TensorFlowNetwork):
            raise TFNetworkError(f"component {prefix + str(name)!r} is a {type(comp).__name__}, not a network")
        out.update(_collect(comp, f"{prefix}{name}/"))
    return out


def _config(config_cls, fields: dict, fixed: dict, kwargs: dict, func: str):
    """Our config from the build kwargs: mapped fields, fixed values checked, unknown kwargs refused by name."""
    unknown = sorted(set(kwargs) - set(fields) - set(fixed) - IGNORED - {"mapping_fmaps", "label_fmaps"})
    if unknown:
        raise TFNetworkError(f"unknown {func} keyword argument {unknown[0]!r}={kwargs[unknown[0]]!r}")
    for name, only in fixed.items():
        value = kwargs.get(name, only)
        value = list(value) if isinstance(value, tuple) else value
        if value != only:
            raise TFNetworkError(f"{func} keyword argument {name}={value!r} is not supported (only {only!r})")
    try:
        cfg = {field: convert(kwargs.get(name, default)) for name, (field, default, convert) in fields.items()}
    except (TypeError, ValueError) as e:
        raise TFNetworkError(f"{func} keyword arguments do not make a {config_cls.label} ({e})") from None
    w_dim = cfg["w_dim"]
    if cfg["mapping_layers"] > 1 and int(kwargs.get("mapping_fmaps", 512)) != w_dim:
        raise TFNetworkError(f"mapping_fmaps={kwargs.get('mapping_fmaps', 512)} (hidden mapping width) differs from "
                             f"dlatent_size={w_dim}; ours are dlatent_size wide")
    if kwargs.get("label_fmaps") not in (None, w_dim):
        raise TFNetworkError(f"label_fmaps={kwargs['label_fmaps']} differs from dlatent_size={w_dim}; not supported")
    if config_cls is stylegan1.StyleGAN1Config:
        if cfg["truncation_psi"] is None or cfg["truncation_cutoff"] is None:  # G_style: None = no truncation
            cfg["truncation_psi"], cfg["truncation_cutoff"] = 1.0, 8
    try:
        return config_cls(**cfg)
    except (TypeError, ValueError) as e:
        raise TFNetworkError(f"{func} keyword arguments do not make a {config_cls.label} ({e})") from None


class _Variables:
    """TensorFlow variables by name; each one taken is recorded, so that leftovers can be named."""

    def __init__(self, params: dict[str, np.ndarray]):
        self.params = params
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def take(self, name: str, shape: list[int] | None = None) -> torch.Tensor:
        if name not in self.params:
            raise TFNetworkError(f"variable {name!r} is missing")
        self.used.add(name)
        t = torch.from_numpy(np.ascontiguousarray(self.params[name], dtype=np.float32))
        if shape is not None and list(t.shape) != shape:
            raise TFNetworkError(f"variable {name!r} has shape {list(t.shape)}, expected {shape}")
        return t

    def dense(self, name: str) -> torch.Tensor:
        """[in, out] -> [out, in]."""
        return self._ndim(name, 2).t().contiguous()

    def conv(self, name: str, *, flip: bool = False) -> torch.Tensor:
        """[kh, kw, in, out] -> [out, in, kh, kw]; `flip` mirrors the kernel in space (TF's transposed conv)."""
        w = self._ndim(name, 4)
        w = w.flip([0, 1]) if flip else w
        return w.permute(3, 2, 0, 1).contiguous()

    def left_over(self) -> list[str]:
        return [name for name in self.params if name not in self.used]

    def _ndim(self, name: str, ndim: int) -> torch.Tensor:
        t = self.take(name)
        if t.ndim != ndim:
            raise TFNetworkError(f"variable {name!r} has shape {list(t.shape)}, expected {ndim} dimensions")
        return t


def _log2(res: int) -> int:
    return int(math.log2(res))


def _stylegan2_state(cfg: StyleGAN2Config, v: _Variables) -> dict[str, torch.Tensor]:
    """NVIDIA's TF StyleGAN2 names -> ours (the official PyTorch ones)."""
    if "lod" in v:  # G_main's level of detail feeds only a progressive synthesis (configs A-D), not this one
        v.take("lod")
    s = {"mapping.w_avg": v.take("dlatent_avg", [cfg.w_dim])}
    if cfg.c_dim:
        if "mapping/LabelConcat/weight" in v:
            raise TFNetworkError("a conditional StyleGAN2 that concatenates labels to z (LabelConcat) is not "
                                 "supported; StyleGAN2-ADA's label embedding (LabelEmbed) is")
        s["mapping.embed.weight"] = v.dense("mapping/LabelEmbed/weight")
        s["mapping.embed.bias"] = v.take("mapping/LabelEmbed/bias")
    for i in range(cfg.mapping_layers):
        s[f"mapping.fc{i}.weight"] = v.dense(f"mapping/Dense{i}/weight")
        s[f"mapping.fc{i}.bias"] = v.take(f"mapping/Dense{i}/bias")

    def layer(ours: str, tf: str, noise: int, *, up: bool = False) -> None:
        s[f"{ours}.weight"] = v.conv(f"{tf}/weight", flip=up)
        s[f"{ours}.bias"] = v.take(f"{tf}/bias")
        s[f"{ours}.noise_const"] = v.take(f"synthesis/noise{noise}")[0, 0]
        s[f"{ours}.noise_strength"] = v.take(f"{tf}/noise_strength").reshape([])
        s[f"{ours}.affine.weight"] = v.dense(f"{tf}/mod_weight")
        s[f"{ours}.affine.bias"] = v.take(f"{tf}/mod_bias") + 1
        s[f"{ours}.resample_filter"] = fir_filter()

    last = cfg.img_resolution
    for res in cfg.block_resolutions:
        ours, tf = f"synthesis.b{res}", f"synthesis/{res}x{res}"
        s[f"{ours}.resample_filter"] = fir_filter()
        if res == 4:
            s[f"{ours}.const"] = v.take(f"{tf}/Const/const")[0]
            layer(f"{ours}.conv1", f"{tf}/Conv", 0)
        else:
            layer(f"{ours}.conv0", f"{tf}/Conv0_up", 2 * _log2(res) - 5, up=True)
            layer(f"{ours}.conv1", f"{tf}/Conv1", 2 * _log2(res) - 4)
            if cfg.architecture == "resnet":
                s[f"{ours}.skip.weight"] = v.conv(f"{tf}/Skip/weight", flip=True)
                s[f"{ours}.skip.resample_filter"] = fir_filter()
        if cfg.architecture == "skip" or res == last:
            s[f"{ours}.torgb.weight"] = v.conv(f"{tf}/ToRGB/weight")
            s[f"{ours}.torgb.bias"] = v.take(f"{tf}/ToRGB/bias")
            s[f"{ours}.torgb.affine.weight"] = v.dense(f"{tf}/ToRGB/mod_weight")
            s[f"{ours}.torgb.affine.bias"] = v.take(f"{tf}/ToRGB/mod_bias") + 1
    return s


def _stylegan1_state(cfg: stylegan1.StyleGAN1Config, v: _Variables) -> dict[str, torch.Tensor]:
    """The original StyleGAN's TF names -> ours (the port's, as lernapparat's conversion cell maps them), plus the
    file's constant noise maps `synthesis/noise{i}` (the port has none) and `dlatent_avg` as w_avg."""
    for name in ("lod", "synthesis/lod"):  # G_style assigns its own to the synthesis' at every run
        lod = float(v.take(name)) if name in v else 0.0
        if lod != 0:
            raise TFNetworkError(f"{name} is {lod:g}: a snapshot taken while growing progressively, not a finished "
                                 "generator")
    s = {"mapping.w_avg": v.take("dlatent_avg", [cfg.w_dim])}
    for i in range(cfg.mapping_layers):
        s[f"mapping.dense{i}.weight"] = v.dense(f"mapping/Dense{i}/weight")
        s[f"mapping.dense{i}.bias"] = v.take(f"mapping/Dense{i}/bias")

    def conv(ours: str, tf: str) -> None:
        s[f"{ours}.weight"] = v.conv(f"{tf}/weight")
        s[f"{ours}.bias"] = v.take(f"{tf}/bias")

    def epilogue(ours: str, tf: str, layer_idx: int) -> None:
        s[f"{ours}.top_epi.noise.weight"] = v.take(f"{tf}/Noise/weight")
        s[f"{ours}.top_epi.noise.noise_const"] = v.take(f"synthesis/noise{layer_idx}")
        s[f"{ours}.style_mod.lin.weight"] = v.dense(f"{tf}/StyleMod/weight")
        s[f"{ours}.style_mod.lin.bias"] = v.take(f"{tf}/StyleMod/bias")

    for res in cfg.block_resolutions:
        ours, tf = f"synthesis.blocks.{res}x{res}", f"synthesis/{res}x{res}"
        if res == 4:
            s[f"{ours}.const"] = v.take(f"{tf}/Const/const")
            s[f"{ours}.bias"] = v.take(f"{tf}/Const/bias")
            epilogue(f"{ours}.epi1", f"{tf}/Const", 0)
            conv(f"{ours}.conv", f"{tf}/Conv")
            epilogue(f"{ours}.epi2", f"{tf}/Conv", 1)
        else:
            conv(f"{ours}.conv0_up", f"{tf}/Conv0_up")
            s[f"{ours}.conv0_up.intermediate.kernel"] = stylegan1.Blur().kernel
            epilogue(f"{ours}.epi1", f"{tf}/Conv0_up", 2 * _log2(res) - 4)
            conv(f"{ours}.conv1", f"{tf}/Conv1")
            epilogue(f"{ours}.epi2", f"{tf}/Conv1", 2 * _log2(res) - 3)
    # Progressive growing leaves a toRGB per level of detail; at lod 0 only the full-resolution one (lod0) is used.
    conv("synthesis.torgb", "synthesis/ToRGB_lod0")
    for name in v.left_over():
        if re.fullmatch(r"synthesis/ToRGB_lod[1-9]\d*/(weight|bias)", name):
            v.take(name)
    return s
