"""/edit <prompt>: StyleCLIP's latent optimisation of the user's face (or of a result) toward the prompt, a row of the
pool; stored as a rerunnable result that keeps its start latent (for stronger / weaker)."""

from __future__ import annotations

import numpy as np
import torch

from engine.handlers.base import Rows
from engine.images import png_bytes
from engine.pool import Finished
from engine.services import Services
from storage.latents import StoredLatent
from storage.records import Job


class Edit:
    async def prepare(self, job: Job, s: Services) -> Rows | None:
        lat = await s.latent(job, job.user_id, job.params.get("result_id"))
        if lat is None:
            return None
        clip, prompt, steps = await s.clip(), job.params["prompt"], s.edit_steps()
        return Rows(lambda pool: pool.add_edit(job, torch.from_numpy(lat.ws), prompt, steps=steps, clip=clip),
                    {"meta": edit_meta(prompt), "text": f"edited: {prompt}"})

    async def store(self, job: Job, s: Services, work: Rows, done: Finished) -> None:
        await store_edit(s, job, done.ws, done.w0, done.image, work.context["meta"], work.context["text"])


def edit_meta(prompt: str) -> dict:
    """What a new edit's result keeps: its prompt (for refines), strength 1, and how to redo it."""
    return {"op": "edit", "prompt": prompt, "strength": 1.0, "redo": {"op": "edit", "params": {"prompt": prompt}}}


async def store_edit(s: Services, job: Job, ws: torch.Tensor, w0: torch.Tensor, image: np.ndarray, meta: dict,
                     text: str) -> None:
    """An edit's result: a rerunnable result (with its start latent, for stronger / weaker) and the reply."""
    if await s.diverged(job, ws):
        return
    result = s.store.result_write(job.user_id, job.job_id, StoredLatent(ws.numpy(), s.G.model_id, meta=meta,
                                                                        w0=w0.numpy()))
    await s.finish(job, text, media="image", shows="edit", payload=png_bytes(image), writes=[result])
