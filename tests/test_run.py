"""`stylebot run`, README's first command: with no Redis answering it starts its own, brings up the engine and the
web chat, answers a photo with its reconstruction, and Ctrl-C stops all of it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys

import aiohttp

from bot.serve import free_port, redis_answers
from conftest import FIXTURES, ROOT


def _config(tmp_path, redis_port: int):
    p = tmp_path / "config.toml"
    p.write_text(f'[engine]\ndevice = "cpu"\nmodel = "auto"\n[weights]\ndir = "{tmp_path / "weights"}"\n'
                 f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n')
    return p


async def _line(proc, pattern: str, timeout: float = 120) -> re.Match:
    seen = []
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        assert line, "stylebot run exited early:\n" + "".join(seen)
        seen.append(line.decode())
        if m := re.search(pattern, line.decode()):
            return m


async def test_run_starts_redis_engine_and_web_chat_and_stops_on_ctrl_c(tmp_path):
    redis_port = free_port()
    cfg = _config(tmp_path, redis_port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "--config", str(cfg), "run", "--port", "0", "--invert-steps", "20",
        "--redis-data", str(tmp_path / "redis"), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        started = await _line(proc, r"started redis-server on 127\.0\.0\.1:(\d+)")
        ours = f"redis://127.0.0.1:{started.group(1)}/0"
        url = (await _line(proc, r"open (http://127\.0\.0\.1:\d+/)")).group(1)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # an IP host
            for _ in range(120):  # the engine loads torch and the model: the page says so until it is up
                info = await (await http.get(url + "info")).json()
                if info["engines"]:
                    break
                await asyncio.sleep(0.5)
            assert info["model"] == "tiny" and info["tiny"] and info["download"] == "stylebot weights download ffhq-256"
            await http.post(url + "nickname", json={"nickname": "newcomer"})
            form = aiohttp.FormData()
            form.add_field("photo", (FIXTURES / "faces" / "obama.jpg").read_bytes(), filename="me.jpg")
            reply = await (await http.post(url + "command", data=form)).json()
            assert reply["reply"].startswith("queued invert, position 1")
            async with http.get(url + "events") as events:
                result = None
                async for raw in events.content:
                    if raw.startswith(b"data: "):
                        ev = json.loads(raw[6:])
                        msgs = ev.get("messages", []) + ([ev["message"]] if "message" in ev else [])
                        result = next((m for m in msgs if m.get("media")), None)
                        if result:
                            break
            assert result["text"].startswith("your face in tiny: PSNR")
            image = await http.get(url + result["media"].lstrip("/"))
            assert image.content_type == "image/png" and len(await image.read()) > 100
    finally:
        proc.send_signal(signal.SIGINT)
        out = (await asyncio.wait_for(proc.stdout.read(), 90)).decode()
        code = await proc.wait()
    assert code == 0, out
    assert "stopped" in out
    assert not redis_answers(ours, 0.5), "the redis-server that run started is still running"
    assert (tmp_path / "redis" / "dump.rdb").exists()  # the latents were saved for the next run


def test_run_without_redis_says_how_to_get_one(tmp_path):
    cfg = _config(tmp_path, free_port())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(cfg), "run"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PATH": str(bin_dir)}, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: no Redis answers at redis://127.0.0.1:")
    assert "redis-server is not installed: install it (Debian/Ubuntu: sudo apt-get install redis-server" in proc.stderr
