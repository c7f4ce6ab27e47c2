"""/morph @a @b: two stored faces interpolated into a GIF, rendered `morph_chunk` frames between two ticks (so
neither the morph nor the optimisations wait for each other); refused at the moment it is stored if the other
person no longer shares."""

from __future__ import annotations

import asyncio

import torch

from engine.handlers.base import OnePass
from engine.morph import MorphRender, encode_gif
from engine.services import Services
from storage.latents import StoredLatent
from storage.records import Job


class Morph:
    async def prepare(self, job: Job, s: Services) -> OnePass | None:
        la = await s.latent(job, job.params["a"])
        lb = la and await s.latent(job, job.params["b"])
        if lb is None:
            return None
        render = MorphRender(s.G, torch.from_numpy(la.ws), torch.from_numpy(lb.ws), frames=_frames(job),
                             layers=job.params.get("layers", "all"), batch=s.settings.morph_chunk)
        return OnePass(lambda: render.video() if render.step() else None, at_once=False, context={"start": la})

    async def store(self, job: Job, s: Services, work: OnePass, video) -> None:
        gif = await asyncio.to_thread(encode_gif, video, max_bytes=s.settings.max_upload_bytes)
        meta = {"op": "morph", "frames": _frames(job), "redo": {"op": "morph", "params": job.params}}
        result = s.store.morph_write(job.user_id, job.job_id,
                                     StoredLatent(work.context["start"].ws, s.G.model_id, meta=meta))
        await s.finish(job, caption(_frames(job), len(video)), media="animation", shows="morph", payload=gif,
                       writes=[result], refusal=_unshared(job))


def caption(frames: int, looped: int) -> str:
    """What a morph's GIF holds: `frames` from one face to the other and, when it plays back too, `looped` in all."""
    return f"morph, {frames} frames" + (f" there and back ({looped} in the loop)" if looped > frames else "")


def _frames(job: Job) -> int:
    return int(job.params.get("frames", 24))


def _unshared(job: Job) -> str:
    """A morph's answer when the other person stops sharing before it is stored (checked in the same step)."""
    names = job.params.get("names", {})
    who = next((names.get(u, "the other person") for u in job.epochs if u != job.user_id), "the other person")
    return f"{who} no longer allows morphs with their face, so the morph was not kept"
