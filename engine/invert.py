"""Image2StyleGAN inversion: find the W+ latent whose rendering looks like the target face.

`invert(G, vgg, targets, recipe=...)` is pure (no I/O): it optimises one latent per target in a single batched
forward/backward pass (per-sample losses summed; Adam is elementwise, so a batch of N equals N single runs).
`InversionLoss` is a recipe's loss, shared with the continuous engine (engine/pool.py).

Recipes:
- "seed" (the default): the seed project's Image2StyleGAN notebook (ChoiDae1/StyleGAN_Project,
  `Image2StyleGAN.ipynb`; Abdal et al. 2019) step for step: W+ from zeros; the image mapped to [0, 1] by
  (x + 1) / 2 and clamped; loss = MSE to the target on [0, 1] at full resolution + the sum of the MSEs of VGG16
  relu1_1, relu1_2, relu3_2, relu4_2 between both images scaled to 256 px by bilinear interpolation
  (`scale_factor = 256 / resolution`) and fed to VGG as [0, 1] images without ImageNet normalisation; Adam lr 0.02
  (betas 0.9 / 0.999, eps 1e-8), no schedule, 1500 steps; on a CPU its preset of CPU_STEPS (the same loop, fewer
  steps: benchmarks/invert.py). Proven by tests/test_invert_parity.py against the notebook's own loop
  (scripts/make_invert_parity.py). The default because everything it optimises is the W+ latent that the bot
  stores and renders again (morphs, edits, stronger).
- "projector": NVIDIA's projector (stylegan2-ada-pytorch `projector.py`) step for step: engine/projector.py;
  "projector-w+" the same loop in W+ (GANInverter's optimisation baseline; its published numbers are there). Both
  optimise the generator's noise maps too, which a stored W+ latent does not carry (README: what that costs).
- "lpips-like": stylebot's earlier default, kept as a named variant: W+ from w_avg, pixel MSE on [-1, 1] (weight 30)
  + LPIPS-style channel-normalised VGG distance (ImageNet-normalised input, area-downsampled to 256 px at most),
  Adam lr 0.2 with a 5 % linear ramp-up and a cosine ramp-down over the last 75 %, 375 steps. No source and no
  published numbers: it was tuned on self-inversions of random-weight networks.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.device import autocast_for
from engine.images import from_uint8, to_uint8
from engine.lpips import LAYERS as LPIPS_LAYERS
from engine.lpips import load_lpips
from engine.optim import Preview, Progress, adam_step, lr_schedule, report
from engine.perceptual import VGG16Features, feature_mse, features, imagenet_input, lpips_like, resize
from engine.projector import PROJECTOR, PROJECTOR_W_PLUS, project


@dataclass(frozen=True)
class Recipe:
    steps: int
    lr: float
    init: str                           # "zeros" | "w_avg"
    loss: str                           # "image2stylegan" (the seed notebook's) | "lpips_like" | "projector"
    layers: tuple[str, ...]
    vgg_size: int = 256                 # VGG input size (the image is resized to it inside the graph)
    pixel_weight: float = 1.0
    w_only_fraction: float = 0.0        # first fraction of the steps optimises a single w broadcast to all layers
    rampup: float = 0.0                 # fraction of steps for the linear lr ramp-up
    rampdown: float = 0.0               # fraction of steps for the cosine lr ramp-down
    cpu_steps: int | None = None        # the recipe's preset for CPUs: the same loop, fewer steps

    def steps_on(self, device: str | torch.device) -> int:
        """The recipe's steps on a device: its CPU preset on a CPU, else all of them."""
        return self.cpu_steps if self.cpu_steps and torch.device(device).type == "cpu" else self.steps


