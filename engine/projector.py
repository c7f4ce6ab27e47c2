"""NVIDIA's projector (stylegan2-ada-pytorch `projector.py`, Karras et al. 2020) as the inversion recipe "projector",
and the same loop in W+ as "projector-w+" (`PROJECTOR_W_PLUS`).

One w per target, broadcast to every layer (W, not W+), starting at w_avg of 10,000 z (numpy RandomState 123),
with w_std their spread; 1000 steps of Adam (betas 0.9 / 0.999) at lr 0.1 with a 5 % linear ramp-up and a cosine
ramp-down over the last 25 %; at every step Gaussian noise of w_std * 0.05 * max(0, 1 - t / 0.75)^2 added to w
before synthesis; every constant noise map of the generator optimised too, drawn from N(0, 1) at the start and
renormalised to zero mean and unit variance after every step, under the multi-scale autocorrelation regulariser
(weight 1e5, each map average-pooled down to 8x8); the distance is LPIPS (engine/lpips.py; NVIDIA's `vgg16.pt`
with `return_lpips=True` is LPIPS's VGG16 with its learned weights) between images area-downsampled to 256 px.
Proven by tests/test_projector_parity.py against `project()` run from a clone (scripts/make_projector_parity.py).

A batch of targets is a batch of independent projections: each has its own w and its own noise maps ([N, 1, H, W]
per layer, put in place of the generator's shared maps while it renders: `noise_maps`), and every loss term is
per sample. The randomness (noise maps, then one w noise per step) comes from a generator seeded with `seed`, in
NVIDIA's order, so one target with seed s draws what their code draws after `torch.manual_seed(s)`.

What is kept: the stored latent is that w broadcast to W+ ([num_ws, w_dim]), like every stylebot latent; the
optimised noise maps are dropped, and the reconstruction, its PSNR and every later render (morph, edit, stronger)
use the model's own constant noise. benchmarks/invert.py measures what dropping them costs on self-inversions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from engine.images import from_uint8, to_uint8
from engine.optim import Preview, Progress, adam_step, lr_schedule, report


@dataclass(frozen=True)
class ProjectorRecipe:
    steps: int = 1000
    lr: float = 0.1
    w_avg_samples: int = 10_000
    w_avg_seed: int = 123               # numpy RandomState of the z samples
    initial_noise_factor: float = 0.05
    noise_ramp: float = 0.75            # fraction of the steps over which the w noise fades out
    rampup: float = 0.05
    rampdown: float = 0.25
    regularize_noise_weight: float = 1e5
    lpips_size: int = 256               # larger images are area-downsampled to this before LPIPS
    w_plus: bool = False                # optimise one w per layer (W+), each with its own w noise


PROJECTOR = ProjectorRecipe()
# The same loop in W+: the optimisation baseline of GANInverter (Cao et al. 2022, `--w_plus`: LPIPS, w noise 0.05
# fading over 0.75, noise maps regularised at 1e5, 1000 steps), whose published CelebA-HQ numbers are PSNR 20.59,
# LPIPS 0.109, ID 0.77 (in W: 15.85, 0.197, 0.32). Its code (rosinality's projector) differs from NVIDIA's in
# details that we do not take: a bilinear resize and a clamp before LPIPS, the noise maps renormalised by their
# unbiased std, w statistics from torch.randn z.
PROJECTOR_W_PLUS = ProjectorRecipe(w_plus=True)


@lru_cache(maxsize=4)
def w_stats(G, samples: int = PROJECTOR.w_avg_samples, seed: int = PROJECTOR.w_avg_seed) -> tuple[torch.Tensor, float]:
    """w_avg [1, 1, w_dim] (on G's device) and w_std (the root mean squared distance of w to it) over `samples` z
    from numpy's RandomState(seed), computed as projector.py does (float32 w, numpy sums)."""
    device = G.mapping.w_avg.device
    z = np.random.RandomState(seed).randn(samples, G.z_dim)
    with torch.no_grad():
        w = G.mapping(torch.from_numpy(z).to(device), None)[:, :1, :].cpu().numpy().astype(np.float32)
    w_avg = np.mean(w, axis=0, keepdims=True)
    w_std = float((np.sum((w - w_avg) ** 2) / samples) ** 0.5)
    return torch.from_numpy(w_avg).to(device), w_std


def noise_buffers(G) -> list[tuple[torch.nn.Module, str]]:
    """(module, buffer name) of every constant noise map of G's synthesis, in `named_buffers` order."""
    out = []
    for name, _ in G.synthesis.named_buffers():
        if "noise_const" in name:
            path, _, attr = name.rpartition(".")
            out.append((G.synthesis.get_submodule(path), attr))
    return out


@contextmanager
def noise_maps(G, maps: list[torch.Tensor]):
    """While rendering, each constant noise map of G is `maps[i]` ([N, 1, H, W]: one map per sample) instead of
    the shared one (it broadcasts over channels exactly as the shared map does); restored afterwards."""
    buffers = noise_buffers(G)
    if len(buffers) != len(maps):
        raise ValueError(f"G has {len(buffers)} noise maps, got {len(maps)}")
    saved = [owner._buffers[attr] for owner, attr in buffers]
    try:
        for (owner, attr), m in zip(buffers, maps):
            owner._buffers[attr] = m
        yield
    finally:
        for (owner, attr), m in zip(buffers, saved):
            owner._buffers[attr] = m


def noise_regularization(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample sum over maps and scales of the squared mean autocorrelation at a shift of one pixel, vertically
    and horizontally; each map is average-pooled by 2 until it is 8x8 or smaller: [N]."""
    reg = 0.0
    for noise in maps:
        while True:
            reg = reg + (noise * torch.roll(noise, shifts=1, dims=3)).mean(dim=(1, 2, 3)).square()
            reg = reg + (noise * torch.roll(noise, shifts=1, dims=2)).mean(dim=(1, 2, 3)).square()
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return reg


def renormalize_(maps: list[torch.Tensor]) -> None:
    """Each sample's noise maps to zero mean and unit variance, in place (after every step of a projection)."""
    with torch.no_grad():
        for m in maps:
            m -= m.mean(dim=(1, 2, 3), keepdim=True)
            m *= m.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()


def _downsample(img: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(img, size=(size, size), mode="area") if img.shape[2] > size else img


def project(
    G,                                  # generator with the StyleGAN2 API (StyleGAN2 or StyleGAN1 family)
    lpips,                              # engine.lpips.LPIPS: `prepare(target)` once, then `(img, prepared) -> [N]`
    targets: np.ndarray,                # uint8 [N, R, R, 3] aligned faces at G's resolution (or [R, R, 3])
    *,
    steps: int | None = None,
    recipe: ProjectorRecipe = PROJECTOR,
    seed: int = 303,                    # projector.py's default --seed
    init_ws: torch.Tensor | None = None,  # [N, num_ws, w_dim]: go on from here (its first layer's w; W space)
    progress: Progress | None = None,
    preview: Preview | None = None,
    preview_every: int = 100,
    trail: list | None = None,          # tests: after each Adam step, [w [N, 1 or num_ws, w_dim], *maps] is appended
):
    """Project each target: returns (ws [N, num_ws, w_dim] on the CPU, uint8 renders [N, R, R, 3] with the model's
    constant noise, losses [steps, N])."""
    r, total = recipe, recipe.steps if steps is None else steps
    device = G.mapping.w_avg.device
    target = from_uint8(targets, device)
    n, res = target.shape[0], G.img_resolution
    if target.shape[-1] != res:
        raise ValueError(f"targets must be {res}x{res} (aligned for this model), got {tuple(target.shape[-2:])}")
    gen = torch.Generator(device).manual_seed(seed)
    w_avg, w_std = w_stats(G, r.w_avg_samples, r.w_avg_seed)
    prepared = lpips.prepare(_downsample(target, r.lpips_size))
    layers = G.num_ws if r.w_plus else 1
    if init_ws is None:
        start = w_avg.repeat(n, layers, 1)
    else:
        start = init_ws.to(device, torch.float32).reshape(n, G.num_ws, G.w_dim)[:, :layers].clone()
    w_opt = start.requires_grad_(True)
    maps = [torch.randn([n, 1, *owner._buffers[attr].shape[-2:]], generator=gen, device=device).requires_grad_(True)
            for owner, attr in noise_buffers(G)]
    opt = torch.optim.Adam([w_opt, *maps], betas=(0.9, 0.999), lr=r.lr)
    history = np.zeros([total, n], dtype=np.float32)
    for step in range(total):
        t = step / total
        w_noise_scale = w_std * r.initial_noise_factor * max(0.0, 1.0 - t / r.noise_ramp) ** 2
        w_noise = torch.randn(w_opt.shape, generator=gen, device=device) * w_noise_scale
        ws = (w_opt + w_noise).repeat(1, G.num_ws // layers, 1)
        with noise_maps(G, maps):
            img = G.synthesis(ws, noise_mode="const")
        loss = lpips(_downsample(img, r.lpips_size), prepared)
        loss = loss + noise_regularization(maps) * r.regularize_noise_weight
        history[step] = adam_step(opt, loss, lr_schedule(step, total, r.lr, r.rampup, r.rampdown))
        if trail is not None:
            trail.append([w_opt.detach().clone(), *(m.detach().clone() for m in maps)])
        renormalize_(maps)
        report(step + 1, total, history[step], img, progress, preview, preview_every)
    ws = w_opt.detach().repeat(1, G.num_ws // layers, 1)
    with torch.no_grad():
        images = to_uint8(G.synthesis(ws, noise_mode="const"))
    return ws.cpu(), images, history
