"""/invert: a photo's face aligned (beside the ticks: dlib takes a good part of a second on a CPU), then its W+
latent found by the default recipe as a row of the pool; stored as the user's face, with the aligned crop kept for
refines.

With an encoder for the model (`Services.encoder`), two answers: as soon as the face is aligned, one encoder pass
and one render give a first guess, stored as the user's face and posted at once (`Services.finish(first=True)`);
the row then starts from the encoder's W+ instead of the recipe's start, and its result replaces the first guess
(the same result id; its message is updated in place). With `refine` off the first guess is the answer."""

from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.align import align, likeness
from storage.errors import StylebotError
from engine.handlers.base import Rows
from engine.images import encoder_input, jpeg_bytes, png_bytes, to_uint8
from engine.invert import psnr, psnr_scale
from engine.pool import Finished
from engine.services import Services
from storage.latents import StoredLatent
from storage.records import Job

log = logging.getLogger("stylebot.engine")


class Invert:
    async def prepare(self, job: Job, s: Services) -> Rows | None:
        face = await asyncio.to_thread(align_photo, await s.queue.photo(job), s.G.img_resolution)
        steps = s.invert_steps()
        ctx = {"target": face.image, "steps": steps, "warnings": face.warnings, "refined": 0}
        guess = await asyncio.to_thread(encoded, s, face.image)
        if guess is None:  # no encoder for this model: one answer, after the optimisation from the recipe's start
            return Rows(lambda pool: pool.add_inversion(job, face.image, steps=steps), ctx)
        ws, image = guess
        refine = s.settings.refine
        if not await store_face(s, job, face.image, ws, image, psnr(image, face.image), 0, face.warnings,
                                encoder=True, first=refine, refining=steps):
            return None  # answered for good (the encoder's face, or its failure), or the user said /forget
        return Rows(lambda pool: pool.add_inversion(job, face.image, steps=steps, init_ws=ws),
                    {**ctx, "encoder": True}, answered=True)

    async def store(self, job: Job, s: Services, work: Rows, done: Finished) -> None:
        ctx = work.context
        await store_face(s, job, ctx["target"], done.ws, done.image, done.psnr, ctx["steps"], ctx["warnings"],
                         ctx["refined"], encoder=ctx.get("encoder", False))


def encoded(s: Services, face: np.ndarray) -> tuple[torch.Tensor, np.ndarray] | None:
    """The first guess of the engine's encoder (`first_guess`; blocking: the encoder is looked up, and loaded when
    its file changed), or None without one; an encoder that fails (out of memory beside a busy pool) is logged and
    the job goes on without a first answer."""
    try:
        return first_guess(s.encoder.get(), s.G, face)
    except Exception:  # noqa: BLE001 - the first answer is a bonus: the optimisation still answers
        log.exception("the encoder failed on a photo; answering after the optimisation")
        return None


def first_guess(encoder, G, face: np.ndarray) -> tuple[torch.Tensor, np.ndarray] | None:
    """One encoder pass and one render of an aligned face (uint8 [R, R, 3]): (W+ [num_ws, w_dim] on the CPU, the
    uint8 render), or None without an encoder (`EncoderSlot.get()`)."""
    if encoder is None:
        return None
    device = G.mapping.w_avg.device
    with torch.no_grad():
        ws = encoder.encode(encoder_input(face, encoder.cfg.input_size, device))
        image = to_uint8(G.synthesis(ws.to(torch.float32), noise_mode="const"))[0]
    return ws[0].cpu(), image


async def store_face(s: Services, job: Job, target: np.ndarray, ws: torch.Tensor, image: np.ndarray, psnr: float,
                     steps: int, warnings: list[str], refined: int = 0, *, encoder: bool = False,
                     first: bool = False, refining: int = 0) -> bool:
    """An inversion's result: the user's face, a rerunnable result with its aligned crop, the reply. `encoder`: it
    started from the encoder's W+ (`steps` 0: it is the encoder's face); `first`: a first answer, which a row of
    `refining` steps then refines. True when the job goes on (a first answer stored)."""
    if await s.diverged(job, ws):
        return False
    distance = await asyncio.to_thread(likeness, target, image)
    scale = await asyncio.to_thread(psnr_scale, target)
    meta = {"op": "invert", "psnr": round(psnr, 2), "steps": steps, "refined": refined, "warnings": warnings,
            "likeness": None if distance is None else round(distance, 3), "redo": {"op": "invert", "params": {}}}
    if encoder:
        meta["start"] = "encoder"
    latent = StoredLatent(ws.numpy(), s.G.model_id, meta=meta)
    # a refined face replaces its own first answer as the user's face, not a newer photo's (first answers come first)
    face = s.store.face_write(job.user_id, latent, job.job_id, replaces=job.job_id if encoder and steps else "")
    writes = [face, s.store.result_write(job.user_id, job.job_id, latent),
              s.store.crop_write(job.user_id, job.job_id, aligned_crop_bytes(target))]
    text = f"your face as the {s.G.model_id} model draws it"
    if encoder and not steps:
        text += ": a first guess, the encoder's in one pass" if first else ", by its encoder in one pass"
    elif encoder:
        text += f": the encoder's first guess refined by {steps} optimisation steps"
    if refined:
        text += f", refined {refined}x"
    text += f"\nhow close to your photo: {psnr:.1f} dB PSNR (higher is closer); {scale}"
    if distance is not None:  # dlib finds no face in a reconstruction that is not one (random models, 32 px)
        verdict = "the same person" if distance < 0.6 else "not quite you yet"
        text += f"; dlib's face check: {verdict} (distance {distance:.2f}, under 0.6 is a match)"
    text += "".join(f"\nnote: {w}" for w in warnings)
    if first:
        text += f"\nrefining it now ({refining} steps): this message will show the result"
    return await s.finish(job, text, media="image", shows="face", payload=png_bytes(image), writes=writes,
                          first=first) and first


def align_photo(photo: bytes | None, resolution: int):
    """The largest face of a job's photo, aligned at `resolution` (`engine.align.align`), or a refusal."""
    if not photo:
        raise StylebotError("the photo for this job has expired; send it again")
    try:
        img = Image.open(io.BytesIO(photo))
        img.load()
    except (UnidentifiedImageError, OSError):
        raise StylebotError("that file is not an image I can read; send a JPEG or PNG photo") from None
    return align(img, resolution)


def aligned_crop_bytes(image: np.ndarray) -> bytes:
    """The aligned crop kept for refines, as JPEG quality 95: a quarter of a PNG's bytes at 1024 px (221 against
    911 KiB, benchmarks/users.py), which is most of what a user costs in Redis; its error (about 40 dB PSNR) is far
    below what an inversion reaches (20-30 dB), so a refine's target is unchanged for practical purposes."""
    return jpeg_bytes(image, quality=95)
