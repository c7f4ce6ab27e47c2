"""Morphs between two W+ latents, and their encoding as a looping GIF or an MP4 under a size budget.

`morph(G, wa, wb, frames=...)` renders the frames (weights (1 - t, t) that sum to 1, the seed's rule; optional
easing, ping-pong and layer ranges for style mixing); `MorphRender` renders them a few at a time, between an
engine's other work. `encode_gif` / `encode_mp4` turn frames into bytes and shrink the frames or the frame count
rather than fail when a budget is given.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
from PIL import Image

from engine.images import to_uint8

LAYER_RANGES = ("all", "coarse", "middle", "fine")  # coarse: 4-8 px layers, middle: 16-32 px, fine: 64 px and up


def layer_mask(G, layers: str) -> torch.Tensor:
    """[num_ws] 1.0 where a layer takes part in the morph. Layers follow the synthesis resolutions."""
    if layers not in LAYER_RANGES:
        raise ValueError(f"layers must be one of {LAYER_RANGES}, got {layers!r}")
    mask = torch.zeros(G.num_ws)
    if layers == "all":
        return mask + 1
    w_idx = 0
    for res in G.synthesis.block_resolutions:
        n = 1 if res == 4 else 2
        if _band(res) == layers:
            mask[w_idx:w_idx + n] = 1
        w_idx += n
    if _band(G.img_resolution) == layers:
        mask[w_idx:] = 1  # the last toRGB belongs to the highest resolution
    return mask


def _band(res: int) -> str:
    return "coarse" if res <= 8 else "middle" if res <= 32 else "fine"


def weights(frames: int, easing: str = "cosine") -> list[float]:
    """t for each frame, 0 -> 1 inclusive: linear, or cosine (slow at both ends)."""
    ts = np.linspace(0.0, 1.0, frames)
    if easing == "cosine":
        ts = 0.5 - 0.5 * np.cos(ts * math.pi)
    elif easing != "linear":
        raise ValueError(f"easing must be linear or cosine, got {easing!r}")
    return [float(t) for t in ts]


def morph(G, wa: torch.Tensor, wb: torch.Tensor, *, frames: int = 24, easing: str = "cosine", pingpong: bool = True,
          layers: str = "all", batch: int = 4, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """uint8 [F, R, R, 3]: (1 - t) * wa + t * wb on the chosen layers (wa elsewhere); ping-pong returns to wa."""
    render = MorphRender(G, wa, wb, frames=frames, easing=easing, pingpong=pingpong, layers=layers, batch=batch)
    done = False
    while not done:
        done = render.step()
        if progress:
            progress(render.rendered, frames)
    return render.video()


class MorphRender:
    """A morph rendered `batch` frames per `step()`, so that an engine can run other work between the steps;
    `video()` is then exactly what `morph()` returns with the same arguments (it is how `morph()` renders)."""

    def __init__(self, G, wa: torch.Tensor, wb: torch.Tensor, *, frames: int = 24, easing: str = "cosine",
                 pingpong: bool = True, layers: str = "all", batch: int = 4):
        device = G.mapping.w_avg.device
        wa, wb = wa.to(device).reshape(1, G.num_ws, G.w_dim), wb.to(device).reshape(1, G.num_ws, G.w_dim)
        mask = layer_mask(G, layers).to(device).reshape(1, -1, 1)
        t = torch.tensor(weights(frames, easing), device=device).reshape(-1, 1, 1)
        self.ws = wa + mask * t * (wb - wa)  # (1 - t) wa + t wb where the mask is 1
        self.G, self.frames, self.pingpong, self.batch = G, frames, pingpong, batch
        self.chunks: list[np.ndarray] = []
        self.rendered = 0

    def step(self) -> bool:
        """Render the next `batch` frames; True once every frame is rendered."""
        with torch.no_grad():
            ws = self.ws[self.rendered:self.rendered + self.batch]
            self.chunks.append(to_uint8(self.G.synthesis(ws, noise_mode="const")))
        self.rendered += len(ws)
        return self.rendered >= self.frames

    def video(self) -> np.ndarray:
        video = np.concatenate(self.chunks)
        if self.pingpong and self.frames > 2:
            video = np.concatenate([video, video[-2:0:-1]])
        return video


def encode_gif(frames: np.ndarray, *, fps: float = 12, max_bytes: int | None = None, min_side: int = 64) -> bytes:
    """A looping GIF with one palette for the whole animation (no flicker); halves the size until under budget."""
    while True:
        data = _gif(frames, fps)
        if max_bytes is None or len(data) <= max_bytes:
            return data
        if frames.shape[1] // 2 >= min_side:
            frames = _half(frames)
        elif len(frames) > 2:
            frames = frames[::2]  # already small: drop every other frame instead
        else:
            raise ValueError(f"cannot fit the animation in {max_bytes} bytes")


def encode_mp4(frames: np.ndarray, *, fps: float = 24, max_bytes: int | None = None, crf: int = 23) -> bytes:
    """H.264 MP4 (PyAV's bundled libx264), yuv420p for players everywhere; raises crf until under budget."""
    import av

    h, w = frames.shape[1:3]
    frames = frames[:, : h - h % 2, : w - w % 2]  # yuv420p needs even sides
    while True:
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(round(fps)))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            container.mux(stream.encode())
        data = buf.getvalue()
        if max_bytes is None or len(data) <= max_bytes or crf >= 45:
            return data
        crf += 6


def _gif(frames: np.ndarray, fps: float) -> bytes:
    # One adaptive palette from a mosaic of (a sample of) all frames, applied to every frame.
    step = max(1, len(frames) // 16)
    mosaic = Image.fromarray(np.concatenate(list(frames[::step]), axis=0))
    palette = mosaic.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    colours = palette.getpalette()
    images = []
    for f in frames:
        im = Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE)
        images.append(im)
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], loop=0, duration=round(1000 / fps),
                   optimize=False, disposal=1, palette=bytes(colours))  # `palette`: written once, globally
    return buf.getvalue()


def _half(frames: np.ndarray) -> np.ndarray:
    h, w = frames.shape[1:3]
    return np.stack([np.asarray(Image.fromarray(f).resize((w // 2, h // 2), Image.LANCZOS)) for f in frames])
