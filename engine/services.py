"""What an engine process holds and every job handler may use: the models, the queue and the latent store, the
settings, the jobs it has claimed, and the few steps every kind of job shares (find a stored latent, fail a job with
its reason, store a result and answer, guarded by the user's epoch). The loop (`engine.loop`) and the handlers
(`engine.handlers`) both work through one `Services`; neither reaches into the other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.edit import DEFAULT_EDIT_RECIPE, EDIT_RECIPES
from engine.invert import DEFAULT_RECIPE, RECIPES
from engine.latent_files import FAMILY_NAMES
from engine.registry import registry_entries
from storage.errors import no_face_yet
from storage.latents import LatentStore, StoredLatent
from storage.queue import JobQueue, Write
from storage.records import Job, ResultEvent

log = logging.getLogger("stylebot.engine")

SOMETHING_WENT_WRONG = "something went wrong on the engine with this one; please send it again"
DIVERGED = "the optimisation went wrong on this one (its numbers blew up); please send it again"


@dataclass(frozen=True)
class EngineSettings:
    name: str = ""                      # consumer name; default host:pid
    heartbeat_ttl_s: int = 15           # the bot says "engine offline" when no heartbeat is this fresh
    invert_steps: int | None = None     # override the recipe's steps (tests, CPUs)
    edit_steps: int | None = None       # override the edit recipe's steps
    refine_fraction: float = 0.5        # a refine runs this fraction of the recipe's steps more
    max_upload_bytes: int = 10 * 2**20  # GIFs shrink to fit (Discord's default upload limit)
    progress_every: int = 25            # steps between progress events
    preview_every: int = 100            # steps between low-resolution previews
    preview_size: int = 64              # preview side in pixels
    max_active: int = 8                 # optimisations in the pool at once
    drain_s: float = 30.0               # on stop, rows that end within this are finished, the others left
    precision: str = "fp32"             # "fp32" | "tf32" | "bf16", resolved (engine.device)
    compile: bool = False               # compile the generator at start-up (CUDA) for the pool's sizes
    morph_chunk: int = 4                # morph frames rendered between two ticks (= morph()'s batch)
    refine: bool = True                 # an /invert answered first by an encoder is then refined by the optimisation


class EncoderSlot:
    """The encoder of the engine's generator, for first answers: `get()` loads the file `find()` names (None: no
    encoder) and loads it again whenever that file changes, so that an encoder trained while the engine runs (tiny's,
    at the first start of `stylebot run`) is used from the next /invert on. A file that does not load is logged once
    and not used (the engine answers after the optimisation, as without an encoder). Thread-safe: first answers
    are prepared in threads."""

    def __init__(self, find: Callable[[], Path | None], load: Callable[[Path], object]):
        self.find, self.load = find, load
        self._stamp: tuple | None = None
        self._encoder = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """Whether the last `get()` had an encoder (no I/O: for the event loop)."""
        return self._encoder is not None

    def get(self):
        """The encoder (an `engine.encoders.EncoderCheckpoint`), or None. Blocking (a `stat`, and a load when the file
        changed): call it in a thread."""
        with self._lock:
            try:
                path = self.find()
                stamp = None if path is None else (str(path), path.stat().st_mtime_ns, path.stat().st_size)
            except Exception as e:  # noqa: BLE001 - a choice that names nothing usable (logged once): no encoder
                path, stamp = None, ("error", str(e))
                if stamp != self._stamp:
                    log.warning("no encoder for first answers: %s", e)
            if stamp != self._stamp:
                self._stamp, self._encoder = stamp, None
                if path is not None:
                    try:
                        self._encoder = self.load(path)
                        log.info("first answers by the encoder %s", path)
                    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: logged, not used
                        log.warning("the encoder %s is not used: %s", path, e)
            return self._encoder


class Services:
    """One engine process's parts (see the module's docstring)."""

    def __init__(self, G, queue: JobQueue, store: LatentStore, *, vgg, clip_factory: Callable | None = None,
                 encoder: EncoderSlot | None = None, settings: EngineSettings = EngineSettings()):
        self.G, self.queue, self.store, self.vgg = G, queue, store, vgg
        self.encoder = encoder or EncoderSlot(lambda: None, lambda path: None)  # first answers (none by default)
        self.settings = settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}"  # this process, as its heartbeat says
        self.name = settings.name or self.holder
        self.claimed: dict[str, Job] = {}   # every job this engine holds and has not answered yet
        entry = registry_entries().get(G.model_id)
        self.random_weights = bool(entry and entry.builtin)  # a built-in model: its faces look like nothing
        self._clip_factory, self._clip, self._clip_lock = clip_factory, None, asyncio.Lock()

    async def clip(self):
        """The CLIP of edits, loaded (in a thread) by the first edit that needs it, once."""
        async with self._clip_lock:
            if self._clip is None:
                self._clip = await asyncio.to_thread(self._clip_factory)
        return self._clip

    # -- answers -------------------------------------------------------------------------------------------------

    async def finish(self, job: Job, text: str, *, media: str, shows: str, payload: bytes, writes: list[Write] = (),
                     refusal: str = "", first: bool = False) -> bool:
        """Store `writes` and post the job's result (rerunnable), in one step guarded by the user's epoch (a user who
        said /forget meanwhile gets nothing stored and no answer): `media` says what `payload` is ("image" or
        "animation"), `shows` what it shows ("face", "edit" or "morph"); `refusal` is the answer instead when the
        other person of a morph stopped sharing. With `first`, a first answer: stored and posted the same way (once,
        however often the job runs), and the job goes on; the refined answer later stores under the same result id
        and its message updates the first one's in place. False when the user's data went meanwhile (the job is
        over)."""
        event = ResultEvent.done(job, text, media=media, shows=shows, result_id=job.job_id, model=self.G.model_id,
                                 engine=self.name, payload=payload, first=first)
        stored = await self.queue.finish(job, event, writes=writes, refusal=refusal)
        if stored < 0:
            log.info("job %s: its user's data went while it ran (they said /forget, or Redis lost its data); nothing "
                     "stored", job.job_id)
        if not first or stored < 0:
            self.claimed.pop(job.job_id, None)
        return stored >= 0

    async def fail(self, job: Job, reason: str) -> None:
        """Answer the job with a one-line reason and acknowledge it."""
        await self.queue.fail(job, reason, engine=self.name)
        self.claimed.pop(job.job_id, None)

    def let_go(self, job: Job) -> None:
        """Stop holding a job without answering it: it is no longer kept claimed, so another engine (or this one)
        takes it up again after the queue's idle time."""
        self.claimed.pop(job.job_id, None)

    async def diverged(self, job: Job, *latents) -> bool:
        """True (and the job failed with the reason) when an optimisation's result holds NaN or infinity."""
        if all(x is None or bool(torch.isfinite(torch.as_tensor(x)).all()) for x in latents):
            return False
        log.warning("job %s (%s): the optimisation diverged; nothing stored", job.job_id, job.op)
        await self.fail(job, DIVERGED)
        return True

    # -- what jobs start from ------------------------------------------------------------------------------------

    async def latent(self, job: Job, user_id: str, result_id: str | None = None) -> StoredLatent | None:
        """A stored latent usable with this engine's model, or None after failing the job with the reason."""
        lat = await (self.store.result(user_id, result_id) if result_id else self.store.face(user_id))
        who = "you" if user_id == job.user_id else job.params.get("names", {}).get(user_id, user_id)
        if lat is None:
            await self.fail(job, "that result has expired; react to a newer one" if result_id else no_face_yet(who))
            return None
        if not lat.finite:
            await self.fail(job, f"the stored face of {who} is damaged (it holds invalid numbers): "
                                 "send the photo again with /invert")
            return None
        if lat.model_id != self.G.model_id or lat.ws.shape != (self.G.num_ws, self.G.w_dim):
            family = FAMILY_NAMES.get(self.G.cfg.family, self.G.cfg.family)
            await self.fail(job, f"the face of {who} was made with model {lat.model_id}, the engine now runs "
                                 f"{self.G.model_id} ({family}): send the photo again with /invert")
            return None
        return lat

    def invert_steps(self) -> int:
        """An inversion's steps: `invert_steps` if set, else the default recipe's on this device (its CPU preset on
        a CPU)."""
        return self.settings.invert_steps or RECIPES[DEFAULT_RECIPE].steps_on(self.G.mapping.w_avg.device)

    def edit_steps(self) -> int:
        """An edit's steps: `edit_steps` if set, else the default edit recipe's."""
        return self.settings.edit_steps or EDIT_RECIPES[DEFAULT_EDIT_RECIPE].steps

    def refine_steps(self, op: str, restart: bool = False) -> int:
        """Steps of a refine: `refine_fraction` of the recipe's, or the whole recipe for a redo."""
        steps = self.invert_steps() if op == "invert" else self.edit_steps()
        return steps if restart else max(1, int(steps * self.settings.refine_fraction))
