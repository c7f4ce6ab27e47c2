"""Bring a Redis written by an older stylebot up to the current layout, once, when a process starts.

Layout 1 (before users' epochs): the jobs stream kept every job ever queued, its entries and the results stream's
held whole jobs and results (user ids, prompts, images); a user's unfinished jobs were a set; `job:<id>` hashes
held the user id; results, crops, origins and message links were in no index, so /forget had to scan for them.

Layout 2 (`SCHEMA`): stream entries hold ids, answered entries leave their stream, a user's unfinished jobs are a
hash, every key named after a user (and every message link) is listed in that user's index.

Run at start-up only (it scans the keyspace once; no command does). Jobs not yet handed to an engine are queued
again in the new form (so /forget finds them); jobs an old engine holds keep their old form and are read as before;
a user's unfinished-jobs set is dropped (their limit counts from those requeued).
"""

from __future__ import annotations

import json
import logging
import secrets
import time

import redis.asyncio as redis

from storage.keys import ADAPTER_GROUP, ENGINE_GROUP, Keys, as_str

log = logging.getLogger("stylebot.storage")

SCHEMA = 2
USER_KEYS = ("origin", "target", "result")  # user:<id>:<kind>:<job or result id>, listed in the user's index


async def migrate(r: redis.Redis, keys: Keys, *, index_ttl_s: int) -> bool:
    """Migrate once (a lock keeps two starting processes from both doing it); True if this call did."""
    if int(await r.get(keys.schema) or 1) >= SCHEMA or not await r.set(f"{keys.schema}:lock", "1", nx=True, ex=300):
        return False
    try:
        if not await r.exists(keys.jobs) and not [k async for k in r.scan_iter(match=f"{keys.prefix}*", count=1000)]:
            await r.set(keys.schema, SCHEMA)  # a new deployment: nothing to bring along
            return False
        started, counts = time.monotonic(), {"answered entries": 0, "old keys": 0, "keys indexed": 0}
        counts["answered entries"] += await _drop_answered(r, keys.jobs, ENGINE_GROUP)
        async for stream in r.scan_iter(match=f"{keys.prefix}results:*", count=1000):
            counts["answered entries"] += await _drop_answered(r, as_str(stream), ADAPTER_GROUP)
        async for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
            key = as_str(key)
            rest = key[len(keys.prefix):]
            if rest.startswith("job:") or (rest.startswith("user:") and rest.endswith(":jobs")
                                            and as_str(await r.type(key)) == "set"):
                counts["old keys"] += await r.delete(key)
            elif rest.startswith("user:"):
                user, kind = _user_key(rest)
                if user and kind in USER_KEYS:
                    await _index(r, keys, user, key, index_ttl_s)
                    counts["keys indexed"] += 1
            elif rest.startswith("message:"):
                owner = as_str(await r.get(key) or b"").split(" ")[0]
                if owner:
                    await _index(r, keys, owner, key, index_ttl_s)
                    counts["keys indexed"] += 1
        counts["waiting jobs requeued"] = await _requeue_waiting(r, keys, index_ttl_s)
        await r.set(keys.schema, SCHEMA)
        log.info("brought this Redis to layout %d in %.1f s: %s", SCHEMA, time.monotonic() - started,
                 ", ".join(f"{n} {what}" for what, n in counts.items()))
        return True
    finally:
        await r.delete(f"{keys.schema}:lock")


def _user_key(rest: str) -> tuple[str, str]:
    """("web:abc", "result") from "user:web:abc:result:<id>" (user ids hold colons themselves)."""
    body = rest[len("user:"):]
    head, _, _ = body.rpartition(":")  # drop the job or result id
    user, _, kind = head.rpartition(":")
    return user, kind


async def _index(r: redis.Redis, keys: Keys, user: str, key: str, index_ttl_s: int) -> None:
    ttl = await r.ttl(key)
    score = time.time() + (ttl if ttl > 0 else index_ttl_s)
    await r.zadd(keys.index(user), {key: score})
    if await r.ttl(keys.index(user)) < index_ttl_s:
        await r.expire(keys.index(user), index_ttl_s)


async def _requeue_waiting(r: redis.Redis, keys: Keys, index_ttl_s: int) -> int:
    """Jobs of the old layout that no engine has had yet: queued again as ids with bodies (in the same order)."""
    try:
        groups = {as_str(g["name"]): g for g in await r.xinfo_groups(keys.jobs)}
    except redis.ResponseError:
        return 0
    last = as_str(groups[ENGINE_GROUP]["last-delivered-id"]) if ENGINE_GROUP in groups else "0-0"
    moved = 0
    for entry_id, fields in await r.xrange(keys.jobs, min=f"({last}", max="+"):
        fields = {as_str(k): v for k, v in fields.items()}
        if "job" not in fields:
            continue
        job = json.loads(fields["job"])
        user, job_id = job["user_id"], job["job_id"]
        await r.set(keys.epoch(user), secrets.token_hex(8), nx=True, ex=index_ttl_s)
        epoch = as_str(await r.get(keys.epoch(user)))
        new_id = await r.xadd(keys.jobs, {"id": job_id})
        await r.hset(keys.job_data(job_id), mapping={"job": fields["job"], "user": user, f"epoch:{user}": epoch,
                                                     "reply": keys.results(job["adapter"]), "entry": new_id})
        await r.expire(keys.job_data(job_id), index_ttl_s)
        await r.hset(keys.user_jobs(user), job_id, new_id)
        await _index(r, keys, user, keys.job_data(job_id), index_ttl_s)
        await r.xdel(keys.jobs, entry_id)
        moved += 1
    return moved


async def _drop_answered(r: redis.Redis, stream: str, group: str) -> int:
    """Delete a stream's entries that its group has delivered and acknowledged (the old layout kept them)."""
    try:
        groups = {as_str(g["name"]): g for g in await r.xinfo_groups(stream)}
    except redis.ResponseError:  # no such stream
        return 0
    if group not in groups:
        return 0
    last = as_str(groups[group]["last-delivered-id"])
    pending = {as_str(p["message_id"]) for p in await r.xpending_range(stream, group, min="-", max=last, count=10**6)}
    dropped = 0
    for entry_id, _ in await r.xrange(stream, min="-", max=last):
        if as_str(entry_id) not in pending:
            dropped += await r.xdel(stream, entry_id)
    return dropped
