"""People's faces and the bot's promises under concurrency, against the real Redis and a running tiny engine:
/forget forgets (also what is running at that moment), consent is checked when the result is stored, limits hold
when commands arrive together, no command scans the keyspace, a released @name is not taken back silently."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from adapters.base import EventPump
from bot.config import LimitsConfig
from bot.core import Command
from conftest import FIXTURES, Stack
from conftest import ResultRecorder as Recorder
from storage.latents import StoredLatent
from storage.queue import Job
from storage.records import Origin

OBAMA = (FIXTURES / "faces" / "obama.jpg").read_bytes()
PROMPT = "really angry face"


def say(text: str, user: str = "alice", photo: bytes | None = None) -> Command:
    return Command("web", f"web:{user}", user, text, photo=photo, origin=Origin(user=user))


async def everything(client, prefix: str) -> dict[bytes, list[bytes]]:
    """Every key under the prefix and every value in it: strings, hash fields, set and sorted-set members,
    stream entries."""
    out: dict[bytes, list[bytes]] = {}
    async for key in client.scan_iter(match=f"{prefix}*"):
        kind = (await client.type(key)).decode()
        if kind == "string":
            values = [await client.get(key)]
        elif kind == "hash":
            values = [x for kv in (await client.hgetall(key)).items() for x in kv]
        elif kind == "set":
            values = list(await client.smembers(key))
        elif kind == "zset":
            values = await client.zrange(key, 0, -1)
        elif kind == "stream":
            values = [x for _, fields in await client.xrange(key) for kv in fields.items() for x in kv]
        else:
            values = []
        out[key] = [v for v in values if v is not None]
    return out


def traces(dump: dict[bytes, list[bytes]], needles: list[bytes]) -> list[str]:
    """Where any needle (an id, a prompt, a piece of a photo) is still found."""
    return [f"{key!r} holds {n[:20]!r}" for key, values in dump.items() for n in needles
            if n in key or any(n in v for v in values)]


async def wait_for(predicate, timeout: float = 120):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def render_and_store(stack: Stack, job: Job) -> None:
    """Run a claimed one-pass job (a morph) to its end through its handler, as the engine's loop does."""
    from engine.handlers import HANDLERS

    handler, services = HANDLERS[job.op], stack.engine.s
    work = await handler.prepare(job, services)
    outcome = None
    while outcome is None:
        outcome = await asyncio.to_thread(work.render)
    await handler.store(job, services, work, outcome)


async def give_face(stack: Stack, user: str) -> None:
    await stack.store.set_face(f"web:{user}", StoredLatent(np.zeros((8, 64), np.float32), "tiny"))


async def test_forget_while_jobs_run_and_wait_leaves_no_trace_and_answers_nothing(client):
    """Alice's inversion is running, her edit and a second photo wait, an earlier result sits unposted in the
    stream, when she sends /forget: the engine stores nothing of hers afterwards, nobody answers her, and a scan
    of the whole keyspace finds nothing that holds her id, her name, her prompt or her photo."""
    stack = Stack(client, invert_steps=150, limits=LimitsConfig(max_jobs_per_user=5))
    await stack.start_engine()
    try:
        rec = Recorder()
        pump = EventPump(stack.core, rec)
        await stack.queue.ensure_groups(adapters=("web",))
        sub = await stack.queue.listen_progress("web")
        await give_face(stack, "bob")
        # an earlier result, stored and not yet posted (the web chat was down): it must go too
        earlier = await stack.core.handle(say("/invert", photo=OBAMA))
        await wait_for(lambda: client.exists(stack.keys.done(earlier.job_id)), timeout=300)
        running = await stack.core.handle(say("/invert", photo=OBAMA))
        waiting = [await stack.core.handle(say(f"/edit {PROMPT}")), await stack.core.handle(say("/invert", photo=OBAMA))]
        assert running.job_id and all(w.job_id for w in waiting)

        async def started() -> bool:
            return any(e.job_id == running.job_id and e.step > 0
                       for e in await stack.queue.read_progress(sub, 0.05))
        await wait_for(started)
        reply = await stack.core.handle(say("/forget"))
        assert reply.text.startswith("done: deleted everything") and reply.forgotten

        async def engine_let_go() -> bool:
            return not stack.engine.claimed and await stack.queue.pending_count() == 0
        await wait_for(engine_let_go)
        for _ in range(3):
            await pump.step(block_ms=100)
        assert rec.results == []  # nothing is posted to someone who asked to be forgotten
        status = await stack.core.handle(say("/status", user="bob"))
        assert "jobs in the queue: 0" in status.text
        left = traces(await everything(client, stack.keys.prefix),
                      [b"web:alice", b"alice", PROMPT.encode(), OBAMA[2000:2064]])
        assert left == []
        assert (await stack.core.handle(say("/status"))).text.endswith("no face for you yet")
        await sub.aclose()
    finally:
        await stack.close()


