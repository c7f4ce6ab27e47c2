"""Pieces shared by the latent optimisations (inversion, CLIP edit): the learning-rate schedule and one step."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from engine.images import to_uint8

Progress = Callable[[int, int, list[float]], None]   # (step, total, per-sample losses)
Preview = Callable[[int, np.ndarray], None]          # (step, uint8 [N, R, R, 3])


def lr_schedule(step: int, total: int, lr: float, rampup: float = 0.0, rampdown: float = 0.0) -> float:
    """Linear ramp-up over the first `rampup` of the steps, cosine ramp-down over the last `rampdown` (as in
    NVIDIA's projector and StyleCLIP); constant when both are 0."""
    t = step / max(total, 1)
    scale = 1.0
    if rampdown > 0:
        scale = 0.5 - 0.5 * math.cos(min(1.0, (1.0 - t) / rampdown) * math.pi)
    if rampup > 0:
        scale *= min(1.0, t / rampup)
    return lr * scale


def adam_step(opt: torch.optim.Optimizer, per_sample: torch.Tensor, lr: float) -> np.ndarray:
    """One step on the sum of per-sample losses (Adam is elementwise: samples stay independent); returns them."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    per_sample.sum().backward()
    opt.step()
    return per_sample.detach().cpu().numpy()


def report(step: int, total: int, losses: np.ndarray, img: torch.Tensor, progress: Progress | None,
           preview: Preview | None, preview_every: int) -> None:
    """Progress after every step (1-based `step`); a preview of the current images every `preview_every` steps."""
    if progress:
        progress(step, total, losses.tolist())
    if preview and step % preview_every == 0 and step < total:
        preview(step, to_uint8(img.detach()))
