"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG variant,
version 0.1: the distance NVIDIA's projector and most published inversion recipes measure. Images in [-1, 1] are
shifted and scaled per channel (LPIPS's ScalingLayer), run through VGG16's features (ours, engine/perceptual.py, the
same modules as torchvision's `vgg16().features`), and at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 each
position's feature vector is scaled to unit length; the squared differences are weighted per channel by LPIPS's
learned linear layers (1x1 convolutions without bias), averaged over positions and summed over layers. The learned
weights (5 vectors, 1,472 numbers) come from the `lpips` package's wheel (`lpips/weights/v0.1/vgg.pth`), read as a
file: the engine imports neither the package's code nor torchvision. With torchvision's ImageNet VGG16 (`stylebot
weights download vgg16`) this is LPIPS exactly (tests/test_lpips.py compares it with the package); without that
download, or with the built-in tiny models, the feature network has random weights and the same formula over random
features is NOT LPIPS (the engine warns about the random VGG16 when it loads it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import StylebotError
from engine.perceptual import RELU, VGG16Features

LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")  # lpips.pretrained_networks.vgg16's five slices
SHIFT = (-0.030, -0.088, -0.188)        # lpips.ScalingLayer: (x - shift) / scale on [-1, 1] images
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10                             # lpips.normalize_tensor: f / (||f|| + eps), the norm over channels


class LPIPSError(StylebotError):
    """LPIPS's learned weights cannot be read, or do not fit the feature network."""


def weights_path() -> Path:
    """The `lpips` package's VGG v0.1 linear weights (vgg.pth), found without importing the package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSError("LPIPS needs the `lpips` package for its learned weights: pip install lpips")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"


def unit_channels(f: torch.Tensor) -> torch.Tensor:
    """Features [N, C, H, W] with each position's C-vector scaled to unit length (lpips.normalize_tensor)."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + EPS)


class LPIPS(nn.Module):
    """LPIPS distance over a given VGG16: `prepare(target)` once, then `lpips(img, prepared) -> [N]` per sample.

    The VGG16 is shared (the same object as the other losses'), not copied; it is run here module by module on
    LPIPS's own input scaling, whatever normalisation VGG16Features' other users apply.
    """

    def __init__(
        self,
        vgg: VGG16Features,             # full-width VGG16 (torchvision's layout); ImageNet weights make it LPIPS
        lin: list[torch.Tensor],        # the 5 learned weights, [1, C, 1, 1] or [C], C = 64, 128, 256, 512, 512
    ):
        super().__init__()
        self.vgg = vgg
        widths = [vgg.features[RELU[name] - 1].out_channels for name in LAYERS]
        if [w.numel() for w in lin] != widths:
            raise LPIPSError(f"LPIPS's learned weights fit VGG16's widths, {[w.numel() for w in lin]}, "
                             f"not this network's {widths}")
        for i, w in enumerate(lin):
            self.register_buffer(f"lin{i}", w.detach().reshape(1, -1, 1, 1).float().clone())
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1))

    def features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images [N, 3, H, W] in [-1, 1] (any size; resizing is the caller's) -> the unit-length features of each
        layer, [N, C_l, H_l, W_l]."""
        x = (img - self.shift) / self.scale
        wanted, last, out = {RELU[name] for name in LAYERS}, RELU[LAYERS[-1]], []
        for i, layer in enumerate(self.vgg.features):
            x = layer(x)
            if i in wanted:
                out.append(unit_channels(x))  # the next module is a max-pool, so in-place ReLUs leave x as it is
            if i == last:
                break
        return out

    def prepare(self, target: torch.Tensor) -> list[torch.Tensor]:
        """The target's side [N, 3, H, W] in [-1, 1], computed once for an optimisation (no gradient)."""
        with torch.no_grad():
            return self.features(target)

    def forward(self, img: torch.Tensor, prepared: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS between images [N, 3, H, W] in [-1, 1] and `prepare(target)` of the same size: [N]."""
        total = 0.0
        for i, (f, t) in enumerate(zip(self.features(img), prepared)):
            total = total + F.conv2d((f - t).square(), getattr(self, f"lin{i}")).mean([1, 2, 3])
        return total


def load_lpips(vgg: VGG16Features) -> LPIPS:
    """LPIPS over `vgg` (full width, on its device), with the learned weights from the `lpips` wheel."""
    path = weights_path()
    if not path.is_file():
        raise LPIPSError(f"the lpips package has no {path.name} at {path.parent}: reinstall it (pip install lpips)")
    state = torch.load(path, map_location="cpu", weights_only=True)  # saved from a GPU: map to the CPU first
    lin = [state[f"lin{i}.model.1.weight"] for i in range(len(LAYERS))]
    return LPIPS(vgg, lin).to(next(vgg.parameters()).device)  # only buffers of its own: nothing to train
