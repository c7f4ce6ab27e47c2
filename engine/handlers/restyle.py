"""Stronger / weaker: an edit's result moved along its own edit, w0 + k (w - w0), in one forward pass (rendered as
soon as it is claimed, beside a running tick)."""

from __future__ import annotations

import torch

from engine.edit import restyle
from engine.handlers.base import OnePass
from engine.images import png_bytes
from engine.services import Services
from storage.latents import StoredLatent
from storage.records import Job


class Restyle:
    async def prepare(self, job: Job, s: Services) -> OnePass | None:
        lat = await s.latent(job, job.user_id, job.params["result_id"])
        if lat is None:
            return None
        if lat.w0 is None:
            await s.fail(job, "only edits can be made stronger or weaker")
            return None
        factor = float(job.params["factor"])
        return OnePass(lambda: restyle(s.G, torch.from_numpy(lat.w0), torch.from_numpy(lat.ws), factor),
                       context={"latent": lat, "strength": float(lat.meta.get("strength", 1.0)) * factor})

    async def store(self, job: Job, s: Services, work: OnePass, outcome) -> None:
        ws, images = outcome
        if await s.diverged(job, ws):
            return
        lat, strength = work.context["latent"], work.context["strength"]
        meta = dict(lat.meta, strength=round(strength, 3))
        result = s.store.result_write(job.user_id, job.job_id, StoredLatent(ws[0].numpy(), s.G.model_id, meta=meta,
                                                                            w0=lat.w0))
        await s.finish(job, f"{meta.get('prompt', 'edit')} x{strength:.2f} (edit strength)", media="image",
                       shows="edit", payload=png_bytes(images[0]), writes=[result])
