"""`stylebot run` outlives its engine: a `kill -9` of the engine leaves the web chat up, `run` says so in one line and
starts a new engine, which answers the next photo; Redis holds the notice the chats show. Ctrl-C still stops all of
it with exit 0. Real processes, the tiny model, the test Redis under a key prefix of its own."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid

import aiohttp

from conftest import FIXTURES, REDIS_URL, ROOT
from storage.keys import Keys


class Run:
    """`stylebot run` as a user starts it, its output read line by line (and kept, for failure messages)."""

    def __init__(self, proc):
        self.proc, self.seen = proc, []

    async def line(self, pattern: str, timeout: float = 120) -> re.Match:
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            assert raw, "stylebot run exited early:\n" + "".join(self.seen)
            self.seen.append(raw.decode())
            if m := re.search(pattern, raw.decode()):
                return m


async def answer_with_a_face(http, url: str, said: str = "finding your face: ") -> dict:
    """Send a photo with /invert (the bot's reply starting with `said`); the message with the result the chat
    shows."""
    form = aiohttp.FormData()
    form.add_field("text", "/invert")
    form.add_field("photo", (FIXTURES / "faces" / "obama.jpg").read_bytes(), filename="me.jpg")
    async with http.get(url + "events") as events:
        sent = await http.post(url + "command", data=form)
        assert sent.status == 200 and (await sent.json())["reply"].startswith(said), await sent.json()
        async for raw in events.content:
            if raw.startswith(b"data: "):
                ev = json.loads(raw[6:])
                for msg in ev.get("messages", []) + ([ev["message"]] if "message" in ev else []):
                    if msg.get("media") or msg.get("error"):
                        return msg
    raise AssertionError("the event stream ended without a result")


async def test_a_killed_engine_is_restarted_and_the_web_chat_stays_up(tmp_path, client):
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[engine]\ndevice = "cpu"\nmodel = "tiny"\nmax_active = 4\n'  # not timed at every restart
                   f'[weights]\ndir = "{tmp_path / "weights"}"\n[invert]\ntrain_minutes = 0\n'
                   f'[redis]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n')
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("STYLEBOT_REDIS_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "--config", str(cfg), "run", "--port", "0", "--invert-steps", "10",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    run = Run(proc)
    try:
        first = int((await run.line(r"the engine is starting \(pid (\d+)\)")).group(1))
        url = (await run.line(r"open (http://127\.0\.0\.1:\d+/)")).group(1)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            for _ in range(480):  # the engine loads torch and the model
                info = await (await http.get(url + "info")).json()
                if info["engines"]:
                    break
                await asyncio.sleep(0.25)
            assert info["engines"] == 1
            assert (await http.post(url + "nickname", json={"nickname": "survivor"})).status == 200

            os.kill(first, signal.SIGKILL)
            await run.line(r"stylebot the engine stopped \(exit -9\); restarting it in 1 s$")
            page = await http.get(url)  # the chat is still there while the engine is down
            assert page.status == 200 and page.content_type == "text/html"
            info = await http.get(url + "info")
            assert info.status == 200 and (await info.json())["nickname"] == "survivor"
            for _ in range(100):  # struck off at once (not after its heartbeat's 15 s): no "1 engine" for a dead one
                info = await (await http.get(url + "info")).json()
                if info["engines"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert info["restarting"]  # the page's badge says "engine restarting", not "offline"
            # a photo sent while it restarts is told so, and the new engine takes it
            result = await answer_with_a_face(http, url, said="finding your face: queued; the engine is restarting")
            second = int((await run.line(r"the engine is starting \(pid (\d+)\)")).group(1))
            assert second != first
            assert result["text"].startswith("your face as the tiny model draws it"), result
            image = await http.get(url + result["media"].lstrip("/"))
            assert image.status == 200 and image.content_type == "image/png"

        notice = (await client.get(Keys(prefix).notice)).decode()
        assert re.fullmatch(r"the engine restarted at \d\d:\d\d after it stopped unexpectedly \(exit -9\); "
                            r"jobs in flight are picked up again", notice), notice
        assert 0 < await client.ttl(Keys(prefix).notice) <= 600
    finally:
        proc.send_signal(signal.SIGINT)
        out = "".join(run.seen) + (await asyncio.wait_for(proc.stdout.read(), 90)).decode()
        code = await proc.wait()
        async for key in client.scan_iter(match=f"{prefix}*"):
            await client.delete(key)
    assert code == 0, out
    assert out.rstrip().endswith("stopped"), out
    assert out.count("restarting it in") == 1, out  # our own Ctrl-C is no crash: nothing restarted then
    assert not os.path.exists(f"/proc/{second}"), "the restarted engine outlived stylebot run"


# -- the supervisor's policy, on processes that die at once --------------------------------------------------------

DIES = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]


async def test_restarts_back_off_and_a_dead_engine_is_struck_off_at_once(client, caplog):
    from bot.serve import EngineSupervisor
    from storage.queue import JobQueue

    caplog.set_level("INFO", logger="stylebot")
    keys = Keys(f"test-{uuid.uuid4().hex[:8]}:")
    queue = JobQueue(client, keys)
    sup = EngineSupervisor(DIES, REDIS_URL, keys, first_delay_s=0.01, max_delay_s=0.04, steady_s=3600)
    sup.start()
    await queue.beat(sup.name, "tiny", 15)  # as the engine would have, before it died
    stop = asyncio.Event()
    watching = asyncio.create_task(sup.supervise(stop))
    while sup.starts < 5 and not watching.done():
        await asyncio.sleep(0.01)
    stop.set()
    await watching
    sup.proc.wait()
    delays = re.findall(r"the engine stopped \(exit -9\); restarting it in ([\d.]+) s", caplog.text)
    assert delays[:4] == ["0.01", "0.02", "0.04", "0.04"]  # doubling, up to the most
    assert not sup.failed
    assert await queue.engines_online() == {}  # /status says offline, not "engines online: 1"
    assert await queue.restarting()  # and new jobs are told it is restarting
    assert "after it stopped unexpectedly (exit -9)" in (await client.get(keys.notice)).decode()
    await client.delete(keys.notice, keys.engines, keys.engine_models, keys.restarting)


async def test_an_engine_that_cannot_start_stops_run_instead_of_restarting(client, caplog, capsys):
    from bot.serve import EngineSupervisor

    keys = Keys(f"test-{uuid.uuid4().hex[:8]}:")
    sup = EngineSupervisor([sys.executable, "-c", "raise SystemExit(1)"], REDIS_URL, keys, first_delay_s=0.01)
    sup.start()
    stop = asyncio.Event()
    await asyncio.wait_for(sup.supervise(stop), 60)
    assert sup.failed and stop.is_set() and sup.starts == 1
    assert capsys.readouterr().err == "error: the engine stopped (exit 1) before it came up; see its log above\n"
    assert await client.get(keys.notice) is None


async def test_while_the_engine_restarts_the_chat_says_so_and_not_an_earlier_restart(client):
    """A second death: the notice of the first restart ("restarted at ...") goes, /status and new jobs say the engine
    is restarting."""
    from bot.core import Command
    from conftest import FIXTURES, Stack

    stack = Stack(client)
    try:
        queue = stack.queue
        await queue.ensure_groups(adapters=("web",))
        await queue.post_notice("the engine restarted at 10:00 after it stopped unexpectedly (exit -9); jobs in "
                                "flight are picked up again", 600)
        await queue.beat("e", "tiny", 15)
        await queue.leave("e", restarting_s=60)  # what the supervisor does when it finds it dead again
        status = (await stack.core.handle(Command("web", "web:u1", "u1", "/status"))).text
        photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
        sent = (await stack.core.handle(Command("web", "web:u1", "u1", "/invert", photo=photo))).text
        assert status.startswith("engines online: 0 (the engine is restarting);") and "restarted at" not in status
        assert sent == "finding your face: queued; the engine is restarting"
    finally:
        await stack.close()
