"""StyleGAN (version 1) generator in plain PyTorch, behind the same API as engine/stylegan2.py.

The architecture of Karras et al. 2019 as the widely used PyTorch port of the official FFHQ weights lays it out
(lernapparat's "StyleGAN in PyTorch" notebook, file `karras2019stylegan-ffhq-1024x1024.pt`):

- mapping: pixel norm of z, then 8 dense layers (equalised lr, lr multiplier 0.01, leaky ReLU 0.2);
- synthesis: a learned 4x4 constant plus bias, then per resolution an upscaling 3x3 conv (nearest x2 then conv
  below 128 px, the original's fused transposed conv from 128 px), a [1, 2, 1] blur, and a 3x3 conv; after every
  conv the epilogue: per-pixel noise with per-channel strength, leaky ReLU, instance norm, and AdaIN style
  modulation `x * (1 + scale) + shift` from the layer's w; one 1x1 toRGB at the end (no skips, no clamp);
- truncation as in the original: psi 0.7 for the first 8 of the 18 ws (the config's default, used by
  `stylebot generate` when no --truncation is given).

The style space S is each AdaIN's affine output (scales then biases, 2 x channels): `G.synthesis.styles(ws)` and
`G.synthesis(styles=S, noise_mode)`, as engine/stylegan2.py.

Parameter names are the port's with `g_mapping.` / `g_synthesis.` spelled `mapping.` / `synthesis.`, so a port
file loads with `strict=True` after that rename. The port keeps no fixed noise and no average w: our constant
noise is drawn from a fixed seed (so `noise_mode='const'` is deterministic, which inversion needs), and
`w_avg` is estimated from 10,000 z by the loader (engine/checkpoints.py `estimate_w_avg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.stylegan2 import NOISE_MODES, GeneratorConfig, _check_shape, _check_styles

FUSED_UPSCALE_MIN = 128     # from this output size the upscale + conv is one transposed conv, as in the original
NOISE_SEED = 1              # seed of the constant noise (the port has none stored)
LRELU_SLOPE = 0.2
INSTANCE_NORM_EPS = 1e-5    # torch.nn.InstanceNorm2d's default, which the port uses
PIXEL_NORM_EPS = 1e-8


@dataclass(frozen=True)
class StyleGAN1Config(GeneratorConfig):
    """Architecture of a StyleGAN1 generator; the defaults are the official FFHQ 1024 model."""

    z_dim: int = 512
    w_dim: int = 512
    img_resolution: int = 1024
    img_channels: int = 3
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    fmap_base: int = 8192               # channels at resolution r: min(fmap_base * 2 // r, fmap_max)
    fmap_max: int = 512
    truncation_psi: float = 0.7         # the original's truncation: psi ...
    truncation_cutoff: int = 8          # ... for the first 8 ws

    family = "stylegan1"
    label = "StyleGAN1"
    c_dim = 0                           # StyleGAN1 FFHQ is unconditional

    def channels(self, res: int) -> int:
        """The original's nf(stage) with stage = log2(res) - 1 and fmap_decay 1."""
        return min(int(self.fmap_base / 2.0 ** (int(math.log2(res)) - 1)), self.fmap_max)

    @property
    def default_truncation(self) -> tuple[float, int | None]:
        return self.truncation_psi, self.truncation_cutoff


class Dense(nn.Module):
    """Equalised-lr dense layer: weight stored as N(0, 1) / lr_multiplier, scaled by gain / sqrt(fan_in) at run time."""

    def __init__(self, in_features: int, out_features: int, *, gain: float = math.sqrt(2), lr_multiplier: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.zeros([out_features]))
        self.weight_gain = gain / math.sqrt(in_features) * lr_multiplier
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)