CPU_STEPS = 750  # the seed recipe's CPU preset: the smallest budget within 1 dB of 1500 (benchmarks/invert.py)
DEFAULT_RECIPE = "seed"
RECIPES = {
    "seed": Recipe(steps=1500, lr=0.02, init="zeros", loss="image2stylegan",
                   layers=("relu1_1", "relu1_2", "relu3_2", "relu4_2"), cpu_steps=CPU_STEPS),
    "lpips-like": Recipe(steps=375, lr=0.2, init="w_avg", loss="lpips_like",
                      layers=("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
                      pixel_weight=30.0, rampup=0.05, rampdown=0.75),
}
# NVIDIA's projector (engine/projector.py): W (or W+) with noise maps, LPIPS; they run through `project`
PROJECTORS = {"projector": PROJECTOR, "projector-w+": PROJECTOR_W_PLUS}
RECIPES |= {name: Recipe(steps=p.steps, lr=p.lr, init="w_avg", loss="projector", layers=LPIPS_LAYERS,
                         rampup=p.rampup, rampdown=p.rampdown) for name, p in PROJECTORS.items()}


class InversionLoss:
    """A recipe's per-sample loss between generator images and their targets. `prepare` computes the targets'
    side once (a list of batch-first tensors, so that rows prepared apart can be concatenated); calling it gives
    the loss of each image, [N]."""

    def __init__(self, r: Recipe, vgg: VGG16Features, resolution: int, precision: str = "fp32"):
        self.r, self.vgg, self.precision, self.layers = r, vgg, precision, list(r.layers)
        self.resolution = resolution
        self.vgg_size = min(r.vgg_size, resolution)

    def _vgg_input(self, img: torch.Tensor) -> torch.Tensor:
        if self.r.loss == "image2stylegan":  # the notebook's nn.Upsample(scale_factor=256 / resolution, 'bilinear')
            return F.interpolate(img, scale_factor=self.r.vgg_size / self.resolution, mode="bilinear",
                                 align_corners=False)
        return imagenet_input(resize(img, self.vgg_size))

    def _image(self, img: torch.Tensor) -> torch.Tensor:
        """The generator's [-1, 1] image as the recipe's losses see it: the seed's clamped [0, 1], else as is."""
        return ((img + 1) / 2).clamp(0, 1) if self.r.loss == "image2stylegan" else img

    def prepare(self, target: torch.Tensor) -> list[torch.Tensor]:
        """Targets [N, 3, R, R] in [-1, 1] -> [pixels, *VGG features], each [N, ...]."""
        with torch.no_grad():
            x = self._image(target)
            return [x, *features(self.vgg, self._vgg_input(x), self.layers, self.precision)]

    def __call__(self, img: torch.Tensor, prepared: list[torch.Tensor]) -> torch.Tensor:
        target, *target_feats = prepared
        x = self._image(img)
        pixel = (x - target).square().flatten(1).mean(1) * self.r.pixel_weight
        feats = features(self.vgg, self._vgg_input(x), self.layers, self.precision)
        distance = feature_mse if self.r.loss == "image2stylegan" else lpips_like
        return pixel + distance(feats, target_feats)

    def start(self, G, n: int) -> torch.Tensor:
        """Where a recipe's latents start: [n, num_ws, w_dim] zeros or w_avg."""
        base = torch.zeros([G.w_dim], device=G.mapping.w_avg.device) if self.r.init == "zeros" else G.mapping.w_avg
        return base.reshape(1, 1, -1).repeat(n, G.num_ws, 1)


@dataclass
class InversionResult:
    ws: torch.Tensor                    # [N, num_ws, w_dim] W+ latents, on the CPU
    images: np.ndarray                  # uint8 [N, R, R, 3] reconstructions
    losses: np.ndarray                  # [steps, N] loss history
    psnr: list[float]                   # per target, dB, reconstruction vs target at the model's resolution
    recipe: str
    steps: int
    likeness: list[float | None] = field(default_factory=list)  # dlib descriptor distance, filled by the caller


def learning_rate(step: int, total: int, r: Recipe) -> float:
    return lr_schedule(step, total, r.lr, r.rampup, r.rampdown)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def psnr_scale(target: np.ndarray) -> str:
    """What a PSNR against `target` (uint8 [R, R, 3]) means, said with two copies of the photo itself: at a quarter
    of its size (enlarged back) and as a JPEG (quality 75). PSNR depends on the resolution and the photo (a quarter
    size copy scores about 22 dB at 32 px and 46 dB at 1024 px), so no fixed words would be true everywhere."""
    from PIL import Image

    img = Image.fromarray(target, "RGB")
    side = max(1, img.width // 4)
    quarter = img.resize((side, side), Image.LANCZOS).resize(img.size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    jpeg = Image.open(buf).convert("RGB")
    return (f"for scale, your photo at a quarter of its size scores {psnr(target, np.asarray(quarter)):.1f} dB and as "
            f"a JPEG {psnr(target, np.asarray(jpeg)):.1f} dB")


def invert(
    G,                                  # generator with the StyleGAN2 API
    vgg: VGG16Features,                 # feature network for the perceptual term
    targets: np.ndarray,                # uint8 [N, R, R, 3] aligned faces at G's resolution (or [R, R, 3])
    *,
    recipe: str = DEFAULT_RECIPE,
    steps: int | None = None,           # override the recipe's step count (default: its steps on G's device)
    init_ws: torch.Tensor | None = None,  # [N, num_ws, w_dim] start here instead (refining a stored latent)
    progress: Progress | None = None,
    preview: Preview | None = None,     # low-resolution look at the current images, every preview_every steps
    preview_every: int = 100,
    precision: str = "fp32",            # "bf16": generator and VGG under bf16 autocast (engine.device); else float32
    noise_mode: str = "const",          # "random": new noise maps at every step, as the StyleGAN1 port draws them
    seed: int = 303,                    # "projector": the seed of its noise maps and w noise (projector.py's default)
) -> InversionResult:
    r = RECIPES[recipe]
    device = G.mapping.w_avg.device
    total = r.steps_on(device) if steps is None else steps
    target = from_uint8(targets, device)
    n, res = target.shape[0], G.img_resolution
    if target.shape[-1] != res:
        raise ValueError(f"targets must be {res}x{res} (aligned for this model), got {tuple(target.shape[-2:])}")
    if r.loss == "projector":
        ws, images, history = project(G, load_lpips(vgg.to(device)), targets, steps=total, seed=seed,
                                      recipe=PROJECTORS[recipe],
                                      init_ws=init_ws, progress=progress, preview=preview, preview_every=preview_every)
        return InversionResult(ws, images, history, [psnr(a, b) for a, b in zip(images, to_uint8(target))],
                               recipe, total)
    loss = InversionLoss(r, vgg.to(device), res, precision)
    prepared = loss.prepare(target)

    if init_ws is not None:
        start, w_only_steps = init_ws.to(device, torch.float32), 0
    else:
        start, w_only_steps = loss.start(G, n), int(total * r.w_only_fraction)

    # Stage 1 (optional): one w per target, broadcast to every layer. Stage 2: every layer on its own (W+).
    w = (start[:, :1] if w_only_steps else start).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=r.lr, betas=(0.9, 0.999), eps=1e-8)
    history = np.zeros([total, n], dtype=np.float32)
    for step in range(total):
        if step == w_only_steps and w_only_steps:
            w = w.detach().repeat(1, G.num_ws, 1).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=r.lr, betas=(0.9, 0.999), eps=1e-8)
        ws = w if w.shape[1] == G.num_ws else w.expand(-1, G.num_ws, -1)
        with autocast_for(device, precision):
            img = G.synthesis(ws, noise_mode=noise_mode)
        history[step] = adam_step(opt, loss(img.float(), prepared), learning_rate(step, total, r))
        report(step + 1, total, history[step], img, progress, preview, preview_every)

    with torch.no_grad():
        ws = (w if w.shape[1] == G.num_ws else w.expand(-1, G.num_ws, -1)).detach()
        images = to_uint8(G.synthesis(ws, noise_mode="const"))
    targets_u8 = to_uint8(target)
    return InversionResult(ws.cpu(), images, history, [psnr(a, b) for a, b in zip(images, targets_u8)],
                           recipe, total)
