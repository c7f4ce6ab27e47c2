"""StyleGAN2 generator (config F; the skip, orig and resnet architectures of config E) in plain PyTorch.

Parameter and buffer names equal those of the official StyleGAN2-ADA `G_ema`, so an official state dict loads with
`strict=True`; the maths follows the paper and the official reference ops (conv_clamp included). The API is the one
the StyleGAN2 community knows: `G.mapping(z, c, truncation_psi, truncation_cutoff) -> ws [N, num_ws, w_dim]` and
`G.synthesis(ws, noise_mode) -> img [N, C, H, W]` in [-1, 1]. The style space too: `G.synthesis.styles(ws)` gives
each modulated layer's style A(w) under StyleCLIP's names, and `G.synthesis(styles=S, noise_mode)` renders from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.ops import (
    LRELU_GAIN,
    bias_act,
    fir_filter,
    modulated_conv2d,
    normalize_2nd_moment,
    upsample2d,
)

NOISE_MODES = ("const", "random", "none")
ARCHITECTURES = ("orig", "skip", "resnet")  # toRGB at the last block only / at every block, summed / + residual blocks
SQRT_HALF = math.sqrt(0.5)


class GeneratorConfig:
    """What the generator families' configs share (each is a frozen dataclass with an `img_resolution` field): a
    power-of-two ladder of resolutions from 4 px, two ws per resolution, and a checked round trip through a dict."""

    family: str
    label: str                          # the family as people write it, for messages

    def __post_init__(self) -> None:
        r = self.img_resolution
        if r < 4 or r & (r - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {r}")

    @property
    def block_resolutions(self) -> list[int]:
        return [2 ** i for i in range(2, int(math.log2(self.img_resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        """Two ws per resolution: 18 at 1024 px (StyleGAN2: one per conv plus the last toRGB's; StyleGAN1: one
        per conv)."""
        return 2 * len(self.block_resolutions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.label} config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class StyleGAN2Config(GeneratorConfig):
    """Architecture of a StyleGAN2 generator; the defaults are the official FFHQ 1024 (config F) model."""

    z_dim: int = 512                    # input latent Z dimensionality
    c_dim: int = 0                      # conditioning label dimensionality, 0 = unconditional
    w_dim: int = 512                    # intermediate latent W dimensionality
    img_resolution: int = 1024          # output resolution, a power of two >= 4
    img_channels: int = 3               # output colour channels
    mapping_layers: int = 8             # fully connected layers in the mapping network
    mapping_lr_multiplier: float = 0.01  # equalised learning-rate multiplier of the mapping layers
    channel_base: int = 32768           # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 512
    conv_clamp: float | None = 256      # clamp conv outputs to +-X (the official FFHQ models use 256), None = off
    architecture: str = "skip"          # 'skip' (configs E and F), 'orig' or 'resnet' (config E variants)

    family = "stylegan2"
    label = "StyleGAN2"
    default_truncation = (1.0, None)    # `stylebot generate` without --truncation: off

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalised learning rate: weights stored as N(0, 1) / lr_multiplier, scaled at run time."""

    def __init__(self, in_features: int, out_features: int, *, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation, gain=LRELU_GAIN)


