"""The engine worker (`stylebot engine`): a thin loop over the job queue.

Claim a batch, group jobs that can share a forward pass (same operation and settings), run them in a thread (so the
heartbeat keeps beating), store each result, then acknowledge it: a job is acknowledged only after its result is
stored, and `JobQueue.finish` stores it at most once, so a job reclaimed after a crash is posted once.
Several engines (one per GPU, any machines) share one queue through its consumer group with no other coordination.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.align import align, likeness
from engine.errors import StylebotError
from engine.edit import EDIT_RECIPES, edit, restyle
from engine.invert import RECIPES, invert
from engine.latents import FAMILY_NAMES
from engine.morph import encode_gif, morph
from storage.latents import LatentStore, StoredLatent
from storage.queue import Job, JobQueue

log = logging.getLogger("stylebot.engine")


@dataclass(frozen=True)
class WorkerSettings:
    name: str = ""                      # consumer name; default host:pid
    batch_size: int = 8                 # jobs claimed at once
    heartbeat_ttl_s: int = 15           # the bot says "engine offline" when no heartbeat is this fresh
    invert_steps: int | None = None     # override the recipe's steps (tests, CPUs)
    edit_steps: int | None = None       # override the edit recipe's steps
    refine_fraction: float = 0.5        # a refine runs this fraction of the recipe's steps more
    max_upload_bytes: int = 10 * 2**20  # GIFs shrink to fit (Discord's default upload limit)
    progress_every: int = 25            # steps between progress events
    preview_every: int = 100            # steps between low-resolution previews
    preview_size: int = 64              # preview side in pixels


class Worker:
    def __init__(self, G, queue: JobQueue, store: LatentStore, *, vgg, clip_factory=None,
                 settings: WorkerSettings = WorkerSettings()):
        self.G, self.queue, self.store, self.vgg = G, queue, store, vgg
        self.clip_factory, self._clip = clip_factory, None
        self.settings = settings
        self.name = settings.name or f"{socket.gethostname()}:{os.getpid()}"
        self.loop: asyncio.AbstractEventLoop | None = None

    async def heartbeat(self) -> None:
        await self.queue.r.set(self.queue.keys.heartbeat(self.name),
                               f"{self.G.model_id} {time.time():.0f}", ex=self.settings.heartbeat_ttl_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: claim, run, store, acknowledge. A batch in flight is finished before returning."""
        self.loop = asyncio.get_running_loop()
        await self.queue.ensure_groups()
        log.info("engine %s serving %s", self.name, self.G.model_id)
        while not stop.is_set():
            await self.heartbeat()
            jobs, exhausted = await self.queue.claim(self.name, self.settings.batch_size, block_ms=500)
            for job in exhausted:
                await self._fail(job, "this job failed on the engine several times; try another photo or prompt")
            for group in group_jobs(jobs):
                beat = asyncio.create_task(self._beat_while_busy(group))
                try:
                    await self.run_group(group)
                finally:
                    beat.cancel()
        await self.queue.r.delete(self.queue.keys.heartbeat(self.name))

    async def _finish(self, job: Job, event: dict, payload: bytes = b"") -> None:
        """Store and post a result: `event["result_kind"]` says what it shows ("face", "edit" or "morph")."""
        await self.queue.finish(job, {"model": self.G.model_id, **event}, payload=payload, engine=self.name)

    async def _fail(self, job: Job, reason: str) -> None:
        await self.queue.fail(job, reason, engine=self.name)

    async def _beat_while_busy(self, jobs: list[Job]) -> None:
        """Heartbeat, and keep this batch's jobs claimed (their idle time reset) while they run."""
        while True:
            await asyncio.sleep(min(self.settings.heartbeat_ttl_s, self.queue.reclaim_idle_ms / 1000) / 3)
            await self.heartbeat()
            await self.queue.touch(self.name, jobs)

    async def run_group(self, jobs: list[Job]) -> None:
        op = jobs[0].op
        try:
            if op == "invert":
                await self._invert(jobs)
            elif op == "morph":
                for job in jobs:
                    await self._morph(job)
            elif op == "edit":
                await self._edit(jobs)
            elif op == "restyle":
                for job in jobs:
                    await self._restyle(job)
            elif op == "refine":
                for job in jobs:
                    await self._refine(job)
            else:
                for job in jobs:
                    await self._fail(job, f"unknown operation {op!r}")
        except Exception:  # noqa: BLE001 - a bug must not take the engine down; the job is retried, then failed
            log.exception("%s batch of %d failed; leaving it for a retry", op, len(jobs))

    def _reporters(self, jobs: list[Job], total: int):
        """(progress, preview) callbacks for an optimisation over `jobs`: progress every `progress_every` steps and
        previews every `preview_every`, each with the seconds left at the step rate measured since it started."""
        every, size = self.settings.progress_every, self.settings.preview_size
        started = time.monotonic()
        for job in jobs:  # "started": the status message stops saying "waiting"
            asyncio.run_coroutine_threadsafe(self.queue.progress(job, 0, total), self.loop)

        def eta(step: int, total: int) -> float:
            return (time.monotonic() - started) / max(step, 1) * (total - step)

        def progress(step: int, total: int, losses: list[float]) -> None:
            if step % every == 0 or step == total:
                for job in jobs:
                    asyncio.run_coroutine_threadsafe(self.queue.progress(job, step, total, eta_s=eta(step, total)),
                                                     self.loop)

        def preview(step: int, images: np.ndarray) -> None:
            for job, image in zip(jobs, images):
                small = Image.fromarray(image).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                small.save(buf, "JPEG", quality=80)
                asyncio.run_coroutine_threadsafe(self.queue.progress(job, step, total, preview=buf.getvalue(),
                                                                     eta_s=eta(step, total)), self.loop)
        return progress, preview

    async def _invert(self, jobs: list[Job]) -> None:
        ready: list[tuple[Job, Any]] = []
        for job in jobs:
            photo = await self.queue.photo(job)
            try:
                face = await asyncio.to_thread(_align_photo, photo, self.G.img_resolution)
            except StylebotError as e:
                await self._fail(job, str(e))
                continue
            ready.append((job, face))
        if not ready:
            return
        targets = np.stack([face.image for _, face in ready])
        progress, preview = self._reporters([j for j, _ in ready],
                                            self.settings.invert_steps or RECIPES["default"].steps)
        result = await asyncio.to_thread(invert, self.G, self.vgg, targets, steps=self.settings.invert_steps,
                                         progress=progress, preview=preview, preview_every=self.settings.preview_every)
        for i, (job, face) in enumerate(ready):
            await self._store_face(job, face.image, result.ws[i], result.images[i], result.psnr[i], result.steps,
                                   face.warnings)

    async def _store_face(self, job: Job, target: np.ndarray, ws: torch.Tensor, image: np.ndarray, psnr: float,
                          steps: int, warnings: list[str], refined: int = 0) -> None:
        """An inversion's result: the user's face, a rerunnable result with its aligned crop, the reply."""
        if await self._diverged(job, ws):
            return
        distance = await asyncio.to_thread(likeness, target, image)
        meta = {"op": "invert", "psnr": round(psnr, 2), "steps": steps, "refined": refined, "warnings": warnings,
                "likeness": None if distance is None else round(distance, 3), "redo": {"op": "invert", "params": {}}}
        latent = StoredLatent(ws.numpy(), self.G.model_id, meta=meta)
        await self.store.set_face(job.user_id, latent)
        await self.store.set_result(job.user_id, job.job_id, latent)
        await self.queue.r.set(self.queue.keys.target(job.user_id, job.job_id), _png(target),
                               ex=self.store.result_ttl_s)
        text = f"your face as the {self.G.model_id} model draws it"
        if refined:
            text += f", refined {refined}x"
        text += f"\nhow close to your photo: {psnr:.1f} dB PSNR (higher is closer)"
        if distance is not None:  # dlib finds no face in a reconstruction that is not one (random models, 32 px)
            verdict = "the same person" if distance < 0.6 else "not quite you yet"
            text += f"; dlib's face check: {verdict} (distance {distance:.2f}, under 0.6 is a match)"
        text += "".join(f"\nnote: {w}" for w in warnings)
        await self._finish(job, {"text": text, "kind": "image", "result_id": job.job_id, "result_kind": "face"},
                           payload=_png(image))

    async def _diverged(self, job: Job, *latents) -> bool:
        """True (and the job failed with the reason) when an optimisation's result holds NaN or infinity."""
        if all(x is None or bool(torch.isfinite(torch.as_tensor(x)).all()) for x in latents):
            return False
        log.warning("job %s (%s): the optimisation diverged; nothing stored", job.job_id, job.op)
        await self._fail(job, "the optimisation went wrong on this one (its numbers blew up); please send it again")
        return True

    async def _latent(self, job: Job, user_id: str, result_id: str | None = None) -> StoredLatent | None:
        """A stored latent usable with this engine's model, or None after failing the job with the reason."""
        lat = await (self.store.result(user_id, result_id) if result_id else self.store.face(user_id))
        who = "you" if user_id == job.user_id else job.params.get("names", {}).get(user_id, user_id)
        if lat is None:
            await self._fail(job, "that result has expired; react to a newer one" if result_id else
                                  f"there is no face for {who} yet: send a photo with /invert first")
            return None
        if not lat.finite:
            await self._fail(job, f"the stored face of {who} is damaged (it holds invalid numbers): "
                                  "send the photo again with /invert")
            return None
        if lat.model_id != self.G.model_id or lat.ws.shape != (self.G.num_ws, self.G.w_dim):
            family = FAMILY_NAMES.get(self.G.cfg.family, self.G.cfg.family)
            await self._fail(job, f"the face of {who} was made with model {lat.model_id}, the engine now runs "
                                       f"{self.G.model_id} ({family}): send the photo again with /invert")
            return None
        return lat

    async def _morph(self, job: Job) -> None:
        a, b = job.params["a"], job.params["b"]
        la = await self._latent(job, a)
        lb = la and await self._latent(job, b)
        if lb is None:
            return
        frames = int(job.params.get("frames", 24))
        video = await asyncio.to_thread(morph, self.G, torch.from_numpy(la.ws), torch.from_numpy(lb.ws),
                                        frames=frames, layers=job.params.get("layers", "all"))
        gif = await asyncio.to_thread(encode_gif, video, max_bytes=self.settings.max_upload_bytes)
        meta = {"op": "morph", "frames": frames, "redo": {"op": "morph", "params": job.params}}
        await self.store.set_result(job.user_id, job.job_id, StoredLatent(la.ws, self.G.model_id, meta=meta))
        await self._finish(job, {"text": f"morph, {frames} frames", "kind": "animation", "result_id": job.job_id,
                                 "result_kind": "morph"}, payload=gif)

    async def _edit(self, jobs: list[Job]) -> None:
        if self._clip is None:
            self._clip = await asyncio.to_thread(self.clip_factory)
        ready = []
        for job in jobs:
            lat = await self._latent(job, job.user_id, job.params.get("result_id"))
            if lat is not None:
                ready.append((job, lat))
        if not ready:
            return
        w0 = torch.from_numpy(np.stack([lat.ws for _, lat in ready]))
        prompts = [job.params["prompt"] for job, _ in ready]
        progress, preview = self._reporters([j for j, _ in ready],
                                            self.settings.edit_steps or EDIT_RECIPES["default"].steps)
        result = await asyncio.to_thread(edit, self.G, self._clip, w0, prompts, steps=self.settings.edit_steps,
                                         progress=progress, preview=preview, preview_every=self.settings.preview_every)
        for i, (job, _) in enumerate(ready):
            if await self._diverged(job, result.ws[i]):
                continue
            meta = {"op": "edit", "prompt": prompts[i], "strength": 1.0,
                    "redo": {"op": "edit", "params": {"prompt": prompts[i]}}}
            await self.store.set_result(job.user_id, job.job_id, StoredLatent(result.ws[i].numpy(), self.G.model_id,
                                                                              meta=meta, w0=result.w0[i].numpy()))
            await self._finish(job, {"text": f"edited: {prompts[i]}", "kind": "image", "result_id": job.job_id,
                                     "result_kind": "edit"}, payload=_png(result.images[i]))

    async def _restyle(self, job: Job) -> None:
        lat = await self._latent(job, job.user_id, job.params["result_id"])
        if lat is None:
            return
        if lat.w0 is None:
            await self._fail(job, "only edits can be made stronger or weaker")
            return
        strength = float(lat.meta.get("strength", 1.0)) * float(job.params["factor"])
        ws, images = await asyncio.to_thread(restyle, self.G, torch.from_numpy(lat.w0),
                                             torch.from_numpy(lat.ws), float(job.params["factor"]))
        if await self._diverged(job, ws):
            return
        meta = dict(lat.meta, strength=round(strength, 3))
        await self.store.set_result(job.user_id, job.job_id, StoredLatent(ws[0].numpy(), self.G.model_id, meta=meta,
                                                                          w0=lat.w0))
        await self._finish(job, {"text": f"{meta.get('prompt', 'edit')} x{strength:.2f} (edit strength)",
                                 "kind": "image", "result_id": job.job_id, "result_kind": "edit"},
                           payload=_png(images[0]))

    async def _refine(self, job: Job) -> None:
        """More optimisation steps for an inversion (against its kept aligned crop) or an edit (same prompt)."""
        restart = bool(job.params.get("restart"))
        result_id = job.params["result_id"]
        if restart:  # a redo of an inversion: from scratch, on whatever model the engine runs now
            lat = await self.store.result(job.user_id, result_id)
            if lat is None:
                await self._fail(job, "that result has expired; send the photo again with /invert")
                return
        else:
            lat = await self._latent(job, job.user_id, result_id)
            if lat is None:
                return
        op = lat.meta.get("op")
        if op == "invert":
            png = await self.queue.r.get(self.queue.keys.target(job.user_id, result_id))
            if png is None:
                await self._fail(job, "the face behind that result has expired; send the photo again with /invert")
                return
            target = Image.open(io.BytesIO(png)).convert("RGB")
            res = self.G.img_resolution
            if target.size != (res, res):  # the same FFHQ crop, at this model's resolution
                target = target.resize((res, res), Image.LANCZOS)
            target = np.asarray(target)
            steps = self.settings.invert_steps or RECIPES["default"].steps
            if not restart:
                steps = max(1, int(steps * self.settings.refine_fraction))
            progress, preview = self._reporters([job], steps)
            result = await asyncio.to_thread(
                invert, self.G, self.vgg, target[None], steps=steps,
                init_ws=None if restart else torch.from_numpy(lat.ws)[None],
                progress=progress, preview=preview, preview_every=self.settings.preview_every)
            refined = 0 if restart else int(lat.meta.get("refined", 0)) + 1
            await self._store_face(job, target, result.ws[0], result.images[0], result.psnr[0],
                                   int(lat.meta.get("steps", 0)) * (not restart) + steps, lat.meta.get("warnings", []),
                                   refined)
        elif op == "edit" and lat.w0 is not None:
            if self._clip is None:
                self._clip = await asyncio.to_thread(self.clip_factory)
            steps = max(1, int((self.settings.edit_steps or EDIT_RECIPES["default"].steps)
                               * self.settings.refine_fraction))
            prompt = lat.meta["prompt"]
            progress, preview = self._reporters([job], steps)
            result = await asyncio.to_thread(edit, self.G, self._clip, torch.from_numpy(lat.w0)[None], [prompt],
                                             steps=steps, init_ws=torch.from_numpy(lat.ws)[None],
                                             progress=progress, preview=preview,
                                             preview_every=self.settings.preview_every)
            if await self._diverged(job, result.ws):
                return
            meta = dict(lat.meta, refined=int(lat.meta.get("refined", 0)) + 1)
            await self.store.set_result(job.user_id, job.job_id, StoredLatent(result.ws[0].numpy(), self.G.model_id,
                                                                              meta=meta, w0=lat.w0))
            await self._finish(job, {"text": f"edited: {prompt} (refined {meta['refined']}x)", "kind": "image",
                                     "result_id": job.job_id, "result_kind": "edit"}, payload=_png(result.images[0]))
        else:
            await self._fail(job, "only faces and edits can be refined")


def group_jobs(jobs: list[Job]) -> list[list[Job]]:
    """Jobs that can share one forward/backward pass: same operation and same settings."""
    groups: dict[tuple, list[Job]] = defaultdict(list)
    for job in jobs:
        key = (job.op, tuple(sorted((k, str(v)) for k, v in job.params.items() if k not in ("prompt", "a", "b"))))
        groups[key].append(job)
    return list(groups.values())


def _align_photo(photo: bytes | None, resolution: int):
    if not photo:
        raise StylebotError("the photo for this job has expired; send it again")
    try:
        img = Image.open(io.BytesIO(photo))
        img.load()
    except (UnidentifiedImageError, OSError):
        raise StylebotError("that file is not an image I can read; send a JPEG or PNG photo") from None
    return align(img, resolution)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "PNG")
    return buf.getvalue()

