"""Redis restarts under a running engine and bot core: they reconnect with backoff and no queued job is lost."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import pytest

from bot.core import BotCore, Command
from conftest import FIXTURES
from engine.perceptual import load_vgg16
from engine.registry import build_builtin, registry_entries
from engine.loop import Engine
from engine.services import EngineSettings
from storage.connect import connect
from storage.keys import Keys
from storage.latents import LatentStore
from storage.queue import JobQueue

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to restart one")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, data_dir) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def test_jobs_survive_a_redis_restart(tmp_path):
    port = _free_port()
    server = _start_redis(port, tmp_path)
    client = connect(f"redis://127.0.0.1:{port}/0")
    keys = Keys("restart:")
    queue = JobQueue(client, keys)
    await queue.ensure_groups(adapters=("web",))
    core = BotCore(queue, LatentStore(client, keys))
    photo = (FIXTURES / "faces" / "obama.jpg").read_bytes()
    try:
        acks = [await core.handle(Command("web", f"web:u{i}", f"u{i}", "/invert", photo=photo)) for i in range(3)]
        assert all(a.job_id for a in acks)

        server.terminate()  # Redis goes away (SIGTERM: it finishes its append-only file) ...
        server.wait(10)
        engine = Engine(build_builtin(registry_entries()["tiny"]), queue, LatentStore(client, keys),
                        vgg=load_vgg16(width=0.125), settings=EngineSettings(name="e", invert_steps=5))
        stop = asyncio.Event()
        task = asyncio.create_task(engine.run(stop))  # ... the engine starts while it is down ...
        await asyncio.sleep(1.0)
        server = _start_redis(port, tmp_path)  # ... and it comes back

        answered: set[str] = set()
        deadline = time.monotonic() + 60
        while len(answered) < 3 and time.monotonic() < deadline:
            for entry_id, event in await queue.read_events("web", "web-1", block_ms=200):
                await queue.ack_event("web", entry_id)
                if event.type == "done":
                    answered.add(event.job_id)
        stop.set()
        await asyncio.wait_for(task, 30)
        assert answered == {a.job_id for a in acks}
    finally:
        await client.aclose()
        server.terminate()
        server.wait(10)