class MappingNetwork(nn.Module):
    """z (and c) -> w, broadcast to num_ws copies; tracks `w_avg` for the truncation trick."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, *, num_layers: int = 8,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        features = [z_dim + embed_features] + [w_dim] * num_layers
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation="lrelu",
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, update_w_avg: bool = False) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            _check_shape(z, [None, self.z_dim], "z")
            parts.append(normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            _check_shape(c, [None, self.c_dim], "c")
            parts.append(normalize_2nd_moment(self.embed(c.to(torch.float32))))
        x = torch.cat(parts, dim=1)
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        if update_w_avg:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x[:, :cutoff] = self.w_avg.lerp(x[:, :cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling x2) + per-pixel noise + bias + leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: int = 1,
                 kernel_size: int = 3, conv_clamp: float | None = None, resample_taps=(1, 3, 3, 1)):
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", fir_filter(resample_taps))
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const",
                fused_modconv: bool | None = None, gain: float = 1.0) -> torch.Tensor:
        """`gain` scales the activation and the clamp (sqrt(1/2) in a resnet block's second conv)."""
        return self.render(x, self.affine(w), noise_mode, fused_modconv, gain)

    def render(self, x: torch.Tensor, styles: torch.Tensor, noise_mode: str = "const",
               fused_modconv: bool | None = None, gain: float = 1.0) -> torch.Tensor:
        """The layer from its style `styles` [N, in_channels] (the affine's output A(w)) instead of from w."""
        x = modulated_conv2d(x, self.weight, styles, up=self.up, resample_kernel=self.resample_filter,
                             fused=fused_modconv)
        if noise_mode == "random":
            x = x + torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, act="lrelu", gain=LRELU_GAIN * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to colour channels, without demodulation."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool | None = None) -> torch.Tensor:
        return self.render(x, self.affine(w), fused_modconv)

    def render(self, x: torch.Tensor, styles: torch.Tensor, fused_modconv: bool | None = None) -> torch.Tensor:
        """The layer from its style [N, in_channels]: the affine's output A(w), before `weight_gain` (StyleCLIP's
        S for toRGB is this raw output too)."""
        styles = styles * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SkipLayer(nn.Module):
    """The residual path of a resnet block: the block's input upsampled x2 (FIR), then a 1x1 conv without bias."""

    def __init__(self, in_channels: int, out_channels: int, *, resample_taps=(1, 3, 3, 1)):
        super().__init__()
        self.register_buffer("resample_filter", fir_filter(resample_taps))
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        x = upsample2d(x, self.resample_filter)
        return F.conv2d(x, (self.weight * self.weight_gain).to(x.dtype)) * gain


class SynthesisBlock(nn.Module):
    """One resolution: (const input | upsampling conv0) -> conv1 -> toRGB, added to the upsampled image so far.

    `architecture`: 'skip' has a toRGB in every block; 'orig' and 'resnet' only in the last (`is_last`); 'resnet'
    adds the block's input through a `SkipLayer`, both paths scaled by sqrt(1/2).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int, *,
                 is_last: bool = False, architecture: str = "skip", conv_clamp: float | None = None,
                 resample_taps=(1, 3, 3, 1)):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.architecture = architecture
        self.register_buffer("resample_filter", fir_filter(resample_taps))
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp,
                                        resample_taps=resample_taps)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp,
                                    resample_taps=resample_taps)
        self.num_torgb = 0
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
            self.num_torgb = 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = SkipLayer(in_channels, out_channels, resample_taps=resample_taps)
        self.num_conv = 1 if in_channels == 0 else 2

    def style_layers(self) -> list[tuple[str, SynthesisLayer | ToRGBLayer]]:
        """(name, layer) of the block's styled layers in the order they read its ws: conv0, conv1, toRGB; the names
        are StyleCLIP's (`conv0_resolution_8`, `toRGB_resolution_8`)."""
        r = self.resolution
        layers = [] if self.in_channels == 0 else [(f"conv0_resolution_{r}", self.conv0)]
        layers.append((f"conv1_resolution_{r}", self.conv1))
        if self.num_torgb:
            layers.append((f"toRGB_resolution_{r}", self.torgb))
        return layers

    def styles(self, ws: torch.Tensor) -> list[torch.Tensor]:
        """Each styled layer's style A(w) [N, in_channels] from the block's ws [N, num_conv + num_torgb, w_dim]."""
        return [layer.affine(w) for (_, layer), w in zip(self.style_layers(), ws.unbind(dim=1), strict=True)]

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str = "const",
                fused_modconv: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.render(x, img, self.styles(ws), noise_mode, fused_modconv)

    def render(self, x: torch.Tensor | None, img: torch.Tensor | None, styles: list[torch.Tensor],
               noise_mode: str = "const", fused_modconv: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block from its layers' styles, in `style_layers` order."""
        s_iter = iter(styles)
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat([styles[0].shape[0], 1, 1, 1])
            x = self.conv1.render(x, next(s_iter), noise_mode, fused_modconv)
        elif self.architecture == "resnet":
            y = self.skip(x, gain=SQRT_HALF)
            x = self.conv0.render(x, next(s_iter), noise_mode, fused_modconv)
            x = y + self.conv1.render(x, next(s_iter), noise_mode, fused_modconv, gain=SQRT_HALF)
        else:
            x = self.conv0.render(x, next(s_iter), noise_mode, fused_modconv)
            x = self.conv1.render(x, next(s_iter), noise_mode, fused_modconv)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.num_torgb:
            y = self.torgb.render(x, next(s_iter), fused_modconv).to(torch.float32)
            img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R], blocks b4 ... bR."""

    def __init__(self, cfg: StyleGAN2Config):
        super().__init__()
        self.w_dim = cfg.w_dim
        self.img_resolution = cfg.img_resolution
        self.img_channels = cfg.img_channels
        self.block_resolutions = cfg.block_resolutions
        for res in self.block_resolutions:
            in_channels = cfg.channels(res // 2) if res > 4 else 0
            block = SynthesisBlock(in_channels, cfg.channels(res), cfg.w_dim, res, cfg.img_channels,
                                   is_last=res == cfg.img_resolution, architecture=cfg.architecture,
                                   conv_clamp=cfg.conv_clamp)
            setattr(self, f"b{res}", block)
        self.num_ws = cfg.num_ws

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def block_ws(self, ws: torch.Tensor) -> list[torch.Tensor]:
        """Each block's slice of ws [N, num_ws, w_dim]: its convs' ws and the next one for its toRGB (shared with
        the next block's conv0)."""
        _check_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        ws = ws.to(torch.float32)
        out, w_idx = [], 0
        for block in self.blocks():
            out.append(ws.narrow(1, w_idx, block.num_conv + block.num_torgb))
            w_idx += block.num_conv
        return out

    def forward(self, ws: torch.Tensor | None = None, noise_mode: str = "const", fused_modconv: bool | None = None,
                *, styles: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The image from ws [N, num_ws, w_dim], or from the style space: `styles` as `styles(ws)` returns it."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if (ws is None) == (styles is None):
            raise ValueError("synthesis takes ws or styles, one of the two")
        x = img = None
        if styles is None:
            for block, block_ws in zip(self.blocks(), self.block_ws(ws)):
                x, img = block(x, img, block_ws, noise_mode, fused_modconv)
            return img
        styles = _check_styles(styles, self.style_channels())
        for block in self.blocks():
            x, img = block.render(x, img, [styles[name] for name, _ in block.style_layers()], noise_mode, fused_modconv)
        return img

    # The style space S (Wu et al. 2021, StyleSpace; StyleCLIP's global directions edit in it): each modulated
    # layer's style A(w), the output of its affine layer, before the toRGB's weight gain.

    def style_layers(self) -> list[tuple[str, SynthesisLayer | ToRGBLayer]]:
        """(name, layer) of every styled layer, in StyleCLIP's order and names: per block conv0, conv1, toRGB
        (`conv1_resolution_4`, `toRGB_resolution_4`, `conv0_resolution_8`, ...)."""
        return [pair for block in self.blocks() for pair in block.style_layers()]

    def style_channels(self, *, torgb: bool = True) -> dict[str, int]:
        """{layer name: channels of its style} in S's order (26 layers, 9,088 channels at 1024 px; without toRGB
        17 layers, 6,048). Read off the affines' shapes, so it works on a generator built on the meta device."""
        return {name: layer.affine.weight.shape[0] for name, layer in self.style_layers()
                if torgb or not isinstance(layer, ToRGBLayer)}

    def styles(self, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        """ws [N, num_ws, w_dim] -> S: {layer name: style [N, channels]} in `style_layers` order."""
        out = {}
        for block, block_ws in zip(self.blocks(), self.block_ws(ws)):
            out.update(zip([name for name, _ in block.style_layers()], block.styles(block_ws), strict=True))
        return out


class Generator(nn.Module):
    """StyleGAN2 generator: `mapping` (z, c -> ws) and `synthesis` (ws -> image)."""

    def __init__(self, cfg: StyleGAN2Config = StyleGAN2Config(), *, model_id: str = "unnamed"):
        super().__init__()
        self.cfg = cfg
        self.model_id = model_id
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, cfg.c_dim, cfg.w_dim
        self.img_resolution, self.img_channels = cfg.img_resolution, cfg.img_channels
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, cfg.w_dim, self.num_ws, num_layers=cfg.mapping_layers,
                                      lr_multiplier=cfg.mapping_lr_multiplier)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, noise_mode: str = "const") -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode)


def z_from_seed(seed: int, z_dim: int) -> torch.Tensor:
    """The official generate.py's latent for a seed: `RandomState(seed).randn(1, z_dim)`."""
    return torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim)).float()


def _check_styles(styles: dict[str, torch.Tensor], channels: dict[str, int]) -> dict[str, torch.Tensor]:
    """`styles` as float32 after checking that it names every styled layer, each [N, channels] with one N."""
    if set(styles) != set(channels):
        missing, extra = sorted(set(channels) - set(styles)), sorted(set(styles) - set(channels))
        raise ValueError(f"styles must name this generator's styled layers: missing {missing}, unknown {extra}")
    n = next(iter(styles.values())).shape[0]
    for name, c in channels.items():
        _check_shape(styles[name], [n, c], f"styles[{name!r}]")
    return {name: s.to(torch.float32) for name, s in styles.items()}


def _check_shape(t: torch.Tensor | None, shape: list[int | None], name: str) -> None:
    if t is None or t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        got = None if t is None else tuple(t.shape)
        want = tuple("N" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {got}")
