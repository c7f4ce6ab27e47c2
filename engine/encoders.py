"""Face encoders: an aligned face in, W+ out, in one forward pass (the first answer to /invert).

Two designs, both an IR-SE backbone (ArcFace's IR-SE-50 by default) under a feature pyramid whose levels feed one
small head per w:
- e4e, `Encoder4Editing` (Tov et al. 2021, omertov/encoder4editing): one w0 from the top level, repeated, plus a
  delta per w (the deltas that progressive training switched on, all of them once trained);
- pSp, `GradualStyleEncoder` (Richardson et al. 2021, eladrich/pixel2style2pixel): each w from its level alone.
Both add the generator's average w when trained with `start_from_latent_avg` (the published FFHQ ones were).

Parameter and buffer names equal those of the authors' `encoder` modules, so the `encoder.*` keys of their published
checkpoints load with `strict=True`; the maths is theirs step for step (tests/test_encoder_parity.py checks it
against numbers their code computed). The input is what their code feeds: the aligned face resized to 256 px,
[N, 3, 256, 256] in [-1, 1] (`engine.images.encoder_input`). An encoder belongs to the generator it was trained
with: its checkpoint carries that decoder, and `load_encoder` keeps a fingerprint of the decoder's weights that
`check_generator` compares with the generator the engine runs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints import CheckpointError, read_torch_file, rosinality_to_ours

KINDS = ("e4e", "psp")
ENCODER_TYPES = {"Encoder4Editing": "e4e", "GradualStyleEncoder": "psp"}  # the authors' opts.encoder_type
IR_SE_50 = ((64, 3), (128, 4), (256, 14), (512, 3))                      # (channels, units) of each stage


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of an encoder; the defaults are the published FFHQ e4e (pSp differs only in `kind`)."""

    kind: str = "e4e"                   # 'e4e' (w0 + progressive deltas) | 'psp' (each w from its pyramid level)
    n_styles: int = 18                  # ws out: the generator's num_ws, log2(resolution) * 2 - 2
    w_dim: int = 512                    # width of each w (and of the heads' convolutions)
    in_channels: int = 3                # input colour channels
    stem: int = 64                      # channels of the input layer
    stages: tuple[tuple[int, int], ...] = IR_SE_50  # (channels, units) per stage; each stage's first unit strides 2
    se_reduction: int = 16              # squeeze-excitation bottleneck: channels // se_reduction
    input_size: int = 256               # the face size the heads are built for: they stride the pyramid's levels
                                        # (input_size / 16, / 8, / 4 px) down to 1 x 1
    coarse: int = 3                     # ws [0, coarse) come from the top level (c3)
    middle: int = 7                     # ws [coarse, middle) from the middle level (p2), the rest from the fine
                                        # one (p1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        if self.kind not in KINDS:
            raise ValueError(f"encoder kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.stages) != 4 or any(c < 1 or u < 1 for c, u in self.stages):
            raise ValueError(f"the pyramid taps the ends of four stages: need four (channels, units), "
                             f"got {self.stages}")
        if self.input_size < 16 or self.input_size & (self.input_size - 1):
            raise ValueError(f"input_size must be a power of two >= 16, got {self.input_size}")
        if self.n_styles < 1 or not 0 < self.coarse <= self.middle:
            raise ValueError(f"need n_styles >= 1 and 0 < coarse <= middle, got {self.n_styles}, {self.coarse}, "
                             f"{self.middle}")

    @staticmethod
    def styles_for(resolution: int) -> int:
        """ws of a generator of this resolution, as the authors count them: log2(size) * 2 - 2 (18 at 1024 px)."""
        return int(math.log(resolution, 2)) * 2 - 2

    def head_downsamplings(self, level: int) -> int:
        """Stride-2 convolutions of a head on pyramid level 0 (c3, input/16), 1 (p2, input/8) or 2 (p1, input/4)."""
        return int(math.log2(self.input_size // (16 >> level)))

    def to_dict(self) -> dict:
        return {k: (list(map(list, v)) if k == "stages" else v) for k, v in self.__dict__.items()}


# -- layers ------------------------------------------------------------------------------------------------------

class EqualLinear(nn.Module):
    """Dense layer with an equalised learning rate (rosinality's `EqualLinear`, lr_mul 1): x W^T / sqrt(in) + b."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = 1 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, bias=self.bias)


class SqueezeExcite(nn.Module):
    """Channel gates from the globally pooled features: x * sigmoid(fc2(relu(fc1(mean x))))."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    """ArcFace's improved residual unit with squeeze-excitation: BN, conv 3x3, PReLU, conv 3x3 (strided), BN, SE;
    the shortcut subsamples (same width) or projects with a strided 1x1 conv and BN (new width)."""

    def __init__(self, in_channels: int, channels: int, stride: int, se_reduction: int):
        super().__init__()
        self.stride = stride
        if in_channels != channels:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                                nn.BatchNorm2d(channels))
        else:
            self.shortcut_layer = None  # the authors' MaxPool2d(1, stride): a subsampling, nothing learned
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            SqueezeExcite(channels, se_reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return self.res_layer(x) + shortcut


class GradualStyleBlock(nn.Module):
    """One w from one pyramid level: `n_down` stride-2 3x3 convs with leaky ReLU (slope 0.01) to a 1 x 1 map, then
    an equalised linear layer."""

    def __init__(self, in_channels: int, w_dim: int, n_down: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_down):
            layers += [nn.Conv2d(in_channels if i == 0 else w_dim, w_dim, 3, 2, 1), nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(w_dim, w_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"a style head left a {tuple(x.shape[-2:])} map: the input is larger than the "
                             "encoder's input_size")
        return self.linear(x.flatten(1))


def upsample_add(x: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """A pyramid level: the coarser level resized (bilinear, corners aligned) to the lateral one, plus it."""
    return F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


# -- encoders ----------------------------------------------------------------------------------------------------

class PyramidEncoder(nn.Module):
    """The IR-SE backbone, the pyramid's lateral layers and one head per w, shared by e4e and pSp.

    forward(x [N, in_channels, H, W] in [-1, 1], H = W <= input_size) -> [N, n_styles, w_dim], before the average
    w is added (`EncoderCheckpoint.encode` adds it)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.input_layer = nn.Sequential(nn.Conv2d(cfg.in_channels, cfg.stem, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(cfg.stem), nn.PReLU(cfg.stem))
        units, width = [], cfg.stem
        for channels, n in cfg.stages:
            for i in range(n):
                units.append(BottleneckIRSE(width, channels, 2 if i == 0 else 1, cfg.se_reduction))
                width = channels
        self.body = nn.Sequential(*units)
        self.taps = tuple(sum(n for _, n in cfg.stages[:k + 1]) - 1 for k in (1, 2, 3))  # 6, 20, 23 in IR-SE-50
        top = cfg.stages[3][0]
        self.styles = nn.ModuleList(
            GradualStyleBlock(top, cfg.w_dim, cfg.head_downsamplings(self.level(i))) for i in range(cfg.n_styles))
        self.latlayer1 = nn.Conv2d(cfg.stages[2][0], top, 1)
        self.latlayer2 = nn.Conv2d(cfg.stages[1][0], top, 1)

    def level(self, i: int) -> int:
        """Pyramid level of w i: 0 (c3), 1 (p2) or 2 (p1)."""
        return 0 if i < self.cfg.coarse else 1 if i < self.cfg.middle else 2

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c1, c2, c3): the ends of stages 2, 3 and 4 (input/4, /8, /16 px)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or max(x.shape[-2:]) > self.cfg.input_size:
            raise ValueError(f"expected faces [N, {self.cfg.in_channels}, H, W] of at most {self.cfg.input_size} px, "
                             f"got {tuple(x.shape)}")
        x = self.input_layer(x)
        taps = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                taps.append(x)
        return taps[0], taps[1], taps[2]

    def pyramid(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
        """Levels 0, 1, 2 (c3, p2, p1) in turn, each computed only when asked for."""
        yield c3
        p2 = upsample_add(c3, self.latlayer1(c2))
        yield p2
        yield upsample_add(p2, self.latlayer2(c1))


class Encoder4Editing(PyramidEncoder):
    """e4e: w0 from the top level, repeated n_styles times, plus a learned delta for each w after the first."""

    def forward(self, x: torch.Tensor, deltas: int | None = None) -> torch.Tensor:
        """`deltas`: how many deltas to add (ws 1..deltas; the authors' progressive stage), None = all (inference)."""
        n = self.cfg.n_styles - 1 if deltas is None else min(deltas, self.cfg.n_styles - 1)
        levels = self.pyramid(*self.backbone(x))
        features, at = next(levels), 0
        w0 = self.styles[0](features)
        ws = [w0]
        for i in range(1, n + 1):
            while self.level(i) > at:
                features, at = next(levels), at + 1
            ws.append(w0 + self.styles[i](features))
        ws += [w0] * (self.cfg.n_styles - 1 - n)
        return torch.stack(ws, dim=1)


class GradualStyleEncoder(PyramidEncoder):
    """pSp: each w from its own pyramid level (coarse from c3, middle from p2, fine from p1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = list(self.pyramid(*self.backbone(x)))
        return torch.stack([head(levels[self.level(i)]) for i, head in enumerate(self.styles)], dim=1)


def build_encoder(cfg: EncoderConfig) -> PyramidEncoder:
    return {"e4e": Encoder4Editing, "psp": GradualStyleEncoder}[cfg.kind](cfg)


# -- checkpoints: the authors' layout ----------------------------------------------------------------------------

@dataclass
class EncoderCheckpoint:
    """A loaded encoder, the average w it starts from, and which generator it belongs to."""

    encoder: PyramidEncoder             # eval mode, frozen
    latent_avg: torch.Tensor | None     # [n_styles, w_dim], added to the encoder's output; None = not trained so
    decoder_fingerprint: str            # `weights_fingerprint` of the generator it was trained with
    decoder_resolution: int             # that generator's output size
    path: str
    opts: dict = field(repr=False, default_factory=dict)

    @property
    def cfg(self) -> EncoderConfig:
        return self.encoder.cfg

    def encode(self, faces: torch.Tensor) -> torch.Tensor:
        """faces [N, 3, 256, 256] in [-1, 1] (`engine.images.encoder_input`) -> W+ [N, n_styles, w_dim]."""
        ws = self.encoder(faces)
        return ws if self.latent_avg is None else ws + self.latent_avg


def load_encoder(path: str | Path, *, device: str | torch.device = "cpu", generator: nn.Module | None = None
                 ) -> EncoderCheckpoint:
    """Read an e4e or pSp checkpoint (`torch.save` of {state_dict: {encoder.*, decoder.*}, latent_avg, opts}) with
    torch's restricted unpickler; with `generator`, refuse it unless that generator holds the checkpoint's decoder.
    Every refusal is a one-line `CheckpointError` naming the file."""
    path = Path(path)
    ckpt = read_torch_file(path, mmap=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(path, f"not an e4e or pSp checkpoint: no 'state_dict' (found {keys})")
    opts = _opts_dict(path, ckpt.get("opts"))
    state = ckpt["state_dict"]
    fingerprint, resolution = _decoder(path, state, opts)
    cfg = config_from_opts(opts, resolution, path=path)
    with torch.device("meta"):  # no random init of what the file fills in (a quarter of a billion weights)
        enc = build_encoder(cfg)
    enc = enc.to_empty(device=device)
    try:
        enc.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")},
                            strict=True)
    except RuntimeError as e:
        raise CheckpointError(path, f"encoder weights do not fit {cfg.kind} with {cfg.n_styles} ws: "
                                    f"{str(e).strip().splitlines()[-1].strip()[:300]}") from None
    out = EncoderCheckpoint(
        encoder=enc.eval().requires_grad_(False),
        latent_avg=_latent_avg(path, ckpt.get("latent_avg"), opts, cfg, device),
        decoder_fingerprint=fingerprint, decoder_resolution=resolution,
        path=str(path), opts=opts)
    if generator is not None:
        check_generator(out, generator)
    return out


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of weights by name (sorted), shape and float32 value: equal only for the same numbers."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{list(t.shape)}".encode() + t.numpy().tobytes())
    return h.hexdigest()


def generator_fingerprint(G: nn.Module) -> str:
    """`weights_fingerprint` of a generator's learned weights (its parameters; not the fixed filters, noise maps or
    average w, which the files people have keep differently), under our names: whatever file the weights came from
    (rosinality `.pt`, NVIDIA's TensorFlow pickle, our safetensors), the same numbers give the same fingerprint."""
    return weights_fingerprint(dict(G.named_parameters()))


def holds_decoder(G: nn.Module, decoder_fingerprint: str) -> bool:
    """Whether generator G holds the weights of the decoder an encoder was trained with."""
    return generator_fingerprint(G) == decoder_fingerprint


def check_generator(enc: EncoderCheckpoint, G: nn.Module) -> None:
    """Refuse (one line) an encoder whose decoder is not generator G: its ws would mean nothing to G."""
    name = getattr(G, "model_id", None) or type(G).__name__
    if getattr(G, "num_ws", enc.cfg.n_styles) != enc.cfg.n_styles or not holds_decoder(G, enc.decoder_fingerprint):
        raise CheckpointError(enc.path, f"this encoder was trained with another generator: {name} does not hold "
                                        f"the weights of its decoder ({enc.decoder_resolution} px)")


def _decoder(path: Path, state: Mapping[str, torch.Tensor], opts: dict) -> tuple[str, int]:
    """(fingerprint, resolution) of the generator an encoder belongs to: from its `decoder.*` weights (rosinality's
    names, as the authors save them), or, in a file without them (our encoders for any generator, which need not
    carry a copy of it), from opts `decoder_fingerprint` and `decoder_resolution`."""
    decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    if not decoder:
        fingerprint, resolution = opts.get("decoder_fingerprint"), opts.get("decoder_resolution")
        if not isinstance(fingerprint, str) or not isinstance(resolution, int):
            raise CheckpointError(path, "it holds no decoder ('decoder.*' weights), so nothing says which generator "
                                        "it belongs to")
        return fingerprint, resolution
    try:
        cfg, ours = rosinality_to_ours(decoder)
    except (KeyError, ValueError) as e:
        raise CheckpointError(path, f"its decoder is not a rosinality StyleGAN2 generator ({e})") from None
    return weights_fingerprint(_learned(ours)), cfg.img_resolution


def _learned(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned weights of a generator state dict under our names (`generator_fingerprint`'s selection)."""
    return {k: v for k, v in state.items() if not k.endswith(("resample_filter", "noise_const", "w_avg"))}


def _opts_dict(path: Path, opts) -> dict:
    """The authors save `vars(opts)` (a dict); an argparse.Namespace is read the same way."""
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        if not hasattr(opts, "__dict__"):
            raise CheckpointError(path, f"its 'opts' is a {type(opts).__name__}, not a dict of options")
        opts = vars(opts)
    return dict(opts)


def config_from_opts(opts: dict, resolution: int, *, path: str | Path = "") -> EncoderConfig:
    """The architecture of an encoder for a generator of `resolution` px, from a checkpoint's options: encoder_type
    names the design; the published backbone (IR-SE-50, w_dim 512) unless `encoder_config` (the `to_dict` of our
    own encoders, for small generators) says otherwise; n_styles from the resolution."""
    kind = ENCODER_TYPES.get(str(opts.get("encoder_type", "")))
    if kind is None:
        raise CheckpointError(path, f"encoder_type {opts.get('encoder_type')!r} is not supported (only "
                                    f"{', '.join(ENCODER_TYPES)})")
    if int(opts.get("input_nc", 3)) != 3 or int(opts.get("label_nc", 0)) != 0:
        raise CheckpointError(path, "this pSp encodes sketches or label maps (input_nc / label_nc), not photos")
    stated = opts.get("output_size", opts.get("stylegan_size"))  # pSp's option / e4e's
    if stated is not None and int(stated) != resolution:
        raise CheckpointError(path, f"its options say a {stated} px generator but its decoder is {resolution} px")
    fields = dict(opts.get("encoder_config") or {})
    fields.update(kind=kind, n_styles=EncoderConfig.styles_for(resolution))
    try:
        return EncoderConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"unreadable encoder_config ({e})") from None


def _latent_avg(path: Path, avg, opts: dict, cfg: EncoderConfig, device) -> torch.Tensor | None:
    """[n_styles, w_dim] from what the authors stored ([n_styles, w_dim], [1, w_dim] or [w_dim], which their
    forward broadcasts alike), or None when the encoder was not trained to start from it."""
    if not opts.get("start_from_latent_avg", avg is not None):
        return None
    if not isinstance(avg, torch.Tensor):
        raise CheckpointError(path, "trained with start_from_latent_avg but it holds no latent_avg tensor")
    avg = avg.detach().float().reshape(-1, avg.shape[-1]) if avg.ndim else avg
    if avg.ndim != 2 or avg.shape[-1] != cfg.w_dim or avg.shape[0] not in (1, cfg.n_styles):
        raise CheckpointError(path, f"latent_avg {tuple(avg.shape)} does not fit {cfg.n_styles} ws of {cfg.w_dim}")
    return avg.expand(cfg.n_styles, cfg.w_dim).clone().to(device)