class Blur(nn.Module):
    """Depthwise [1, 2, 1] x [1, 2, 1] / 16 low-pass filter (a buffer: the port's files carry it)."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = k[:, None] * k[None, :]
        self.register_buffer("kernel", (k / k.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.expand(x.shape[1], -1, -1, -1), padding=1, groups=x.shape[1])


class Conv(nn.Module):
    """Equalised-lr conv; `up` doubles the size first (and blurs after), as the original's conv0_up."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, gain: float = math.sqrt(2),
                 up: bool = False):
        super().__init__()
        self.up = up
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = gain / math.sqrt(in_channels * kernel_size ** 2)
        if up:
            self.intermediate = Blur()  # the port's name for the blur between conv and bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if not self.up:
            return F.conv2d(x, w, self.bias, padding=self.padding)
        if 2 * min(x.shape[2:]) >= FUSED_UPSCALE_MIN:
            # Nearest x2 then 3x3 conv, folded into one stride-2 transposed conv with the 3x3 kernel summed over
            # the four 2x2 shifts (a 4x4 kernel); the original does this from 128 px, and it differs from the
            # unfused way at the borders, so it is kept exactly.
            w = F.pad(w, [1, 1, 1, 1])
            w = w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]
            x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2, padding=(w.shape[-1] - 1) // 2)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.conv2d(x, w, padding=self.padding)
        x = self.intermediate(x)
        return x + self.bias.view(1, -1, 1, 1)


class Noise(nn.Module):
    """Per-pixel noise (one map for all channels) times a learned per-channel strength."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros([channels]))
        self.register_buffer("noise_const", torch.zeros([1, 1, resolution, resolution]), persistent=False)

    def forward(self, x: torch.Tensor, noise_mode: str) -> torch.Tensor:
        if noise_mode == "none":
            return x
        if noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, x.shape[2], x.shape[3]], device=x.device, dtype=x.dtype)
        else:
            noise = self.noise_const
        return x + self.weight.view(1, -1, 1, 1) * noise


class Epilogue(nn.Module):
    """After each conv: noise, leaky ReLU, instance norm, then AdaIN style modulation from this layer's w."""

    def __init__(self, channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.top_epi = nn.ModuleDict({"noise": Noise(channels, resolution)})  # nesting kept for the port's names
        self.style_mod = nn.Module()
        self.style_mod.lin = Dense(w_dim, 2 * channels, gain=1.0)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str) -> torch.Tensor:
        return self.render(x, self.style_mod.lin(w), noise_mode)

    def render(self, x: torch.Tensor, style: torch.Tensor, noise_mode: str) -> torch.Tensor:
        """The epilogue from its style [N, 2 * channels] (the affine's output: AdaIN scales, then biases)."""
        x = self.top_epi["noise"](x, noise_mode)
        x = F.leaky_relu(x, LRELU_SLOPE)
        x = F.instance_norm(x, eps=INSTANCE_NORM_EPS)
        style = style.view(-1, 2, x.shape[1], 1, 1)
        return x * (style[:, 0] + 1) + style[:, 1]


class InputBlock(nn.Module):
    """4x4: learned constant + bias -> epilogue -> 3x3 conv -> epilogue."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.const = nn.Parameter(torch.ones([1, channels, 4, 4]))
        self.bias = nn.Parameter(torch.ones([channels]))
        self.epi1 = Epilogue(channels, w_dim, 4)
        self.conv = Conv(channels, channels, 3)
        self.epi2 = Epilogue(channels, w_dim, 4)

    def forward(self, ws: torch.Tensor, noise_mode: str) -> torch.Tensor:
        return self.render([self.epi1.style_mod.lin(ws[:, 0]), self.epi2.style_mod.lin(ws[:, 1])], noise_mode)

    def render(self, styles: list[torch.Tensor], noise_mode: str) -> torch.Tensor:
        x = self.const.expand(styles[0].shape[0], -1, -1, -1) + self.bias.view(1, -1, 1, 1)
        x = self.epi1.render(x, styles[0], noise_mode)
        return self.epi2.render(self.conv(x), styles[1], noise_mode)


class UpBlock(nn.Module):
    """2x: upscaling conv (+ blur) -> epilogue -> 3x3 conv -> epilogue."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.conv0_up = Conv(in_channels, out_channels, 3, up=True)
        self.epi1 = Epilogue(out_channels, w_dim, resolution)
        self.conv1 = Conv(out_channels, out_channels, 3)
        self.epi2 = Epilogue(out_channels, w_dim, resolution)

    def forward(self, x: torch.Tensor, ws: torch.Tensor, noise_mode: str) -> torch.Tensor:
        return self.render(x, [self.epi1.style_mod.lin(ws[:, 0]), self.epi2.style_mod.lin(ws[:, 1])], noise_mode)

    def render(self, x: torch.Tensor, styles: list[torch.Tensor], noise_mode: str) -> torch.Tensor:
        x = self.epi1.render(self.conv0_up(x), styles[0], noise_mode)
        return self.epi2.render(self.conv1(x), styles[1], noise_mode)


