"""The engine worker (`stylebot engine`): a thin loop over the job queue.

The default scheduler is continuous batching: optimisations (invert, refine, edit) are rows of one
`OptimisationPool`; every tick runs one step for all of them in a thread, rows join as jobs are claimed and leave
as they finish (stored, acknowledged and posted at once); jobs are claimed during a tick too, a stronger / weaker
is rendered at once beside it, and a morph a few frames between ticks, so they never wait for an optimisation.
Whatever fails for one job (its photo, its latent, a loss that blows up) fails that job alone with its reason.
`scheduler = "static"` keeps the older loop (claim a batch, run each group of alike jobs to the end) for comparison.

Either way a job is acknowledged only after its result is stored, and `JobQueue.finish` stores it at most once, so
a job reclaimed after a crash is posted once; every job this engine holds stays claimed (touched) until then.
Several engines (one per GPU, any machines) share one queue through its consumer group with no other coordination.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.exceptions as redis
import torch
from PIL import Image, UnidentifiedImageError

from engine.align import align, likeness
from engine.errors import StylebotError
from engine.edit import DEFAULT_EDIT_RECIPE, EDIT_RECIPES, EditError, edit, restyle
from engine.invert import DEFAULT_RECIPE, RECIPES, invert
from engine.latents import FAMILY_NAMES
from engine.device import compile_synthesis, pool_sizes
from engine.morph import MorphRender, encode_gif, morph
from engine.registry import registry_entries
from storage.latents import LatentStore, StoredLatent
from storage.queue import JobQueue, Write
from storage.records import Job, ResultEvent

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
    scheduler: str = "continuous"       # "continuous" (a pool of rows, stepped together) | "static" (batch to end)
    max_active: int = 8                 # continuous: optimisations in the pool at once
    drain_s: float = 30.0               # continuous: on stop, rows that end within this are finished, others left
    precision: str = "fp32"             # continuous: "fp32" | "tf32" | "bf16", resolved (engine.device)
    compile: bool = False               # continuous: compile the generator at start-up (CUDA) for the pool's sizes
    morph_chunk: int = 4                # continuous: morph frames rendered between two ticks (= morph()'s batch)


def _process_gone(holder: str) -> bool:
    """Whether the process "host:pid" no longer runs; a process on another host cannot be checked: not gone."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


