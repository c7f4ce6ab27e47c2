"""VGG16 feature distances for inversion: the Image2StyleGAN perceptual loss and an LPIPS-style normalised one.

The network is VGG16's `features`, laid out as torchvision's (its ImageNet weights load through the weights
registry; `width < 1` builds the same architecture with fewer channels, with random weights, for tests and the tiny
model). It takes its input as it is given: each recipe says what that is (`imagenet_input` for ImageNet's
normalisation, as torchvision's weights expect; the seed notebook feeds plain [0, 1] images).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.device import autocast_for

# VGG16 ("configuration D" of Simonyan & Zisserman): channels of each 3x3 conv, "M" a 2x2 max-pool. Built as
# torchvision's `vgg16().features` is (same modules at the same indices, so its ImageNet weights load one to one),
# without importing torchvision, which costs an engine about a second at start-up.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

# Index of each named ReLU in torchvision's vgg16().features.
RELU = {"relu1_1": 1, "relu1_2": 3, "relu2_2": 8, "relu3_2": 13, "relu3_3": 15, "relu4_2": 20, "relu4_3": 22,
        "relu5_3": 29}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """Activations of chosen VGG16 layers for a network input [N, 3, H, W] (see `imagenet_input`)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for c in VGG16_CFG:
            if c == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = max(1, int(c * width))
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.width = width

    def forward(self, x: torch.Tensor, layers: list[str]) -> list[torch.Tensor]:
        wanted = {RELU[name]: name for name in layers}
        out: dict[str, torch.Tensor] = {}
        last = max(wanted)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out[wanted[i]] = x
            if i == last:
                break
        return [out[name] for name in layers]


def load_vgg16(path: str | Path | None = None, *, width: float = 1.0, seed: int = 0) -> VGG16Features:
    """torchvision's ImageNet VGG16 from `path` (vgg16-397923af.pth), or random weights from `seed` when None."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vgg = VGG16Features(width)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        vgg.features.load_state_dict(features, strict=True)
    return vgg.eval().requires_grad_(False)


def imagenet_input(img: torch.Tensor) -> torch.Tensor:
    """Generator images in [-1, 1] -> the input torchvision's ImageNet weights expect ((x - mean) / std on [0, 1])."""
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).reshape(1, 3, 1, 1)
    return ((img + 1) / 2 - mean) / std


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample (or bilinear-upsample) square images to `size`."""
    if img.shape[-1] == size:
        return img
    mode = "area" if img.shape[-1] > size else "bilinear"
    return F.interpolate(img, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def features(vgg: VGG16Features, img: torch.Tensor, layers: list[str], precision: str = "fp32") -> list[torch.Tensor]:
    """`vgg(img, layers)` in `precision` (bf16: under autocast), returned in float32 for the losses."""
    with autocast_for(img.device, precision):
        feats = vgg(img, layers)
    return [f.float() for f in feats]


def feature_mse(feats: list[torch.Tensor], target_feats: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample sum over layers of the mean squared difference between activations (Image2StyleGAN's
    perceptual term, Abdal et al. 2019): [N]."""
    return sum((f - t).square().flatten(1).mean(1) for f, t in zip(feats, target_feats))


def lpips_like(feats: list[torch.Tensor], target_feats: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample LPIPS distance without the learned weights: channel-normalised features, squared difference
    summed over channels, averaged over positions, summed over layers: [N]."""
    return sum((_unit(f) - _unit(t)).square().sum(1).flatten(1).mean(1) for f, t in zip(feats, target_feats))


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
