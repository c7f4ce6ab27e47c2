"""Redis stops under running front ends and a running engine: the front ends say so within seconds, the page still
loads, and the engine still stops within its drain time."""

from __future__ import annotations

import asyncio
import time

from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import async_playwright, expect

from adapters.web import COOKIE, WebChat, serve
from bot.core import OUTAGE, BotCore, Command
from conftest import FIXTURES
from engine.loop import Engine
from engine.perceptual import load_vgg16
from engine.registry import build_builtin, registry_entries
from engine.services import EngineSettings
from storage.connect import connect
from storage.keys import Keys
from storage.latents import LatentStore
from storage.queue import JobQueue
from test_redis_restart import _free_port, _start_redis, pytestmark  # noqa: F401 - skipped without redis-server
from test_web import BROWSER_ARGS, CHROMIUM


async def redis_of_our_own(tmp_path, prefix: str, patient: bool = False):
    """A redis-server of this test's own (to stop under the bot), a client (a front end's impatient one, or the
    engine's patient one: 20 retries, about 80 s), the queue on it."""
    server = _start_redis(port := _free_port(), tmp_path)
    client = connect(f"redis://127.0.0.1:{port}/0", patient=patient)
    keys = Keys(prefix)
    queue = JobQueue(client, keys)
    await queue.ensure_groups(adapters=("web",))
    return server, client, keys, queue


async def test_front_ends_say_within_seconds_that_redis_is_away(tmp_path):
    server, client, keys, queue = await redis_of_our_own(tmp_path, "outage:")
    core = BotCore(queue, LatentStore(client, keys))
    web = TestClient(TestServer(WebChat(core).app))
    await web.start_server()
    try:
        cookies = {COOKIE: "a" * 32}
        assert (await web.post("/nickname", json={"nickname": "alice"}, cookies=cookies)).status == 200
        server.terminate()
        server.wait(10)
        for text in ("/help", "/status"):
            start = time.monotonic()
            reply = await core.handle(Command("web", "web:u1", "u1", text))
            assert reply.text == OUTAGE and time.monotonic() - start < 3, (text, time.monotonic() - start)
        start = time.monotonic()
        page = await web.get("/", cookies=cookies)
        assert page.status == 200 and "<html" in (await page.text()).lower() and time.monotonic() - start < 3
        start = time.monotonic()
        info = await web.get("/info", cookies=cookies)
        assert info.status == 503 and (await info.json())["error"] == OUTAGE and time.monotonic() - start < 3
        form = FormData(default_to_multipart=True)
        form.add_field("text", "/help")
        start = time.monotonic()
        said = await web.post("/command", data=form, cookies=cookies)
        assert (await said.json()).get("reply", (await said.json()).get("error")) == OUTAGE
        assert time.monotonic() - start < 3, time.monotonic() - start
    finally:
        await web.close()
        await client.aclose()
        server.terminate()


async def test_a_stopping_engine_does_not_wait_on_a_dead_redis(tmp_path):
    """SIGTERM's stop with Redis gone mid-job: the engine returns within drain_s."""
    server, client, keys, queue = await redis_of_our_own(tmp_path, "outage-engine:", patient=True)
    store = LatentStore(client, keys)
    photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    assert (await BotCore(queue, store).handle(Command("web", "web:u1", "u1", "/invert", photo=photo))).job_id
    engine = Engine(build_builtin(registry_entries()["tiny"]), queue, store, vgg=load_vgg16(width=0.125),
                    settings=EngineSettings(name="e", invert_steps=100_000, drain_s=2.0))
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        for _ in range(200):  # the job is running
            if engine.rows:
                break
            await asyncio.sleep(0.05)
        assert engine.rows
        server.terminate()
        server.wait(10)
        await asyncio.sleep(0.5)
        stop.set()
        start = time.monotonic()
        await asyncio.wait_for(task, 15)
        assert time.monotonic() - start < 2.0 + 0.5, time.monotonic() - start
    finally:
        task.cancel()
        await client.aclose()
        server.terminate()


async def test_the_page_says_the_storage_is_away_not_that_the_engine_is_offline(tmp_path):
    """With Redis stopped, /info answers 503 with the outage line; the page's badge said "engine offline: jobs
    wait" then, while the engine ran on. It says what is known: the storage is not answering."""
    server, client, keys, queue = await redis_of_our_own(tmp_path, "outage-page:")
    await queue.beat("engine-1", "tiny", ttl_s=600)  # an engine online, as its heartbeat says
    stop = asyncio.Event()
    started = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(BotCore(queue, LatentStore(client, keys)), "127.0.0.1", 0, stop, started))
    try:
        url = await asyncio.wait_for(started, 10)
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = await browser.new_page()
            await page.goto(url)
            badge = page.locator("#engine")
            await expect(badge).to_have_text("model: tiny", timeout=15_000)
            server.terminate()
            server.wait(10)
            await expect(badge).to_have_text("the bot's storage is not answering", timeout=15_000)  # polled every 5 s
            assert await badge.get_attribute("title") == OUTAGE
            await browser.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await client.aclose()
        server.terminate()


async def test_a_job_lost_with_redis_data_is_not_logged_as_forgotten(client, caplog):
    """Redis loses this deployment's data while an inversion runs (a restart without its data): the engine stops the
    job and its log says what may have happened, not that the user said /forget."""
    from conftest import FIXTURES, Stack
    from bot.core import Command

    caplog.set_level("INFO", logger="stylebot")
    stack = Stack(client, invert_steps=400)
    await stack.start_engine()
    try:
        photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
        ack = await stack.core.handle(Command("web", "web:lost", "lost", "/invert", photo=photo))
        while ack.job_id not in stack.engine.rows:  # running in the pool
            await asyncio.sleep(0.05)
        async for key in client.scan_iter(match=f"{stack.keys.prefix}*"):
            await client.delete(key)
        for _ in range(200):
            if ack.job_id not in stack.engine.rows:
                break
            await asyncio.sleep(0.05)
        assert ack.job_id not in stack.engine.rows
        lines = [r.getMessage() for r in caplog.records if ack.job_id in r.getMessage()]
        assert any("Redis lost its data" in line for line in lines), lines
        assert not any("said /forget;" in line or "said /forget while" in line for line in lines), lines
    finally:
        await stack.close()
