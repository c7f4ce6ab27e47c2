"""A refine (more optimisation steps for a face, against its kept aligned crop, or for an edit, toward the same
prompt) and a redo of an inversion (`restart`: the whole recipe again from the crop, on the model the engine runs
now): a row of the pool that goes on from the stored result."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from engine.handlers.base import Rows
from engine.handlers.edit import store_edit
from engine.handlers.invert import store_face
from engine.pool import Finished
from engine.services import Services
from storage.latents import StoredLatent
from storage.records import Job


class Refine:
    async def prepare(self, job: Job, s: Services) -> Rows | None:
        restart = bool(job.params.get("restart"))
        start = await _start(job, s, restart)
        if start is None:
            return None
        lat, target = start
        if target is not None:
            steps = s.refine_steps("invert", restart)
            init_ws = None if restart else torch.from_numpy(lat.ws)
            return Rows(lambda pool: pool.add_inversion(job, target, steps=steps, init_ws=init_ws),
                        {"target": target, **refined_face(lat, restart, steps)})
        clip, steps = await s.clip(), s.refine_steps("edit")
        meta = dict(lat.meta, refined=int(lat.meta.get("refined", 0)) + 1)
        return Rows(lambda pool: pool.add_edit(job, torch.from_numpy(lat.w0), meta["prompt"], steps=steps,
                                               init_ws=torch.from_numpy(lat.ws), clip=clip),
                    {"meta": meta, "text": f"edited: {meta['prompt']} (refined {meta['refined']}x)"})

    async def store(self, job: Job, s: Services, work: Rows, done: Finished) -> None:
        ctx = work.context
        if done.kind == "invert":
            await store_face(s, job, ctx["target"], done.ws, done.image, done.psnr, ctx["steps"], ctx["warnings"],
                             ctx["refined"])
        else:
            await store_edit(s, job, done.ws, done.w0, done.image, ctx["meta"], ctx["text"])


def refined_face(lat: StoredLatent, restart: bool, steps: int) -> dict:
    """What a refined (or, with `restart`, redone) face reports: its total steps, refine count and photo warnings."""
    return {"steps": int(lat.meta.get("steps", 0)) * (not restart) + steps, "warnings": lat.meta.get("warnings", []),
            "refined": 0 if restart else int(lat.meta.get("refined", 0)) + 1}


async def _start(job: Job, s: Services, restart: bool) -> tuple[StoredLatent, np.ndarray | None] | None:
    """What a refine goes on from: the stored result and, for an inversion, its aligned crop at this model's
    resolution; None after failing the job with the reason."""
    result_id = job.params["result_id"]
    if restart:  # a redo of an inversion: from scratch, on whatever model the engine runs now
        lat = await s.store.result(job.user_id, result_id)
        if lat is None:
            await s.fail(job, "that result has expired; send the photo again with /invert")
            return None
    else:
        lat = await s.latent(job, job.user_id, result_id)
        if lat is None:
            return None
    if lat.meta.get("op") == "edit" and lat.w0 is not None:
        return lat, None
    if lat.meta.get("op") != "invert":
        await s.fail(job, "only faces and edits can be refined")
        return None
    crop = await s.store.aligned_crop(job.user_id, result_id)
    if crop is None:
        await s.fail(job, "the face behind that result has expired; send the photo again with /invert")
        return None
    target = Image.open(io.BytesIO(crop)).convert("RGB")
    res = s.G.img_resolution
    if target.size != (res, res):  # the same FFHQ crop, at this model's resolution
        target = target.resize((res, res), Image.LANCZOS)
    return lat, np.asarray(target)
