"""The engine (`stylebot engine`): continuous batching over the job queue. One step of the loop:

    claim    take new jobs while there is room (every 0.1 s during a tick too), in the order they were sent
    forget   jobs whose users said /forget leave, unanswered, nothing of theirs stored
    admit    each claimed job is prepared by its handler beside the ticks (a photo aligned, a latent read); prepared
             optimisations join the pool between two ticks while it has room; a stronger / weaker renders at once
    tick     one optimisation step of every row of the pool, in a thread (`OptimisationPool.tick`)
    retire   rows that finished are stored, acknowledged and posted beside the next ticks
    render   a part of the oldest long one-pass job (a morph's frames) between two ticks
    ... and on stop, drain: rows that end within `drain_s` finish, every other job is left for another engine.

This module decides only *when*; *what* each kind of job does is its handler's (`engine.handlers`, found by the
job's op). Whatever fails for one job (its photo, its latent, a loss that blows up) fails that job alone with its
reason. A job is acknowledged only after its result is stored, and `JobQueue.finish` stores it at most once, so a job
reclaimed after a crash is posted once; every job this engine holds stays claimed (touched) until then. Several
engines (one per GPU, any machines) share one queue through its consumer group with no other coordination.

An engine that dies is charged to no job that was merely held: the jobs that were running beside others become
suspects, run again together with nothing else beside them, and each alone if they die again; only a death (or a
raise) while a job ran alone counts against it, and a job is failed after `storage.queue.FAULTS_TO_FAIL` such faults.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque

import redis.exceptions as redis

from engine.device import compile_synthesis, pool_sizes
from storage.errors import StylebotError
from engine.handlers import HANDLERS, OnePass, Rows, Work
from engine.images import jpeg_bytes
from engine.pool import Finished, OptimisationPool
from engine.services import SOMETHING_WENT_WRONG, EngineSettings, Services
from storage.latents import LatentStore
from storage.queue import JobQueue
from storage.records import Job

log = logging.getLogger("stylebot.engine")

HOLD_ANSWERED = 2  # answered first and waiting for a row: at most this many per row of the pool are held, not claimed
FIRST_ANSWER_WAIT_S = 2.0  # the longest a tick waits for the photos being prepared for a first answer


class Engine:
    """One engine process's loop (see the module's docstring)."""

    def __init__(self, G, queue: JobQueue, store: LatentStore, *, vgg, clip_factory=None, encoder=None,
                 settings: EngineSettings = EngineSettings()):
        self.s = Services(G, queue, store, vgg=vgg, clip_factory=clip_factory, encoder=encoder, settings=settings)
        self.pool = OptimisationPool(G, vgg=vgg, preview_every=settings.preview_every, precision=settings.precision)
        self.backlog: deque[Job] = deque()   # claimed, to be prepared
        self.suspects: deque[Job] = deque()  # claimed, running beside others when an engine died: run apart
        self.isolated: dict[str, Job] = {}   # the suspects running now, with nothing else beside them
        self.preparing: dict[str, tuple[Job, asyncio.Task]] = {}  # job id -> its handler's prepare, beside the ticks
        self.joining: list[tuple[Job, Rows]] = []  # prepared optimisations waiting for room, oldest job first
        self.rows: dict[str, tuple[Job, Rows]] = {}  # job id -> the work of its row in the pool
        self.passes: dict[str, tuple[Job, OnePass]] = {}  # long one-pass renders: a part between two ticks
        self.storing: set[asyncio.Task] = set()  # results being stored while the ticks go on
        self.forgotten: set[str] = set()     # job ids whose users said /forget: dropped before the next tick
        self.tick_s: float | None = None     # moving average of a tick's duration: the ETA's step time
        self.last_claim = 0.0
        # look for engines whose heartbeat expired (their jobs are taken at once) a few times per heartbeat TTL
        queue.takeover_every_s = min(queue.takeover_every_s, settings.heartbeat_ttl_s / 6)

    @property
    def name(self) -> str:
        return self.s.name

    @property
    def claimed(self) -> dict[str, Job]:
        return self.s.claimed

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: claim, prepare, tick, store; then drain, and return within `drain_s` of `stop` (and
        0.1 s to say goodbye) whatever Redis does: what is not done by then is left for a retry."""
        s = self.s
        if not await self._wait_for_redis(stop):
            return
        holder = await s.queue.engine_holder(s.name)
        if holder and holder != s.holder and not _process_gone(holder):
            raise StylebotError(f"an engine called {s.name} is running ({holder}); start this one with another "
                                "--name")
        # the first claim takes up the jobs still pending under this name: a process of the same name that died
        # (restarted by its supervisor) is resumed at once, not after its heartbeat expires
        log.info("engine %s serving %s", s.name, s.G.model_id)
        if s.settings.compile:  # before the first heartbeat: the engine is online once no job would pay for compiling
            self.pool.synthesis = await asyncio.to_thread(compile_synthesis, s.G, pool_sizes(s.settings.max_active),
                                                          s.settings.precision)
        keeper = asyncio.create_task(self._keep_claimed())
        serving = asyncio.create_task(self._serve(stop))
        try:
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            deadline = time.monotonic() + s.settings.drain_s  # whatever Redis does, the engine stops by then
            done, _ = await asyncio.wait([serving], timeout=s.settings.drain_s)
            if not done:
                log.warning("the loop did not stop within drain_s (Redis not answering?); its jobs are left")
            if self.storing:
                _, late = await asyncio.wait(self.storing, timeout=max(0.0, deadline - time.monotonic()))
                if late:
                    log.warning("%d result(s) not stored within drain_s are left for a retry", len(late))
            if done:
                serving.result()  # what the loop raised, if it did
        finally:
            for task in (serving, keeper, *self.storing):
                task.cancel()
            await asyncio.gather(serving, keeper, *self.storing, return_exceptions=True)
        try:  # 0.1 s at least to say goodbye: a healthy Redis answers in milliseconds
            await asyncio.wait_for(s.queue.leave(s.name), max(0.1, deadline - time.monotonic()))
        except (redis.RedisError, asyncio.TimeoutError) as e:  # Redis away: the heartbeat expires on its own
            log.warning("could not say goodbye to Redis (%r)", e)

    async def _serve(self, stop: asyncio.Event) -> None:
        """Claim, prepare, tick and store until `stop` is set, then drain."""
        while not stop.is_set():
            try:
                await self._step()
            except (redis.ConnectionError, redis.TimeoutError) as e:  # Redis restarting: jobs stay claimed
                log.warning("Redis is not answering (%s); retrying", e)
                await asyncio.sleep(1)
            except redis.ResponseError:  # Redis refused a command (out of memory, a damaged key): the engine
                log.exception("Redis refused a command; going on")  # stays up, the jobs stay claimed
                await asyncio.sleep(1)
        await self._drain()

    async def _step(self) -> None:
        await self._claim()
        await self._cancel_forgotten()
        await self._admit()
        await self._join()
        if len(self.pool):
            await self._first_answers_first()
            await self._tick_beside()
        elif self.preparing:  # nothing to tick: wait for a preparation (or new jobs, shortly)
            await asyncio.wait([t for _, t in self.preparing.values()], timeout=0.05)
        if self.passes:
            await self._render_part()

    # -- claim and admit -----------------------------------------------------------------------------------------

    async def _claim(self) -> None:
        """Take new jobs while there is room (at most every 0.1 s while busy). Jobs answered first (an encoder's face)
        that wait for a row do not count against the room, up to `HOLD_ANSWERED` per row of the pool, so that a new
        photo's first answer comes whatever the refinements queued before it."""
        s, max_active = self.s, self.s.settings.max_active
        held = sum(1 for _, work in self.joining if work.answered)
        waiting = len(self.backlog) + len(self.suspects) + len(self.preparing) + len(self.joining) - held
        room = max_active - len(self.pool) - waiting
        if room <= 0:  # full: still take one at a time (up to max_active waiting), so that a stronger / weaker
            room = 1 if waiting < max_active else 0  # behind queued inversions is not stuck there
        if held >= HOLD_ANSWERED * max_active:
            room = 0
        busy = bool(len(self.pool) or self.passes or self.preparing or self.joining)
        if busy and time.monotonic() - self.last_claim < 0.1:
            return
        self.last_claim = time.monotonic()  # room 0: only the jobs of engines found dead (`JobQueue.claim`)
        jobs, exhausted = await s.queue.claim(s.name, room, block_ms=None if busy or not room else 500)
        for job in exhausted:
            await s.fail(job, given_up(job))
        for job in jobs:
            if job.job_id in s.claimed:  # handed out again to this engine (its idle time ran out before the keeper
                continue                 # touched it, on a busy CPU): it is here already, not a second job
            s.claimed[job.job_id] = job
            self.backlog.append(job)

    async def _admit(self) -> None:
        """Start preparing claimed jobs (beside the ticks, up to `max_active` at once, in the order claimed); take in
        the preparations that ended: an optimisation waits to join the pool, a render at once starts, a long render
        waits for its parts between ticks.

        Suspects (jobs running beside others when an engine died) run apart: once nothing else runs, those suspected
        once run together (a kill from outside costs one pool's time), a job suspected again runs alone, and other
        jobs wait, claimed but not started, until they are answered. A job is marked running from its preparation to
        its answer, except while it waits, prepared, for a row: an engine that dies leaves the marks, and only the
        jobs marked are judged for it (`lua.JUDGE`)."""
        s = self.s
        self.isolated = {k: j for k, j in self.isolated.items() if k in s.claimed}  # answered or let go: done
        for job in [j for j in self.backlog if j.suspect]:
            self.backlog.remove(job)
            self.suspects.append(job)
        start: list[Job] = []
        if not self.isolated and not self.suspects:  # at most max_active preparations at once: a job not started
            while self.backlog and len(self.preparing) + len(start) < s.settings.max_active:  # is no suspect
                start.append(self.backlog.popleft())
        elif not self.isolated and self._quiet():
            if self.suspects[0].suspect > 1:
                start = [self.suspects[0]]
            else:
                start = [j for j in self.suspects if j.suspect == 1][:s.settings.max_active]
            self.isolated = {j.job_id: j for j in start}
            self.suspects = deque(j for j in self.suspects if j.job_id not in self.isolated)
            log.info("%d job(s) running when an engine died: running %s", len(start),
                     "it alone" if len(start) == 1 else "them with nothing else beside them")
        if start:
            await s.queue.running(start, alone=self._alone(start[0]))
        for job in start:
            self.preparing[job.job_id] = (job, asyncio.create_task(self._prepare(job)))
        held: list[Job] = []
        for job_id, (job, task) in list(self.preparing.items()):
            if not task.done():
                continue
            del self.preparing[job_id]
            if task.exception() is not None:  # Redis away: prepared again once it answers
                log.warning("job %s could not be prepared (%s); trying again", job_id, task.exception())
                self.backlog.append(job)
                self.isolated.pop(job_id, None)  # a suspect: it waits to run apart again
                continue
            work = task.result()
            if work is None or job_id not in self.s.claimed:  # answered with a refusal, or let go meanwhile
                continue
            if isinstance(work, Rows):  # a job taken over from a dead engine (older) gets the next free row
                at = next((i for i, (j, _) in enumerate(self.joining) if j.created > job.created), len(self.joining))
                self.joining.insert(at, (job, work))
                if job_id not in self.isolated:
                    held.append(job)
            elif work.at_once:
                self._beside(self._render_at_once(job, work))
            else:
                self.passes[job_id] = (job, work)
        await s.queue.idle(held)

    def _alone(self, job: Job) -> bool:
        """Whether `job` runs with nothing beside it: the only suspect running apart."""
        return list(self.isolated) == [job.job_id]

    def _quiet(self) -> bool:
        """Nothing runs: no row, preparation, render or result being stored."""
        return not (len(self.pool) or self.preparing or self.passes or self.storing)

    async def _prepare(self, job: Job) -> Work | None:
        """The job's handler's preparation; what fails there fails that job alone (Redis away: raised, to retry)."""
        handler = HANDLERS.get(job.op)
        try:
            if handler is None:
                await self.s.fail(job, f"unknown operation {job.op!r}")
                return None
            return await handler.prepare(job, self.s)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as e:  # noqa: BLE001 - this job's problem, not the engine's
            await self._refuse(job, e, "could not start")
        return None

    async def _refuse(self, job: Job, error: Exception, what: str) -> None:
        """Fail a job over what its own work raised: a `StylebotError` with its message, anything else (logged with
        its traceback, as `what` went wrong) with a line that says the engine went wrong."""
        if isinstance(error, StylebotError):
            await self.s.fail(job, str(error))
            return
        log.error("%s job %s %s", job.op, job.job_id, what, exc_info=error)
        await self.s.fail(job, SOMETHING_WENT_WRONG)

    async def _join(self) -> None:
        """Prepared optimisations into the pool while it has room (only between ticks)."""
        while self.joining and len(self.pool) < self.s.settings.max_active:
            if self.isolated or self.suspects:  # only the suspects running apart join
                at = next((i for i, (j, _) in enumerate(self.joining) if j.job_id in self.isolated), None)
                if at is None:
                    return
                job, work = self.joining.pop(at)
            else:
                job, work = self.joining.pop(0)
            await self.s.queue.running([job], alone=self._alone(job))
            try:
                work.join(self.pool)
            except Exception as e:  # noqa: BLE001 - e.g. a CLIP that cannot run the edit recipe
                await self._refuse(job, e, "could not join the pool")
                continue
            self.rows[job.job_id] = (job, work)
            await self.s.queue.progress(job, 0, self.pool.rows[-1].total)  # "started": no longer "waiting"

    async def _cancel_forgotten(self) -> None:
        """Jobs whose users said /forget leave wherever they are, unanswered (nothing of theirs is stored)."""
        gone, self.forgotten = self.forgotten, set()
        for job_id in gone:
            job = self.s.claimed.pop(job_id, None)
            if job is None:
                continue
            self.pool.drop(job)
            self.rows.pop(job_id, None)
            self.passes.pop(job_id, None)
            for waiting in (self.backlog, self.suspects):
                if job in waiting:
                    waiting.remove(job)
            if job_id in self.preparing:
                self.preparing.pop(job_id)[1].cancel()
            self.joining = [(j, w) for j, w in self.joining if j is not job]
            await self.s.queue.drop(job)
            log.info("job %s: its user's data is gone (they said /forget, or Redis lost its data); stopped", job_id)

    # -- tick and retire -----------------------------------------------------------------------------------------

    async def _first_answers_first(self) -> None:
        """First answers come first: while photos are being prepared for one (aligned, encoded, rendered), the next
        tick waits for them, up to FIRST_ANSWER_WAIT_S (on 2 cores a tick beside them slowed a first answer from
        0.24 to 0.43 s at the 95th percentile on tiny: benchmarks/load.py --encoder). Claims go on meanwhile."""
        photos = [task for job, task in self.preparing.values() if job.op == "invert"]
        if not photos or not self.s.encoder.ready:
            return
        deadline = time.monotonic() + FIRST_ANSWER_WAIT_S
        while photos and time.monotonic() < deadline:
            await asyncio.wait(photos, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            await self._claim()
            await self._admit()
            photos = [task for job, task in self.preparing.values() if job.op == "invert"]

    async def _tick_beside(self) -> None:
        """A tick, while new jobs are claimed and prepared beside it (every 0.1 s): a stronger / weaker claimed
        meanwhile is rendered at once in its own thread, not after the tick (a tick of a big model on a CPU takes
        seconds). The pool itself changes only between ticks."""
        tick = asyncio.create_task(self._tick())
        try:
            while not tick.done():
                await asyncio.wait([tick], timeout=0.1)
                if not tick.done():
                    await self._claim()
                    await self._admit()
        except BaseException:  # Redis away while claiming: nothing touches the pool before its tick is over
            await asyncio.wait([tick])
            raise
        await tick

    async def _tick(self) -> None:
        """One step of every row (in a thread); the rows that finished go to be stored (first: Redis failing while
        progress is sent must not lose them), then progress and previews."""
        s, settings = self.s, self.s.settings
        started = time.monotonic()
        try:
            report = await asyncio.to_thread(self.pool.tick)
        except Exception:  # noqa: BLE001 - the shared step broke (a bug, out of memory): the jobs go back
            log.exception("a tick of %d rows failed; their jobs are left for a retry", len(self.pool))
            for row in list(self.pool.rows):  # run alone, its own fault; beside others, each a suspect, run apart
                await s.queue.raised(row.key, alone=self._alone(row.key))
                self._leave(row.key)  # no longer touched: reclaimed after reclaim_idle_s
            return
        took = time.monotonic() - started
        self.tick_s = took if self.tick_s is None else 0.8 * self.tick_s + 0.2 * took
        for done in report.finished:  # stored beside the next ticks: the likeness check, PNGs, Redis writes
            job, work = self.rows.pop(done.key.job_id)
            self._beside(self._store(job, work, done))
        for job, step, total, _ in report.progress:
            if step % settings.progress_every == 0 and step < total:
                await s.queue.progress(job, step, total, eta_s=self.tick_s * (total - step))
        for job, step, total, image in report.previews:
            await s.queue.progress(job, step, total, preview=jpeg_bytes(image, quality=80, size=settings.preview_size),
                                   eta_s=self.tick_s * (total - step))

    async def _render_at_once(self, job: Job, work: OnePass) -> None:
        try:
            outcome = None
            while outcome is None:
                outcome = await asyncio.to_thread(work.render)
        except Exception:  # noqa: BLE001 - this job's problem, not the engine's
            log.exception("%s job %s failed", job.op, job.job_id)
            await self.s.fail(job, SOMETHING_WENT_WRONG)
            return
        await self._store(job, work, outcome)

    async def _render_part(self) -> None:
        """The next part of the oldest long render; stored beside the next ticks once whole."""
        job, work = next(iter(self.passes.values()))
        try:
            outcome = await asyncio.to_thread(work.render)
        except Exception:  # noqa: BLE001 - this job's problem, not the engine's
            del self.passes[job.job_id]
            log.exception("%s job %s failed", job.op, job.job_id)
            await self.s.fail(job, SOMETHING_WENT_WRONG)
            return
        if outcome is not None:
            del self.passes[job.job_id]
            self._beside(self._store(job, work, outcome))

    async def _store(self, job: Job, work: Work, outcome) -> None:
        """A finished job's result stored, acknowledged and posted by its handler (or its failure). If Redis breaks
        meanwhile, the job is let go unacknowledged, so that it is run again rather than lost."""
        s = self.s
        if job.job_id not in s.claimed:  # its user said /forget meanwhile
            return
        try:
            if isinstance(outcome, Finished):
                if outcome.error:
                    await s.fail(job, outcome.error)
                    return
                await s.queue.progress(job, outcome.steps, outcome.steps)  # the last step, just before the result
            await HANDLERS[job.op].store(job, s, work, outcome)
        except (redis.ConnectionError, redis.TimeoutError):
            log.exception("storing the result of %s failed; it is left for a retry", job.job_id)
            s.let_go(job)
        except Exception:  # noqa: BLE001 - this job's problem, not the engine's
            log.exception("storing the result of %s job %s failed", job.op, job.job_id)
            try:
                await s.fail(job, SOMETHING_WENT_WRONG)
            except redis.RedisError:
                s.let_go(job)

    def _beside(self, coro) -> None:
        """Run `coro` as a task beside the loop, awaited before the engine stops."""
        task = asyncio.create_task(coro)
        self.storing.add(task)
        task.add_done_callback(self.storing.discard)

    # -- around the loop -----------------------------------------------------------------------------------------

    async def _keep_claimed(self) -> None:
        """Heartbeat, and keep every job this engine holds claimed (waiting or running), so none is taken over;
        note the jobs whose users said /forget."""
        s = self.s
        while True:
            try:
                await s.queue.beat(s.name, s.G.model_id, s.settings.heartbeat_ttl_s, s.holder,
                                   random_weights=s.random_weights, first_answers=s.encoder.ready)
                held = list(s.claimed.values())
                await s.queue.touch(s.name, held)
                self.forgotten.update(j.job_id for j, ok in zip(held, await s.queue.wanted(held)) if not ok)
                await asyncio.to_thread(s.encoder.get)  # an encoder trained meanwhile: loaded, said at the next beat
            except redis.RedisError as e:
                log.warning("heartbeat failed (%s)", e)
            await asyncio.sleep(min(s.settings.heartbeat_ttl_s, s.queue.reclaim_idle_ms / 1000) / 3)

    async def _wait_for_redis(self, stop: asyncio.Event) -> bool:
        """Create the queue's groups, waiting for Redis as long as it takes (backoff 1 s doubling to 30 s, a log
        line per try); False when told to stop first."""
        delay = 1.0
        while not stop.is_set():
            attempt = asyncio.create_task(self.s.queue.ensure_groups())
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

    async def _drain(self) -> None:
        """Stopping: rows that end within `drain_s` (at the measured tick rate) are finished; every other job is left
        unacknowledged for another engine (reclaimed after `reclaim_idle_s`)."""
        s, drain_s = self.s, self.s.settings.drain_s
        deadline, step_s = time.monotonic() + drain_s, self.tick_s or 0.0
        for _, task in self.preparing.values():
            task.cancel()
        left = [*self.backlog, *self.suspects, *(j for j, _ in self.preparing.values()), *(j for j, _ in self.joining),
                *(j for j, _ in self.passes.values())]
        for job in left:
            s.let_go(job)
        self.backlog.clear()
        self.suspects.clear()
        self.preparing.clear()
        self.joining.clear()
        self.passes.clear()
        for row in list(self.pool.rows):
            if step_s * (row.total - row.step) > drain_s:
                left.append(row.key)
                self._leave(row.key)
        if len(self.pool):
            log.info("finishing %d job(s) before stopping", len(self.pool))
        while len(self.pool) and time.monotonic() < deadline:
            await self._tick()
        for row in list(self.pool.rows):
            left.append(row.key)
            self._leave(row.key)
        try:  # stopped, not dead: the jobs it lets go are nobody's suspects
            await asyncio.wait_for(s.queue.idle(left), max(0.1, deadline - time.monotonic()))
        except (redis.RedisError, asyncio.TimeoutError) as e:
            log.warning("could not mark the jobs let go as not running (%r)", e)

    def _leave(self, job: Job) -> None:
        """A row out of the pool, its job let go unanswered."""
        self.pool.drop(job)
        self.rows.pop(job.job_id, None)
        self.s.let_go(job)


def given_up(job: Job) -> str:
    """The answer to a job given up on: one that made the engine die or raise while it ran alone (its own fault),
    else one handed out more than `max_deliveries` times (engines died holding it)."""
    if job.faults:
        return (f"this job made the engine fail {job.faults} times when it ran on its own; try another photo or "
                "prompt")
    return "the engine restarted while working on this; please send it again"


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