async def test_a_morph_is_not_kept_when_the_other_person_unshares_before_it_is_stored(client):
    """P shares, Q queues /morph @me @P, P sends /unshare and is told others can no longer use their face: Q gets
    a one-line answer saying so, not the GIF, and nothing of the morph is stored."""
    stack = Stack(client)
    try:
        await stack.queue.ensure_groups(adapters=("web",))
        await give_face(stack, "p")
        await give_face(stack, "q")
        await stack.core.handle(say("/share", user="p"))
        queued = await stack.core.handle(say("/morph @me @p 4", user="q"))
        assert queued.job_id
        [job], _ = await stack.queue.claim("engine", 1, block_ms=100)  # the engine has it in hand...
        assert (await stack.core.handle(say("/unshare", user="p"))).text == "others can no longer /morph with your face"
        await render_and_store(stack, job)  # ...and renders it all the same: the store step checks consent again
        [(_, event)] = await stack.queue.read_events("web", "w", block_ms=100)
        assert event.type == "failed" and event.error.startswith("@p no longer allows morphs with their face")
        assert await stack.store.result("web:q", job.job_id) is None
        assert await stack.queue.pending_count() == 0
    finally:
        await stack.close()


async def test_limits_hold_when_commands_arrive_together(client):
    """One user sends 50 edits at once with a limit of 3: 3 are queued. The queue is at 180 of 200 and 60 people
    send at once: exactly 20 more are queued, the others are told the bot is busy."""
    stack = Stack(client, limits=LimitsConfig(max_jobs_per_user=3, max_queue=200))
    try:
        await give_face(stack, "alice")
        replies = await asyncio.gather(*(stack.core.handle(say(f"/edit angry {i}")) for i in range(50)))
        assert sum(r.job_id is not None for r in replies) == 3
        assert {r.text for r in replies if r.job_id is None} == {"you already have 3 jobs waiting: wait for one to finish"}
        for i in range(177):
            await stack.queue.enqueue(Job(op="edit", user_id=f"web:filler{i}", adapter="web"))
        assert await stack.queue.pending_count() == 180
        for i in range(60):
            await give_face(stack, f"u{i}")
        replies = await asyncio.gather(*(stack.core.handle(say("/edit smile", user=f"u{i}")) for i in range(60)))
        assert sum(r.job_id is not None for r in replies) == 20
        assert await stack.queue.pending_count() == 200
        assert {r.text for r in replies if r.job_id is None} == {"I'm busy right now: try again in a few minutes"}
    finally:
        await stack.close()


async def test_no_command_scans_the_keyspace(client):
    """/status, a queued job and /forget read a fixed number of keys, however many keys Redis holds: none of
    them runs SCAN or KEYS (counted by Redis itself)."""
    stack = Stack(client)
    try:
        await stack.queue.beat("e1", "tiny", 30)
        await client.config_resetstat()
        for text in ("/status", "/help"):
            await stack.core.handle(say(text))
        await stack.core.handle(say("/invert", photo=OBAMA))
        await stack.core.handle(say("/forget"))
        stats = await client.info("commandstats")
        assert "cmdstat_scan" not in stats and "cmdstat_keys" not in stats, sorted(stats)
    finally:
        await stack.close()


async def test_a_name_released_by_forget_is_not_taken_back_silently(client):
    """J sends /forget, K takes the name "jay"; J's next command does not silently take it back: J is told, and
    @jay still means K."""
    stack = Stack(client)
    try:
        await stack.core.handle(Command("web", "web:j", "jay", "/help"))
        assert await stack.core.user_called("web", "jay") == "web:j"
        await stack.core.handle(Command("web", "web:j", "jay", "/forget"))
        assert await stack.core.user_called("web", "jay") is None  # free for others
        await stack.core.handle(Command("web", "web:k", "jay", "/help"))
        reply = await stack.core.handle(Command("web", "web:j", "jay", "/status"))
        assert "the name @jay belongs to someone else now" in reply.text
        assert await stack.core.user_called("web", "jay") == "web:k"
    finally:
        await stack.close()


LONG = "x" * 4085
CUT = "x" * 39 + "…"  # what a reply repeats of a long word: bot.core.ECHO_CHARS characters