class Worker:
    def __init__(self, G, queue: JobQueue, store: LatentStore, *, vgg, clip_factory=None,
                 settings: WorkerSettings = WorkerSettings()):
        self.G, self.queue, self.store, self.vgg = G, queue, store, vgg
        self.clip_factory, self._clip = clip_factory, None
        self.settings = settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}"  # this process, as its heartbeat says
        self.name = settings.name or self.holder
        entry = registry_entries().get(G.model_id)
        self.random_weights = bool(entry and entry.builtin)  # a built-in model: its faces look like nothing
        self.loop: asyncio.AbstractEventLoop | None = None
        self.claimed: dict[str, Job] = {}   # every job this engine holds and has not answered yet
        # look for engines whose heartbeat expired (their jobs are taken at once) a few times per heartbeat TTL
        queue.takeover_every_s = min(queue.takeover_every_s, settings.heartbeat_ttl_s / 6)

    async def heartbeat(self) -> None:
        await self.queue.beat(self.name, self.G.model_id, self.settings.heartbeat_ttl_s, self.holder,
                              random_weights=self.random_weights)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: claim, run, store, acknowledge (see the module's docstring for the two schedulers)."""
        self.loop = asyncio.get_running_loop()
        if not await self._wait_for_redis(stop):
            return
        holder = await self.queue.engine_holder(self.name)
        if holder and holder != self.holder and not _process_gone(holder):
            raise StylebotError(f"an engine called {self.name} is running ({holder}); start this one with another "
                                "--name")
        # the first claim takes up the jobs still pending under this name: a process of the same name that died
        # (restarted by its supervisor) is resumed at once, not after its heartbeat expires
        log.info("engine %s serving %s (%s scheduler)", self.name, self.G.model_id, self.settings.scheduler)
        if self.settings.scheduler == "continuous":
            await ContinuousLoop(self).run(stop)
        else:
            await self._run_static(stop)
        try:
            await self.queue.leave(self.name)
        except redis.RedisError as e:  # stopping while Redis is away: the heartbeat expires on its own
            log.warning("could not say goodbye to Redis (%s)", e)

    async def _wait_for_redis(self, stop: asyncio.Event) -> bool:
        """Create the queue's groups, waiting for Redis as long as it takes (backoff 1 s doubling to 30 s, a log
        line per try); False when told to stop first."""
        delay = 1.0
        while not stop.is_set():
            attempt = asyncio.create_task(self.queue.ensure_groups())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([attempt, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not attempt.done():  # told to stop while the client was still retrying
                attempt.cancel()
                return False
            try:
                attempt.result()
                return True
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("Redis is not answering (%s); trying again in %.0f s", e, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(30.0, delay * 2)
        return False

    async def _run_static(self, stop: asyncio.Event) -> None:
        """Claim a batch, run each group of alike jobs to its end; a batch in flight is finished before returning."""
        while not stop.is_set():
            try:
                await self.heartbeat()
                jobs, exhausted = await self.queue.claim(self.name, self.settings.batch_size, block_ms=500)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:  # Redis away or refusing
                log.warning("Redis did not serve the claim (%s); retrying", e)
                await asyncio.sleep(1)
                continue
            for job in exhausted:
                await self._fail(job, given_up(job))
            self.claimed.update((job.job_id, job) for job in jobs)  # all kept claimed until answered
            for group in group_jobs(jobs):
                beat = asyncio.create_task(self._beat_while_busy())
                try:
                    await self.run_group(group)
                finally:
                    beat.cancel()

    async def _finish(self, job: Job, text: str, *, media: str, shows: str, payload: bytes, writes: list[Write] = (),
                      refusal: str = "") -> None:
        """Store `writes` and post a result (the job's, rerunnable), in one step guarded by the user's epoch (a user
        who said /forget meanwhile gets nothing stored and no answer): `media` says what `payload` is ("image" or
        "animation"), `shows` what it shows ("face", "edit" or "morph"); `refusal` is the answer instead when the
        other person of a morph stopped sharing."""
        event = ResultEvent.done(job, text, media=media, shows=shows, result_id=job.job_id, model=self.G.model_id,
                                 engine=self.name, payload=payload)
        stored = await self.queue.finish(job, event, writes=writes, refusal=refusal)
        if stored < 0:
            log.info("job %s: its user said /forget while it ran; nothing stored", job.job_id)
        self.claimed.pop(job.job_id, None)

    async def _fail(self, job: Job, reason: str) -> None:
        await self.queue.fail(job, reason, engine=self.name)
        self.claimed.pop(job.job_id, None)

    async def _beat_while_busy(self) -> None:
        """Heartbeat, and keep every job of the batch that is not answered yet claimed (their idle time reset),
        the ones waiting behind the running group too, so that no other engine takes them over meanwhile."""
        while True:
            await asyncio.sleep(min(self.settings.heartbeat_ttl_s, self.queue.reclaim_idle_ms / 1000) / 3)
            await self.heartbeat()
            await self.queue.touch(self.name, list(self.claimed.values()))

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
            for job in jobs:
                if self.claimed.pop(job.job_id, None) is not None:  # unanswered: no longer kept claimed
                    await self.queue.strike(job)

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
                asyncio.run_coroutine_threadsafe(self.queue.progress(job, step, total, preview=_jpeg(image, size),
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
                                            self._invert_steps())
        result = await asyncio.to_thread(invert, self.G, self.vgg, targets, steps=self._invert_steps(),
                                         progress=progress, preview=preview, preview_every=self.settings.preview_every,
                                         precision=self.settings.precision)
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
        writes = [self.store.face_write(job.user_id, latent), self.store.result_write(job.user_id, job.job_id, latent),
                  self.store.crop_write(job.user_id, job.job_id, _crop(target))]
        text = f"your face as the {self.G.model_id} model draws it"
        if refined:
            text += f", refined {refined}x"
        text += f"\nhow close to your photo: {psnr:.1f} dB PSNR (higher is closer)"
        if distance is not None:  # dlib finds no face in a reconstruction that is not one (random models, 32 px)
            verdict = "the same person" if distance < 0.6 else "not quite you yet"
            text += f"; dlib's face check: {verdict} (distance {distance:.2f}, under 0.6 is a match)"
        text += "".join(f"\nnote: {w}" for w in warnings)
        await self._finish(job, text, media="image", shows="face", payload=_png(image), writes=writes)

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

    async def _morph(self, job: Job, video: np.ndarray | None = None) -> None:
        """A morph rendered (or its frames `video`, rendered already between ticks), encoded and stored."""
        a, b = job.params["a"], job.params["b"]
        la = await self._latent(job, a)
        lb = la and await self._latent(job, b)
        if lb is None:
            return
        frames = int(job.params.get("frames", 24))
        if video is None:
            video = await asyncio.to_thread(morph, self.G, torch.from_numpy(la.ws), torch.from_numpy(lb.ws),
                                            frames=frames, layers=job.params.get("layers", "all"))
        gif = await asyncio.to_thread(encode_gif, video, max_bytes=self.settings.max_upload_bytes)
        meta = {"op": "morph", "frames": frames, "redo": {"op": "morph", "params": job.params}}
        result = self.store.morph_write(job.user_id, job.job_id, StoredLatent(la.ws, self.G.model_id, meta=meta))
        await self._finish(job, f"morph, {frames} frames", media="animation", shows="morph", payload=gif,
                           writes=[result], refusal=_unshared(job))

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
                                            self.settings.edit_steps or EDIT_RECIPES[DEFAULT_EDIT_RECIPE].steps)
        try:
            result = await asyncio.to_thread(edit, self.G, self._clip, w0, prompts, steps=self.settings.edit_steps,
                                             progress=progress, preview=preview,
                                             preview_every=self.settings.preview_every,
                                             precision=self.settings.precision)
        except EditError as e:  # this engine's CLIP cannot run the recipe (it says why): every edit gets that line
            for job, _ in ready:
                await self._fail(job, str(e))
            return
        for i, (job, _) in enumerate(ready):
            await self._store_edit(job, result.ws[i], result.w0[i], result.images[i], edit_meta(prompts[i]),
                                   f"edited: {prompts[i]}")

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
        result = self.store.result_write(job.user_id, job.job_id, StoredLatent(ws[0].numpy(), self.G.model_id,
                                                                               meta=meta, w0=lat.w0))
        await self._finish(job, f"{meta.get('prompt', 'edit')} x{strength:.2f} (edit strength)", media="image",
                           shows="edit", payload=_png(images[0]), writes=[result])

    async def _refine_start(self, job: Job) -> tuple[StoredLatent, np.ndarray | None] | None:
        """What a refine goes on from: the stored result and, for an inversion, its aligned crop at this model's
        resolution; None after failing the job with the reason."""
        restart, result_id = bool(job.params.get("restart")), job.params["result_id"]
        if restart:  # a redo of an inversion: from scratch, on whatever model the engine runs now
            lat = await self.store.result(job.user_id, result_id)
            if lat is None:
                await self._fail(job, "that result has expired; send the photo again with /invert")
                return None
        else:
            lat = await self._latent(job, job.user_id, result_id)
            if lat is None:
                return None
        if lat.meta.get("op") == "edit" and lat.w0 is not None:
            return lat, None
        if lat.meta.get("op") != "invert":
            await self._fail(job, "only faces and edits can be refined")
            return None
        crop = await self.store.aligned_crop(job.user_id, result_id)
        if crop is None:
            await self._fail(job, "the face behind that result has expired; send the photo again with /invert")
            return None
        target = Image.open(io.BytesIO(crop)).convert("RGB")
        res = self.G.img_resolution
        if target.size != (res, res):  # the same FFHQ crop, at this model's resolution
            target = target.resize((res, res), Image.LANCZOS)
        return lat, np.asarray(target)

    def _invert_steps(self) -> int:
        """An inversion's steps: `invert_steps` if set, else the default recipe's on this device (its CPU preset on
        a CPU)."""
        return self.settings.invert_steps or RECIPES[DEFAULT_RECIPE].steps_on(self.G.mapping.w_avg.device)

    def _refine_steps(self, op: str, restart: bool = False) -> int:
        """Steps of a refine: half the recipe's (`refine_fraction`), or the whole recipe for a redo."""
        if op == "invert":
            steps = self._invert_steps()
            return steps if restart else max(1, int(steps * self.settings.refine_fraction))
        edit_steps = self.settings.edit_steps or EDIT_RECIPES[DEFAULT_EDIT_RECIPE].steps
        return max(1, int(edit_steps * self.settings.refine_fraction))

    async def _store_edit(self, job: Job, ws: torch.Tensor, w0: torch.Tensor, image: np.ndarray, meta: dict,
                          text: str) -> None:
        """An edit's result: a rerunnable result (with its start latent, for stronger / weaker) and the reply."""
        if await self._diverged(job, ws):
            return
        result = self.store.result_write(job.user_id, job.job_id, StoredLatent(ws.numpy(), self.G.model_id,
                                                                               meta=meta, w0=w0.numpy()))
        await self._finish(job, text, media="image", shows="edit", payload=_png(image), writes=[result])

    async def _refine(self, job: Job) -> None:
        """More optimisation steps for an inversion (against its kept aligned crop) or an edit (same prompt)."""
        restart = bool(job.params.get("restart"))
        start = await self._refine_start(job)
        if start is None:
            return
        lat, target = start
        if target is not None:
            steps = self._refine_steps("invert", restart)
            progress, preview = self._reporters([job], steps)
            result = await asyncio.to_thread(
                invert, self.G, self.vgg, target[None], steps=steps,
                init_ws=None if restart else torch.from_numpy(lat.ws)[None],
                progress=progress, preview=preview, preview_every=self.settings.preview_every,
                precision=self.settings.precision)
            ctx = refined_face(lat, restart, steps)
            await self._store_face(job, target, result.ws[0], result.images[0], result.psnr[0], ctx["steps"],
                                   ctx["warnings"], ctx["refined"])
        else:
            if self._clip is None:
                self._clip = await asyncio.to_thread(self.clip_factory)
            steps = self._refine_steps("edit")
            prompt = lat.meta["prompt"]
            progress, preview = self._reporters([job], steps)
            try:
                result = await asyncio.to_thread(edit, self.G, self._clip, torch.from_numpy(lat.w0)[None], [prompt],
                                                 steps=steps, init_ws=torch.from_numpy(lat.ws)[None],
                                                 progress=progress, preview=preview,
                                                 preview_every=self.settings.preview_every,
                                                 precision=self.settings.precision)
            except EditError as e:
                await self._fail(job, str(e))
                return
            meta = dict(lat.meta, refined=int(lat.meta.get("refined", 0)) + 1)
            await self._store_edit(job, result.ws[0], torch.from_numpy(lat.w0), result.images[0], meta,
                                   f"edited: {prompt} (refined {meta['refined']}x)")


def refined_face(lat: StoredLatent, restart: bool, steps: int) -> dict:
    """What a refined (or, with `restart`, redone) face reports: its total steps, refine count and photo warnings."""
    return {"steps": int(lat.meta.get("steps", 0)) * (not restart) + steps, "warnings": lat.meta.get("warnings", []),
            "refined": 0 if restart else int(lat.meta.get("refined", 0)) + 1}


def edit_meta(prompt: str) -> dict:
    """What a new edit's result keeps: its prompt (for refines), strength 1, and how to redo it."""
    return {"op": "edit", "prompt": prompt, "strength": 1.0, "redo": {"op": "edit", "params": {"prompt": prompt}}}


def given_up(job: Job) -> str:
    """The answer to a job handed out more than `max_deliveries` times: its own fault only if it raised."""
    if job.strikes:
        return "this job failed on the engine several times; try another photo or prompt"
    return "the engine restarted while working on this; please send it again"


def _unshared(job: Job) -> str:
    """A morph's answer when the other person stops sharing before it is stored (checked in the same step)."""
    names = job.params.get("names", {})
    who = next((names.get(u, "the other person") for u in job.epochs if u != job.user_id), "the other person")
    return f"{who} no longer allows morphs with their face, so the morph was not kept"


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


def _crop(image: np.ndarray) -> bytes:
    """The aligned crop kept for refines, as JPEG quality 95: a quarter of a PNG's bytes at 1024 px (221 against
    911 KiB, benchmarks/users.py), which is most of what a user costs in Redis; its error (about 40 dB PSNR) is far
    below what an inversion reaches (20-30 dB), so a refine's target is unchanged for practical purposes."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()



ONE_PASS = ("restyle", "morph")     # jobs that never join the pool: restyles beside a tick, morphs between ticks


class ContinuousLoop:
    """The continuous-batching scheduler of one `Worker` (see the module's docstring)."""

    def __init__(self, worker: Worker):
        from engine.scheduler import OptimisationPool

        self.w, s = worker, worker.settings
        self.pool = OptimisationPool(worker.G, vgg=worker.vgg, clip=worker._clip, preview_every=s.preview_every,
                                     precision=s.precision)
        self.backlog: deque[Job] = deque()  # claimed optimisations waiting for a row
        self.context: dict[str, dict] = {}  # job id -> what storing its result needs
        self.tick_s: float | None = None    # moving average of a tick's duration: the ETA's step time
        self.last_claim = 0.0
        self.storing: set[asyncio.Task] = set()  # finished rows being stored while the others tick on
        self.forgotten: set[str] = set()    # job ids whose users said /forget: dropped before the next tick
        self.morphs: dict[str, tuple] = {}  # job id -> (job, MorphRender): morphs rendered a chunk between ticks
        self.aligning: dict[str, tuple[Job, asyncio.Task]] = {}  # inversions whose photo is aligned beside the ticks

    async def run(self, stop: asyncio.Event) -> None:
        s = self.w.settings
        if s.compile:  # before the first heartbeat: the engine is online once no job would pay for compiling
            self.pool.synthesis = await asyncio.to_thread(compile_synthesis, self.w.G, pool_sizes(s.max_active),
                                                          s.precision)
        keeper = asyncio.create_task(self._keep_claimed())
        try:
            while not stop.is_set():
                try:
                    await self._claim()
                    await self._cancel_forgotten()
                    await self._admit()
                    if len(self.pool):
                        await self._tick_claiming()
                    elif self.aligning:  # nothing to tick: wait for a photo to be aligned (or new jobs, shortly)
                        await asyncio.wait([t for _, t in self.aligning.values()], timeout=0.05)
                    if self.morphs:  # the oldest morph's next frames, ahead of the next tick
                        await self._one_pass(next(iter(self.morphs.values()))[0])
                except (redis.ConnectionError, redis.TimeoutError) as e:  # Redis restarting: jobs stay claimed
                    log.warning("Redis is not answering (%s); retrying", e)
                    await asyncio.sleep(1)
                except redis.ResponseError:  # Redis refused a command (out of memory, a damaged key): the engine
                    log.exception("Redis refused a command; going on")  # stays up, the jobs stay claimed
                    await asyncio.sleep(1)
            for job_id in self.morphs:  # morphs still rendering are left unacknowledged for another engine
                self.w.claimed.pop(job_id, None)
            await self._drain()
        finally:
            await asyncio.gather(*self.storing, return_exceptions=True)
            keeper.cancel()

    async def _keep_claimed(self) -> None:
        """Heartbeat, and keep every job this engine holds claimed (waiting or running), so none is taken over."""
        w = self.w
        while True:
            try:
                await w.heartbeat()
                held = list(w.claimed.values())
                await w.queue.touch(w.name, held)
                self.forgotten.update(j.job_id for j, ok in zip(held, await w.queue.wanted(held)) if not ok)
            except redis.RedisError as e:
                log.warning("heartbeat failed (%s)", e)
            await asyncio.sleep(min(w.settings.heartbeat_ttl_s, w.queue.reclaim_idle_ms / 1000) / 3)

    async def _claim(self) -> None:
        """Take new jobs while there is room (at most every 0.1 s while busy); run one-pass jobs at once."""
        w, s = self.w, self.w.settings
        room = s.max_active - len(self.pool) - len(self.backlog) - len(self.aligning)
        if room <= 0:  # full: still take one at a time (up to max_active waiting), so that a stronger / weaker
            room = 1 if len(self.backlog) < s.max_active else 0  # behind queued inversions is not stuck there
        busy = len(self.pool) > 0 or bool(self.morphs) or bool(self.aligning)
        if busy and time.monotonic() - self.last_claim < 0.1:
            return
        self.last_claim = time.monotonic()  # room 0: only the jobs of engines found dead (`JobQueue.claim`)
        jobs, exhausted = await w.queue.claim(w.name, room, block_ms=None if busy or not room else 500)
        for job in exhausted:
            await w._fail(job, given_up(job))
        for job in jobs:
            w.claimed[job.job_id] = job
        for job in jobs:
            if job.op in ONE_PASS:
                await self._one_pass(job)
            else:
                self._wait(job)

    def _wait(self, job: Job) -> None:
        """Into the backlog in the order the jobs were sent: a job taken over from a dead engine (older than the
        ones just claimed) gets the next free row."""
        i = len(self.backlog)
        while i > 0 and self.backlog[i - 1].created > job.created:
            i -= 1
        self.backlog.insert(i, job)

    async def _cancel_forgotten(self) -> None:
        """Jobs whose users said /forget leave the pool and the backlog unanswered (nothing of theirs is stored)."""
        if not self.forgotten:
            return
        gone, self.forgotten = self.forgotten, set()
        for job_id in gone:
            job = self.w.claimed.pop(job_id, None)
            if job is None:
                continue
            self.pool.drop(job)
            if job in self.backlog:
                self.backlog.remove(job)
            if job_id in self.aligning:
                self.aligning.pop(job_id)[1].cancel()
            self.context.pop(job_id, None)
            await self.w.queue.drop(job)
            log.info("job %s: its user said /forget; stopped", job_id)

    async def _one_pass(self, job: Job, video: np.ndarray | None = None) -> None:
        """stronger / weaker at once; a morph in steps between ticks (called by `_claim`, then by `run`): its
        latents checked, then `morph_chunk` frames rendered per call, then, with its `video`, encoded and stored in
        a task beside the next ticks (`Worker._morph`). Each fails its job alone; a job let go meanwhile stops."""
        w = self.w
        try:
            if job.job_id not in w.claimed:  # its user said /forget
                self.morphs.pop(job.job_id, None)
            elif job.op == "restyle":
                await w._restyle(job)
            elif video is not None:
                await w._morph(job, video=video)
            elif job.job_id in self.morphs:
                render = self.morphs[job.job_id][1]
                if await asyncio.to_thread(render.step):
                    del self.morphs[job.job_id]
                    task = asyncio.create_task(self._one_pass(job, render.video()))
                    self.storing.add(task)
                    task.add_done_callback(self.storing.discard)
            else:
                la = await w._latent(job, job.params["a"])
                lb = la and await w._latent(job, job.params["b"])
                if lb is not None:
                    self.morphs[job.job_id] = (job, MorphRender(
                        w.G, torch.from_numpy(la.ws), torch.from_numpy(lb.ws), frames=int(job.params.get("frames", 24)),
                        layers=job.params.get("layers", "all"), batch=w.settings.morph_chunk))
        except (redis.ConnectionError, redis.TimeoutError):
            if video is None:
                raise
            log.exception("storing the morph %s failed; it is left for a retry", job.job_id)
            w.claimed.pop(job.job_id, None)  # nothing was acknowledged: reclaimed and rerun
        except Exception:  # noqa: BLE001 - this job's problem, not the engine's
            self.morphs.pop(job.job_id, None)
            log.exception("%s job %s failed", job.op, job.job_id)
            await w._fail(job, "something went wrong on the engine with this one; please send it again")

    async def _admit(self) -> None:
        """Backlog jobs into the pool while it has room; each one's preparation fails it alone. A photo is aligned
        in a task beside the ticks (dlib takes a good part of a second on a CPU: the rows in flight do not wait for
        it), and its row joins at the first tick after."""
        for job_id, (job, task) in list(self.aligning.items()):
            if task.done():
                del self.aligning[job_id]
                await self._guarded(job, self._join_aligned(job, task))
        while self.backlog and len(self.pool) + len(self.aligning) < self.w.settings.max_active:
            job = self.backlog.popleft()
            if job.op == "invert":
                self.aligning[job.job_id] = (job, asyncio.create_task(self._align(job)))
            else:
                await self._guarded(job, self._prepare(job))

    async def _guarded(self, job: Job, preparing) -> None:
        """Await a job's preparation: what fails there fails that job alone (Redis away: it waits its turn)."""
        try:
            await preparing
        except (redis.ConnectionError, redis.TimeoutError):
            self.backlog.appendleft(job)
            raise
        except StylebotError as e:
            await self.w._fail(job, str(e))
        except Exception:  # noqa: BLE001 - this job's problem, not the engine's
            log.exception("%s job %s could not start", job.op, job.job_id)
            await self.w._fail(job, "something went wrong on the engine with this one; please send it again")

    async def _align(self, job: Job):
        return await asyncio.to_thread(_align_photo, await self.w.queue.photo(job), self.w.G.img_resolution)

    async def _join_aligned(self, job: Job, task: asyncio.Task) -> None:
        face = task.result()
        if job.job_id not in self.w.claimed:  # let go meanwhile
            return
        steps = self.w._invert_steps()
        self.pool.add_inversion(job, face.image, steps=steps)
        self.context[job.job_id] = {"target": face.image, "steps": steps, "warnings": face.warnings}
        await self.w.queue.progress(job, 0, steps)  # "started": no longer "waiting behind N"

    async def _clip(self):
        w = self.w
        if w._clip is None:
            w._clip = await asyncio.to_thread(w.clip_factory)
        self.pool.clip = w._clip

    async def _prepare(self, job: Job) -> None:
        """Turn a claimed optimisation into a row (or fail it with the reason)."""
        w, s = self.w, self.w.settings
        if job.op == "edit":
            lat = await w._latent(job, job.user_id, job.params.get("result_id"))
            if lat is None:
                return
            await self._clip()
            prompt = job.params["prompt"]
            steps = s.edit_steps or EDIT_RECIPES[DEFAULT_EDIT_RECIPE].steps
            self.pool.add_edit(job, torch.from_numpy(lat.ws), prompt, steps=steps)
            self.context[job.job_id] = {"meta": edit_meta(prompt), "text": f"edited: {prompt}"}
        elif job.op == "refine":
            restart = bool(job.params.get("restart"))
            start = await w._refine_start(job)
            if start is None:
                return
            lat, target = start
            if target is not None:
                steps = w._refine_steps("invert", restart)
                self.pool.add_inversion(job, target, steps=steps,
                                        init_ws=None if restart else torch.from_numpy(lat.ws))
                self.context[job.job_id] = {"target": target, **refined_face(lat, restart, steps)}
            else:
                await self._clip()
                meta = dict(lat.meta, refined=int(lat.meta.get("refined", 0)) + 1)
                self.pool.add_edit(job, torch.from_numpy(lat.w0), meta["prompt"], steps=w._refine_steps("edit"),
                                   init_ws=torch.from_numpy(lat.ws))
                self.context[job.job_id] = {"meta": meta, "text": f"edited: {meta['prompt']} "
                                                                  f"(refined {meta['refined']}x)"}
        else:
            await w._fail(job, f"unknown operation {job.op!r}")
            return
        await w.queue.progress(job, 0, self.pool.rows[-1].total)  # "started": no longer "waiting behind N"

    async def _tick_claiming(self) -> None:
        """A tick, while new jobs are claimed beside it (every 0.1 s): a stronger / weaker claimed meanwhile is
        rendered at once in its own thread, not after the tick (a tick of a big model on a CPU takes seconds).
        Optimisations claimed meanwhile wait in the backlog; the pool changes only between ticks."""
        tick = asyncio.create_task(self._tick())
        try:
            while not tick.done():
                await asyncio.wait([tick], timeout=0.1)
                if not tick.done():
                    await self._claim()
        except BaseException:  # Redis away while claiming: nothing touches the pool before its tick is over
            await asyncio.wait([tick])
            raise
        await tick

    async def _tick(self) -> None:
        """One step of every row (in a thread), then progress, previews, and the rows that finished."""
        w, s = self.w, self.w.settings
        started = time.monotonic()
        try:
            report = await asyncio.to_thread(self.pool.tick)
        except Exception:  # noqa: BLE001 - the shared step broke (a bug, out of memory): the jobs go back
            log.exception("a tick of %d rows failed; their jobs are left for a retry", len(self.pool))
            for row in list(self.pool.rows):
                self.pool.drop(row.key)
                w.claimed.pop(row.key.job_id, None)  # no longer touched: reclaimed after reclaim_idle_s
                await w.queue.strike(row.key)  # raised here: counted against it (one of them is the cause)
            return
        took = time.monotonic() - started
        self.tick_s = took if self.tick_s is None else 0.8 * self.tick_s + 0.2 * took
        for job, step, total, _ in report.progress:
            if step % s.progress_every == 0 and step < total:
                await w.queue.progress(job, step, total, eta_s=self.tick_s * (total - step))
        for job, step, total, image in report.previews:
            await w.queue.progress(job, step, total, preview=_jpeg(image, s.preview_size),
                                   eta_s=self.tick_s * (total - step))
        for done in report.finished:  # stored beside the next ticks: the likeness check, PNGs, Redis writes
            task = asyncio.create_task(self._store(done))
            self.storing.add(task)
            task.add_done_callback(self.storing.discard)

    async def _store(self, done) -> None:
        """A row that left the pool: its result stored, acknowledged and posted (or its failure). If storing
        breaks (Redis gone), the job is let go unacknowledged, so that it is run again rather than lost."""
        try:
            await self._store_result(done)
        except Exception:  # noqa: BLE001 - nothing was acknowledged: the job will be reclaimed and rerun
            log.exception("storing the result of %s failed; it is left for a retry", done.key.job_id)
            self.w.claimed.pop(done.key.job_id, None)

    async def _store_result(self, done) -> None:
        job, ctx = done.key, self.context.pop(done.key.job_id, {})
        if done.error:
            await self.w._fail(job, done.error)
            return
        await self.w.queue.progress(job, done.steps, done.steps)  # the last step, just before the result
        if done.kind == "invert":
            await self.w._store_face(job, ctx["target"], done.ws, done.image, done.psnr, ctx["steps"],
                                     ctx["warnings"], ctx.get("refined", 0))
        else:
            await self.w._store_edit(job, done.ws, done.w0, done.image, ctx["meta"], ctx["text"])

    async def _drain(self) -> None:
        """Stopping: rows that end within `drain_s` (at the measured tick rate) are finished; the rest, and the
        backlog, are left unacknowledged for another engine (reclaimed after `reclaim_idle_s`)."""
        w, deadline = self.w, time.monotonic() + self.w.settings.drain_s
        step_s = self.tick_s or 0.0
        for job in list(self.backlog):
            w.claimed.pop(job.job_id, None)
        self.backlog.clear()
        for job, task in self.aligning.values():
            task.cancel()
            w.claimed.pop(job.job_id, None)
        self.aligning.clear()
        for row in list(self.pool.rows):
            if step_s * (row.total - row.step) > w.settings.drain_s:
                self.pool.drop(row.key)
                w.claimed.pop(row.key.job_id, None)
        if len(self.pool):
            log.info("finishing %d job(s) before stopping", len(self.pool))
        while len(self.pool) and time.monotonic() < deadline:
            await self._tick()
        for row in list(self.pool.rows):
            self.pool.drop(row.key)
            w.claimed.pop(row.key.job_id, None)


def _jpeg(image: np.ndarray, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.BILINEAR).save(buf, "JPEG", quality=80)
    return buf.getvalue()