class MappingNetwork(nn.Module):
    """z -> w (pixel norm, dense layers), broadcast to num_ws copies; `w_avg` is for truncation and inversion."""

    def __init__(self, cfg: StyleGAN1Config):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = cfg.z_dim, 0, cfg.w_dim, cfg.num_ws
        self.num_layers = cfg.mapping_layers
        for i in range(cfg.mapping_layers):
            setattr(self, f"dense{i}", Dense(cfg.z_dim if i == 0 else cfg.w_dim, cfg.w_dim,
                                             lr_multiplier=cfg.mapping_lr_multiplier))
        self.register_buffer("w_avg", torch.zeros([cfg.w_dim]))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        _check_shape(z, [None, self.z_dim], "z")
        x = z.to(torch.float32)
        x = x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + PIXEL_NORM_EPS)
        for i in range(self.num_layers):
            x = F.leaky_relu(getattr(self, f"dense{i}")(x), LRELU_SLOPE)
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x[:, :cutoff] = self.w_avg.lerp(x[:, :cutoff], truncation_psi)
        return x


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R] (not clamped; about [-1, 1])."""

    def __init__(self, cfg: StyleGAN1Config):
        super().__init__()
        self.w_dim, self.num_ws = cfg.w_dim, cfg.num_ws
        self.img_resolution, self.img_channels = cfg.img_resolution, cfg.img_channels
        blocks = {}
        for res in cfg.block_resolutions:
            name = f"{res}x{res}"
            blocks[name] = (InputBlock(cfg.channels(res), cfg.w_dim) if res == 4 else
                            UpBlock(cfg.channels(res // 2), cfg.channels(res), cfg.w_dim, res))
        self.blocks = nn.ModuleDict(blocks)
        self.torgb = Conv(cfg.channels(cfg.img_resolution), cfg.img_channels, 1, gain=1.0)

    def forward(self, ws: torch.Tensor | None = None, noise_mode: str = "const", *,
                styles: dict[str, torch.Tensor] | None = None, **_unused) -> torch.Tensor:
        """The image from ws [N, num_ws, w_dim], or from the style space: `styles` as `styles(ws)` returns it."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if (ws is None) == (styles is None):
            raise ValueError("synthesis takes ws or styles, one of the two")
        x = None
        if styles is None:
            _check_shape(ws, [None, self.num_ws, self.w_dim], "ws")
            ws = ws.to(torch.float32)
            for i, block in enumerate(self.blocks.values()):
                pair = ws[:, 2 * i:2 * i + 2]
                x = block(pair, noise_mode) if i == 0 else block(x, pair, noise_mode)
            return self.torgb(x)
        styles = _check_styles(styles, self.style_channels())
        for i, (res, block) in enumerate(self.blocks.items()):
            pair = [styles[f"{res}.epi1"], styles[f"{res}.epi2"]]
            x = block.render(pair, noise_mode) if i == 0 else block.render(x, pair, noise_mode)
        return self.torgb(x)

    # The style space S: each AdaIN's style, the output of its affine layer (`style_mod.lin`), 2 x channels wide:
    # the channels' scales (applied as 1 + scale) and then their biases. The toRGB has no style.

    def style_layers(self) -> list[tuple[str, Epilogue]]:
        """(name, epilogue) of every AdaIN in S's order: `4x4.epi1`, `4x4.epi2`, `8x8.epi1`, ... (one per w)."""
        return [(f"{res}.{epi}", getattr(block, epi)) for res, block in self.blocks.items() for epi in ("epi1", "epi2")]

    def style_channels(self, *, torgb: bool = True) -> dict[str, int]:
        """{layer name: width of its style (2 x the layer's channels)} in S's order; `torgb` is accepted for the
        StyleGAN2 interface and changes nothing (StyleGAN1's toRGB is unstyled)."""
        return {name: epi.style_mod.lin.weight.shape[0] for name, epi in self.style_layers()}

    def styles(self, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        """ws [N, num_ws, w_dim] -> S: {layer name: style [N, 2 * channels]} in `style_layers` order."""
        _check_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        ws = ws.to(torch.float32)
        return {name: epi.style_mod.lin(ws[:, i]) for i, (name, epi) in enumerate(self.style_layers())}


class Generator(nn.Module):
    """StyleGAN1 generator: `mapping` (z -> ws) and `synthesis` (ws -> image), as engine.stylegan2.Generator."""

    def __init__(self, cfg: StyleGAN1Config = StyleGAN1Config(), *, model_id: str = "unnamed"):
        super().__init__()
        self.cfg = cfg
        self.model_id = model_id
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, 0, cfg.w_dim
        self.img_resolution, self.img_channels = cfg.img_resolution, cfg.img_channels
        self.num_ws = cfg.num_ws
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)
        self.reset_noise()

    def reset_noise(self, seed: int = NOISE_SEED) -> None:
        """Draw the constant noise maps from `seed`, layer by layer (the same maps every time for a seed)."""
        gen = torch.Generator().manual_seed(seed)
        for layer in self.noise_layers():
            buf = layer.noise_const
            buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.device))

    def noise_layers(self) -> list[Noise]:
        return [m for m in self.synthesis.modules() if isinstance(m, Noise)]

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, noise_mode: str = "const") -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode)


