"""Conversions between the engine's edges (uint8 RGB [H, W, 3]) and the generator's range ([-1, 1] NCHW floats).

This is the one place where pixels change representation.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """Generator output [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (the official generate.py's rounding)."""
    x = (img.detach().permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.cpu().numpy()


def from_uint8(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [H, W, 3] or [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3] or [N, H, W, 3], got {a.dtype} {a.shape}")
    if a.ndim == 3:
        a = a[None]
    t = torch.from_numpy(np.array(a, copy=True)).to(device)
    return t.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


def encoder_input(images: np.ndarray, size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Aligned faces, uint8 [H, W, 3] or [N, H, W, 3] -> what e4e and pSp are fed: [N, 3, size, size] in [-1, 1],
    as their transforms make it (PIL bilinear resize to size x size, ToTensor, Normalize(0.5, 0.5))."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3] or [N, H, W, 3], got {a.dtype} {a.shape}")
    faces = [np.asarray(Image.fromarray(im, "RGB").resize((size, size), Image.BILINEAR))
             for im in a.reshape(-1, *a.shape[-3:])]
    t = torch.from_numpy(np.stack(faces)).to(device).permute(0, 3, 1, 2).to(torch.float32).div(255)
    return t.sub(0.5).div(0.5)


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one image, `cols` wide (default: as square as possible)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, cols)
        out[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] as a PNG file: what a chat is sent."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, *, quality: int, size: int | None = None) -> bytes:
    """uint8 RGB [H, W, 3] as a JPEG file, resized to `size` x `size` first when given (previews)."""
    img = Image.fromarray(image, "RGB")
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