@pytest.mark.parametrize("text, expected", [
    ("/morph @me @me", "a morph needs two different faces, e.g. /morph @me @friend"),
    ("/edit \u200b\u200c\u200d\u2060", "the prompt is empty: describe the edit, e.g. /edit really angry face"),
    ("/edit \u200bangry\u200b", "angry"),  # invisible characters are dropped from a prompt
    ("/edit smile\tface", "smile face"),  # tabs and line breaks part words, as spaces do
    ("/edit really\nangry\r\nface", "really angry face"),
    ("/edit\nsmile", "smile"),  # the command ends at a line break too
    (f"/{LONG}", f"unknown command '/{CUT[:-2]}…': try /help"),  # nothing near Telegram's 4,096 characters
    (f"/morph @me @{LONG}", f"I don't know @{CUT}: they need to talk to me once (for example /help)"),
    ("/morph @me @bob " + "9" * 5000, "frames must be between 2 and 120"),  # more digits than int() reads
])
async def test_odd_commands_get_one_line(client, text, expected):
    stack = Stack(client)
    try:
        await give_face(stack, "alice")
        await give_face(stack, "bob")
        await stack.core.handle(Command("web", "web:bob", "bob", "/share"))
        reply = await stack.core.handle(say(text))
        if text.startswith("/edit") and reply.job_id:  # queued: the prompt as CLIP will read it
            [(_, fields)] = await client.xrange(stack.keys.jobs)  # the entry holds the job's id, its body the rest
            body = await client.hget(stack.keys.job_data(fields[b"id"].decode()), "job")
            assert json.loads(body)["params"]["prompt"] == expected
        else:
            assert reply.text == expected and reply.job_id is None
    finally:
        await stack.close()


async def test_status_on_a_redis_no_engine_has_touched(client):
    """/status before any engine created the queue: an answer, not `no such key`."""
    stack = Stack(client)
    try:
        reply = await stack.core.handle(say("/status"))
        assert reply.text == "engines online: 0; jobs in the queue: 0; no face for you yet"
    finally:
        await stack.close()


async def test_five_hundred_web_commands_at_once_are_all_answered(client):
    """500 commands from 50 browsers at the same moment, on a Redis pool of 8 connections: every one gets an
    answer (the reply, or a one-line "busy" with HTTP 503), none an error page; the pool waits rather than fails."""
    from aiohttp import FormData
    from aiohttp.test_utils import TestClient, TestServer

    from adapters.web import COOKIE, WebChat
    from bot.core import BUSY, BotCore
    from conftest import REDIS_URL
    from storage.connect import connect

    stack = Stack(client)
    small = connect(REDIS_URL, max_connections=8, pool_timeout_s=2)
    core = BotCore(type(stack.queue)(small, stack.keys), type(stack.store)(small, stack.keys))
    try:
        chat = WebChat(core)
        async with TestClient(TestServer(chat.app)) as http:
            cookies = [f"browser{i:02d}-{'x' * 20}" for i in range(50)]
            for i, cookie in enumerate(cookies):
                r = await http.post("/nickname", json={"nickname": f"user{i}"}, headers={"Cookie": f"{COOKIE}={cookie}"})
                assert r.status == 200, await r.text()

            async def send(i: int):
                form = FormData({"text": "/status" if i % 2 else "/share"}, default_to_multipart=True)
                r = await http.post("/command", data=form, headers={"Cookie": f"{COOKIE}={cookies[i % 50]}"})
                return r.status, await r.json()

            answers = await asyncio.gather(*(send(i) for i in range(500)))
        assert {status for status, _ in answers} <= {200, 503}
        assert all(body.get("reply") or body.get("error") == BUSY for _, body in answers)
        assert sum(status == 200 for status, _ in answers) > 0
    finally:
        await small.aclose()
        await stack.close()


async def pump_all(stack: Stack, rec: Recorder) -> None:
    pump = EventPump(stack.core, rec)
    for _ in range(3):
        await pump.step(block_ms=100)