def port_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's state dict (g_mapping.*, g_synthesis.*, optional truncation.avg_latent) under our names."""
    out = {}
    for k, v in state.items():
        if k.startswith("g_mapping."):
            out["mapping." + k[len("g_mapping."):]] = v
        elif k.startswith("g_synthesis."):
            out["synthesis." + k[len("g_synthesis."):]] = v
        elif k == "truncation.avg_latent":
            out["mapping.w_avg"] = v.reshape(-1)
        else:
            out[k] = v  # left for strict loading to name
    return out


def config_from_port(state: dict[str, torch.Tensor]) -> StyleGAN1Config:
    """Read the architecture off a port state dict's shapes (resolution, widths, mapping depth)."""
    n_dense = len([k for k in state if k.startswith("g_mapping.dense") and k.endswith(".weight")])
    res = max(int(k.split(".")[2].split("x")[0]) for k in state if k.startswith("g_synthesis.blocks."))
    w_dim, z_dim = state["g_mapping.dense0.weight"].shape
    channels = {r: state[f"g_synthesis.blocks.{r}x{r}.epi2.top_epi.noise.weight"].shape[0]
                for r in (2 ** i for i in range(2, int(math.log2(res)) + 1))}
    fmap_max = max(channels.values())
    fmap_base = channels[res] * res // 2
    cfg = StyleGAN1Config(z_dim=z_dim, w_dim=w_dim, img_resolution=res, mapping_layers=n_dense,
                          img_channels=state["g_synthesis.torgb.weight"].shape[0], fmap_base=fmap_base,
                          fmap_max=fmap_max)
    if any(cfg.channels(r) != c for r, c in channels.items()):
        raise ValueError(f"channel layout {channels} is not min(fmap_base * 2 // res, fmap_max) for any base and max")
    return cfg

