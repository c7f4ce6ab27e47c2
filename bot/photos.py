"""Checks on a photo before anyone decodes it, shared by the bot (uploads from chat) and the CLI (files).

No torch and no Redis here: the bot processes import this. Importing it lets PIL open images of any size, which
`check_photo` then refuses by their header before decoding (the engine keeps PIL's own guard).
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from bot.config import LimitsConfig
from engine.align import size_problem

Image.MAX_IMAGE_PIXELS = None  # we check dimensions ourselves, before decoding, with our own limit

NOT_AN_IMAGE = "that file is not an image I can read; send a JPEG or PNG photo"
ANIMATED = ("GIF", "PNG", "WEBP", "FLI")  # formats whose several frames are an animation (APNG is "PNG")


def human_size(n: int) -> str:
    """Bytes for people: 15 MiB, 2.5 MiB, 98 KiB."""
    if n >= 2**20:
        return f"{n / 2**20:.1f}".removesuffix(".0") + " MiB"
    return f"{max(n / 2**10, 1):.0f} KiB"


def check_photo(data: bytes, limits: LimitsConfig, *, size: int | None = None) -> str | None:
    """A one-line reason why a photo cannot be used, or None. Bytes first (`size`: the whole file's, when `data` is
    only its start), then the header's dimensions, all before any decoding."""
    size = len(data) if size is None else size
    if size > limits.max_photo_bytes:
        return f"that photo is {human_size(size)}; send one under {human_size(limits.max_photo_bytes)}"
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        return NOT_AN_IMAGE
    w, h = img.size
    if w * h > limits.max_photo_pixels:
        return f"that photo is {w}x{h} pixels; send one under {limits.max_photo_pixels / 1e6:.0f} megapixels"
    if getattr(img, "n_frames", 1) > 1:
        if img.format == "TIFF":
            return "that file has several pages; send a single photo"
        if img.format in ANIMATED:
            return "that is an animation; send a still photo"
        if img.format != "MPO":  # a camera's MPO is the photo, then depth or stereo views: its first image is used
            return "that file holds several images; send a single photo"
    problem = size_problem(w, h)
    if problem:
        return problem
    try:
        img.load()
    except (OSError, SyntaxError, ValueError):
        return "that image is damaged or cut off; send it again"
    return None