async def test_a_morph_partner_who_says_forget_leaves_no_trace_in_the_askers_data(client):
    """P shares, Q queues /morph @me @p, P sends /forget before any engine took it: the job leaves the queue, Q is
    told in one line and gets their place back, and nothing anywhere holds P's id or name. Then a morph that was
    stored before P withdrew is not posted, and whichever of them says /forget, no id of theirs stays."""
    stack = Stack(client)
    try:
        await stack.queue.ensure_groups(adapters=("web",))
        for user in ("p", "q"):
            await give_face(stack, user)
        await stack.core.handle(say("/share", user="p"))
        queued = await stack.core.handle(say("/morph @me @p 4", user="q"))
        assert queued.job_id and await client.exists(stack.keys.epoch("web:p"))  # P's epoch made at admission
        await stack.core.handle(say("/forget", user="p"))
        rec = Recorder()
        await pump_all(stack, rec)
        assert [(r.ok, r.text) for r in rec.results] == [
            (False, "the other person is no longer available for morphs, so this one was stopped")]
        assert await client.hlen(stack.keys.user_jobs("web:q")) == 0 and await stack.queue.pending_count() == 0
        assert traces(await everything(client, stack.keys.prefix), [b"web:p", b"@p"]) == []

        # stored first, withdrawn before it is posted
        await give_face(stack, "p")
        await stack.core.handle(say("/share", user="p"))
        await stack.core.handle(say("/morph @p @me 4", user="q"))
        [job], _ = await stack.queue.claim("engine", 1, block_ms=100)
        await render_and_store(stack, job)  # stored: P still shared at that moment
        await stack.core.handle(say("/unshare", user="p"))
        rec = Recorder()
        await pump_all(stack, rec)
        assert [(r.ok, r.text) for r in rec.results] == [
            (False, "the other person no longer allows morphs with their face, so the morph was not kept")]
        assert await stack.store.result("web:q", job.job_id) is None  # P's face in it is gone too
        await stack.core.handle(say("/forget", user="q"))
        assert traces(await everything(client, stack.keys.prefix), [b"web:q"]) == []
    finally:
        await stack.close()


async def test_a_rerun_racing_forget_queues_nothing(client):
    """A reaction read its result's link just before /forget went through: the rerun is refused (the link's
    epoch is no longer the user's), and nothing of the user is re-created."""
    from bot.core import Reaction

    stack = Stack(client)
    try:
        await stack.queue.ensure_groups(adapters=("web",))
        await stack.core.handle(say("/invert", photo=OBAMA))  # makes her epoch
        epoch = (await client.get(stack.keys.epoch("web:alice"))).decode()
        await stack.core.handle(say("/forget"))
        reply = await stack.core.react(Reaction("web", "web:alice", "r1", "redo", {}, epoch))
        assert reply.text == "that result has expired, or it is not yours to rerun" and reply.job_id is None
        assert traces(await everything(client, stack.keys.prefix), [b"web:alice"]) == []
    finally:
        await stack.close()


async def test_the_name_held_at_forget_is_freed_after_a_rename(client):
    stack = Stack(client)
    try:
        await stack.core.claim_name("web", "web:j", "old")
        await stack.core.claim_name("web", "web:j", "new1")  # a rename frees the old name at once
        assert await stack.core.user_called("web", "old") is None
        await stack.core.handle(Command("web", "web:j", "new1", "/forget"))
        assert await stack.core.user_called("web", "new1") is None
        assert traces(await everything(client, stack.keys.prefix), [b"web:j"]) == []
    finally:
        await stack.close()


async def test_a_redis_from_the_older_layout_is_brought_along(client):
    """A Redis written by the previous stylebot (answered jobs kept in the stream, a user's unfinished jobs as a
    set, `job:` hashes with user ids, results and message links in no index): after start-up the queue counts only
    what waits, commands are admitted, and /forget finds the old keys too."""
    import json as _json

    stack = Stack(client)
    k, r = stack.keys, client
    try:
        await r.xgroup_create(k.jobs, "engines", id="0", mkstream=True)
        for i in range(5):  # five old jobs, answered long ago (delivered and acknowledged), one still waiting
            job = {"op": "edit", "user_id": "web:olga", "adapter": "web", "params": {"prompt": "OLGA-PROMPT"},
                   "job_id": f"old{i}", "created": 0}
            await r.xadd(k.jobs, {"job": _json.dumps(job)})
        for mid, _ in (await r.xreadgroup("engines", "old-engine", {k.jobs: ">"}, count=4))[0][1]:
            await r.xack(k.jobs, "engines", mid)
        await r.sadd(k.user_jobs("web:olga"), "old4")
        await r.hset(f"{k.prefix}job:old1", mapping={"status": "done", "user": "web:olga"})
        await r.set(k.result_latent("web:olga", "old1") , "latents", ex=600)
        await r.set(k.message("web", "m1"), "web:olga old1", ex=600)
        await stack.queue.ensure_groups(adapters=("web",))
        assert await stack.queue.pending_count() == 1  # the one still waiting
        await give_face(stack, "olga")
        assert (await stack.core.handle(say("/edit smile", user="olga"))).job_id
        await stack.core.handle(say("/forget", user="olga"))
        assert traces(await everything(client, k.prefix), [b"web:olga", b"OLGA-PROMPT"]) == []
        assert await stack.queue.pending_count() == 0  # her waiting old job went with the rest
    finally:
        await stack.close()
