"""The local web chat (aiohttp): one page, no build step, what a newcomer sees first.

A visitor is identified by a random cookie and a nickname they choose, so two browser tabs (two people) can
/share and /morph each other. Commands go to the bot core exactly as the chat platforms' do; answers come back
through the same `EventPump` and reach the browser as server-sent events. The chat log, the results' images,
GIFs and aligned crops live in Redis under the user's keys (`WebHistory`), with the results' TTL, deleted by /forget: a
visitor who comes back after restarts of the web chat finds the conversation, and a result is acknowledged only once
it is stored there. Progress (and previews) are shown live and not kept.

Binds to 127.0.0.1 unless told otherwise; uploads are capped by size before they are read whole; the page
shows everything users typed with `textContent`, never as HTML, under a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import BodyPartReader, web
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeoutError

from adapters.base import EventPump, Result
from bot.core import ACTIONS, BotCore, Command, human_size, redis_refusal
from storage.errors import command as cli_command
from storage.records import Origin
from storage.web_history import WebHistory

log = logging.getLogger("stylebot.web")

STATIC = Path(__file__).parent / "static"
COOKIE = "stylebot_session"
NICKNAME = re.compile(r"[A-Za-z0-9_]{2,24}")
DOWNLOAD_HINT = "weights download ffhq-256"
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                      "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
MAX_TEXT_CHARS = 4096  # a chat line, as Telegram bounds a message: every reply that repeats part of it fits too
MAX_IDLE_VISITORS = 1000  # visitors kept in memory without an open page (each holds up to LOG_SIZE messages)
LOG_SIZE = 200  # messages kept per visitor (in Redis and in memory); the images of older ones go with them


def media_type(data: bytes) -> str:
    return "image/gif" if data[:4] == b"GIF8" else "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"


def derived_id(job_id: str, what: str, length: int) -> str:
    """An id made from a job's: a result posted again (after a crash before its acknowledgement) replaces itself."""
    return hashlib.sha256(f"{job_id}:{what}".encode()).hexdigest()[:length]


@dataclass
class Visitor:
    """One browser identity: its chat log (as Redis keeps it, loaded at its first request), its open event streams."""

    user_id: str
    nickname: str = ""
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_SIZE))
    streams: set = field(default_factory=set)                   # asyncio.Queue per open /events
    named: bool = False                                         # nickname read from Redis (or chosen here)
    loaded: bool = False                                        # chat log read from Redis
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)

    @staticmethod
    def new(by: str, text: str, message_id: str | None = None, **extra) -> dict:
        return {"id": message_id or uuid.uuid4().hex[:12], "by": by, "text": text, "time": time.time(), **extra}

    def show(self, msg: dict) -> None:
        """Add a message to the log (or replace the one with its id) and send it to the open pages."""
        for i, old in enumerate(self.log):
            if old["id"] == msg["id"]:
                self.log[i] = msg
                self.push({"type": "update", "message": msg})
                return
        self.log.append(msg)
        self.push({"type": "message", "message": msg})

    def find(self, message_id: str) -> dict | None:
        return next((msg for msg in self.log if msg["id"] == message_id), None)

    def update(self, message_id: str, **changes) -> None:
        """Change a message on the open pages and in memory only (progress: shown live, not kept)."""
        msg = self.find(message_id)
        if msg is not None:
            msg.update(changes)
            self.push({"type": "update", "message": msg})

    def push(self, event: dict) -> None:
        for q in list(self.streams):
            q.put_nowait(event)


class WebChat:
    """The aiohttp application and the `Platform` the event pump posts to."""

    name = "web"

    def __init__(self, core: BotCore):
        self.core = core
        self.history = WebHistory(core.queue, ttl_s=core.chat.result_ttl_s, size=LOG_SIZE)
        self.visitors: OrderedDict[str, Visitor] = OrderedDict()  # the most recently seen last
        self.max_idle_visitors = MAX_IDLE_VISITORS
        self.app = web.Application(client_max_size=core.limits.max_photo_bytes + 2**20,
                                   middlewares=[_security_headers])
        self.app.add_routes([
            web.get("/", self.page), web.get("/info", self.info), web.post("/nickname", self.nickname),
            web.post("/command", self.command), web.post("/react", self.react), web.get("/events", self.events),
            web.get("/media/{media_id}", self.media), web.static("/static", STATIC),
        ])

    # -- identity --------------------------------------------------------------------------------------------

    async def visitor(self, request: web.Request) -> tuple[Visitor, str | None]:
        """The visitor behind a request (and a new cookie to set when it had none)."""
        user_id, new = self.identity(request)
        return await self._visitor(user_id), new

    @staticmethod
    def identity(request: web.Request) -> tuple[str, str | None]:
        """The user id behind a request's cookie (and a new cookie to set when it had none), without Redis."""
        token = request.cookies.get(COOKIE, "")
        new = None
        if not re.fullmatch(r"[A-Za-z0-9_-]{20,64}", token):
            token = new = secrets.token_urlsafe(24)
        return "web:" + hashlib.sha256(token.encode()).hexdigest()[:20], new

    async def _visitor(self, user_id: str) -> Visitor:
        """The visitor with this id, made if need be, with the nickname and the chat log Redis knows (they outlive
        restarts)."""
        v = self.visitors.get(user_id)
        if v is None:
            v = self.visitors[user_id] = Visitor(user_id)
            self._forget_idle()
        self.visitors.move_to_end(user_id)
        if not v.loaded:
            async with v.loading:
                if not v.loaded:  # not loaded meanwhile
                    v.log.extendleft(reversed(await self.history.load(user_id)))
                    v.loaded = True
        if not v.named:
            known = await self.core.store.name_of("web", user_id)
            if not v.named:  # not chosen meanwhile
                v.nickname, v.named = known, True
        return v

    def _forget_idle(self) -> None:
        """Keep at most `max_idle_visitors` visitors without an open page in memory, dropping those seen longest
        ago: everything of theirs is in Redis and comes back at their next request (every request without a cookie
        makes a visitor)."""
        idle = [uid for uid, v in self.visitors.items() if not v.streams]
        for uid in idle[:max(0, len(idle) - self.max_idle_visitors)]:
            del self.visitors[uid]

    @staticmethod
    def _json(data: dict, new_cookie: str | None = None, status: int = 200) -> web.Response:
        resp = web.json_response(data, status=status)
        if new_cookie:
            resp.set_cookie(COOKIE, new_cookie, httponly=True, samesite="Strict", max_age=365 * 86400)
        return resp

    # -- pages and API ---------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        """The page itself: static, so it loads while Redis is away (its /info and /events then say why)."""
        _, new = self.identity(request)
        resp = web.FileResponse(STATIC / "index.html")
        if new:
            resp.set_cookie(COOKIE, new, httponly=True, samesite="Strict", max_age=365 * 86400)
        return resp

    async def info(self, request: web.Request) -> web.Response:
        """Which model the engine runs (and whether it has random weights: blurry faces, edits that ignore their
        words), whether it is online (or being restarted), who you are."""
        v, new = await self.visitor(request)
        engines = await self.core.queue.engines_online()
        engine, model = next(iter(engines.items()), (None, None))
        tiny = engine is not None and await self.core.queue.random_weights(engine)
        first = engine is not None and await self.core.queue.first_answers(engine)
        restarting = not engines and await self.core.queue.restarting()
        return self._json({"nickname": v.nickname, "engines": len(engines), "model": model,
                           "restarting": restarting, "tiny": tiny, "download": cli_command(DOWNLOAD_HINT),
                           "first_answers": first, "preparing": "" if first else await self.core.queue.preparing(),
                           "max_photo_bytes": self.core.limits.max_photo_bytes,
                           "actions": {a: getattr(self.core.chat, f"{a}_emoji").split()[0] for a in ACTIONS}}, new)

    async def nickname(self, request: web.Request) -> web.Response:
        """Choose the name others use to /morph with you."""
        v, new = await self.visitor(request)
        body = await _json_object(request)
        if body is None:
            return self._json({"error": "send JSON like {\"nickname\": \"alice\"}"}, new, 400)
        name = body.get("nickname", "")
        name = name.strip().lstrip("@") if isinstance(name, str) else ""  # null, true, 7: not a name
        if not NICKNAME.fullmatch(name):
            return self._json({"error": "a nickname is 2 to 24 Latin letters (a-z), digits or _"}, new, 400)
        if name.lower() == "me" or await self.core.claim_name("web", v.user_id, name):  # atomic: one winner
            return self._json({"error": f"@{name} is taken: choose another nickname"}, new, 409)
        v.nickname, v.named = name, True
        return self._json({"nickname": name}, new)

    async def command(self, request: web.Request) -> web.Response:
        """A chat line, with an optional photo (multipart: `text`, `photo`)."""
        v, new = await self.visitor(request)
        if not v.nickname:
            return self._json({"error": "choose a nickname first"}, new, 400)
        limit = self.core.limits.max_photo_bytes
        if request.content_length and request.content_length > limit + 2**16:
            return self._json({"error": f"that upload is {human_size(request.content_length)}; "
                                        f"send a photo under {human_size(limit)}"}, new, 413)
        text, photo, photo_name, photos = "", None, "", 0
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):  # a multipart inside the form: no browser sends one
                    raise ValueError("nested multipart")
                if part.name == "text":
                    raw = await _read_capped(part, 2**20)  # read whole up to 1 MiB, to say how long it is
                    try:
                        text = "" if raw is None else bytes(part.decode(raw)).decode("utf-8")  # its transfer encoding
                    except UnicodeDecodeError:
                        return self._json({"error": "send the text as UTF-8"}, new, 400)
                    if raw is None or len(text) > MAX_TEXT_CHARS:
                        size = f"{len(text):,} characters long" if raw is not None else "over 1 MiB"
                        return self._json({"error": f"that message is {size}; keep it under "
                                                    f"{MAX_TEXT_CHARS:,} characters"}, new, 413)
                elif part.name == "photo" and part.filename:
                    photos += 1
                    data = await _read_capped(part, limit)
                    if data is None:
                        return self._json({"error": f"send a photo under {human_size(limit)}"}, new, 413)
                    if photos == 1:  # the others are only counted, for the answer
                        photo_name, photo = part.filename, data
        except (ValueError, AssertionError, RuntimeError):  # RuntimeError: an unknown transfer encoding
            return self._json({"error": "send the form as multipart/form-data"}, new, 400)
        if photos > 1:
            return self._json({"error": f"send one photo per /invert (this message has {photos})"}, new, 400)
        text = text.strip() or ("/invert" if photo else "")
        if not text:
            return self._json({"error": "type a command, e.g. /help"}, new, 400)
        extra = {"attachment": photo_name[:80]} if photo is not None else {}
        said = v.new("you", text, **extra)
        v.show(said)
        reply = await self.core.handle(Command("web", v.user_id, v.nickname, text, photo=photo,
                                               origin=Origin(user=v.user_id)))
        await self._acknowledge(v, reply, said)
        return self._json({"reply": reply.text, "job_id": reply.job_id}, new)

    async def react(self, request: web.Request) -> web.Response:
        """A button under a result: stronger, weaker, refine or redo."""
        v, new = await self.visitor(request)
        body = await _json_object(request)
        if body is None or "message" not in body or "action" not in body:
            return self._json({"error": "send JSON like {\"message\": ID, \"action\": \"stronger\"}"}, new, 400)
        message_id, action = str(body["message"]), str(body["action"])
        reply = await self.core.react_message("web", v.user_id, message_id, action, origin=Origin(user=v.user_id))
        await self._acknowledge(v, reply)
        return self._json({"reply": reply.text, "job_id": reply.job_id}, new)

    async def _acknowledge(self, v: Visitor, reply, said: dict | None = None) -> None:
        """Show the bot's reply (kept in the history with what the visitor said, best effort: a Redis too busy to
        keep it does not undo the command)."""
        msg = v.new("bot", reply.text, job=reply.job_id)
        if reply.forgotten:  # /forget: the chat log and the nickname go from this process too; nothing is kept
            v.log.clear()
            v.nickname, v.named = "", False
            v.push({"type": "reset"})
        else:
            try:
                await self.history.write(v.user_id, [m for m in (said, msg) if m is not None])
            except RedisError as e:
                log.warning("could not keep a web chat exchange in its history: %s", e)
        v.show(msg)
        if reply.job_id:
            asyncio.ensure_future(self.core.set_status_message(v.user_id, reply.job_id, msg["id"]))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the chat log so far, then every new or updated message."""
        v, _ = await self.visitor(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **HEADERS})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue()
        v.streams.add(q)
        try:
            await _send(resp, {"type": "history", "messages": list(v.log)})
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), 15)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await _send(resp, event)
                if event["type"] == "bye":
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            v.streams.discard(q)
        return resp

    async def media(self, request: web.Request) -> web.Response:
        """A result's image or GIF (or the aligned crop beside it); only its owner's cookie sees it. A GIF's link
        ends in .gif, so that a link whose GIF is gone says what it was."""
        v, _ = await self.visitor(request)
        m = re.fullmatch(r"([0-9a-f]{32})(\.gif)?", request.match_info["media_id"])
        data = await self.history.media(v.user_id, m.group(1)) if m else None
        if data is None:
            what, kept = "animation" if m and m.group(2) else "image", _duration(self.core.chat.result_ttl_s)
            raise web.HTTPNotFound(text=f"that {what} is not here: I keep results for {kept} (/forget deletes them at "
                                        "once), and only the browser they were shown in can open them")
        return web.Response(body=data, content_type=media_type(data),
                            headers={"Cache-Control": "private, max-age=86400"})

    # -- Platform --------------------------------------------------------------------------------------------

    def _owner(self, origin: Origin) -> Visitor | None:
        return self.visitors.get(origin.user)

    async def show_progress(self, origin: Origin, text: str, preview: bytes | None) -> None:
        v = self._owner(origin)
        if v is None or not origin.status:
            return
        changes: dict = {"text": text, "progress": ""}  # the bubble stops saying "waiting behind 2 jobs"
        if preview:
            changes["preview"] = "data:image/jpeg;base64," + base64.b64encode(preview).decode()
        v.update(origin.status, **changes)

    async def show_notice(self, origin: Origin, text: str) -> None:
        """A line in the visitor's chat, kept in their history while they share (not after /unshare or /forget)."""
        v = await self._visitor(origin.user)
        msg = v.new("bot", text)
        if await self.history.write(v.user_id, [msg], while_sharing=True):
            v.show(msg)

    async def show_result(self, origin: Origin, result: Result) -> str | None:
        """Store the result in the visitor's history, then show it: a result is acknowledged only once kept (a
        failed write raises, and the pump tries again). Nothing is written for a user who said /forget meanwhile."""
        v = await self._visitor(origin.user)  # perhaps posted before the browser came back
        changed = []
        status = v.find(origin.status) if origin.status else None
        if status is not None:  # the acknowledgement stops saying "waiting" or "step 20 of 40"
            doing = origin.doing or origin.op or "your job"
            said = "first answer shown, refining it" if result.first else "done" if result.ok else "stopped"
            changed.append({**status, "text": f"{doing}: {said}", "progress": "", "preview": ""})
        # a job answered first has two answers in one bubble (the same id): the refined one replaces the first
        message_id = derived_id(result.job_id, "message", 12)
        first = v.find(message_id) if origin.answer else None
        media: dict[str, bytes] = {}
        if not result.ok:
            msg = v.new("bot", f"couldn't do that: {result.text}",
                        derived_id(result.job_id, "failure", 12) if origin.answer else message_id, error=True)
            if first is not None and first.get("first"):  # the first answer stays: it no longer says "refining"
                text = re.sub(r"\nrefining it now \(.*$", "\nthe refinement stopped (below)", first["text"])
                changed.append({**first, "text": text, "first": False, "stopped": True})
        else:
            extra: dict = {"first": True} if result.first else {}
            shown_first = first and (first.get("first_media") or first.get("first") and first.get("media"))
            if shown_first:  # the bubble keeps the first answer, small, beside the refined one
                extra["first_media"] = shown_first
            if result.payload:
                name = derived_id(result.job_id, "first" if result.first else "result", 32)
                media[name] = result.payload
                gif = ".gif" if result.media == "animation" else ""
                extra["media"] = f"/media/{name}{gif}"
                extra["filename"] = result.filename
            crop = (await self.core.aligned_crop(result.user_id, result.result_id)
                    if result.shows == "face" else None)
            if crop:  # what the bot saw: the aligned face crop, shown beside the reconstruction
                media[derived_id(result.job_id, "aligned", 32)] = crop
                extra["aligned"] = f"/media/{derived_id(result.job_id, 'aligned', 32)}"
            msg = v.new("bot", result.text, message_id, actions=list(result.actions), model=result.model, **extra)
        if not await self.history.write(v.user_id, [msg], changed, media=media, answering=result.job_id):
            return None  # the user said /forget since the pump read where the answer goes: nobody to answer
        for m in (*changed, msg):
            v.show(m)
        return msg["id"] if result.ok else None


@web.middleware
async def _security_headers(request: web.Request, handler):
    try:
        resp = await handler(request)
    except (RedisConnectionError, RedisTimeoutError) as e:  # Redis away, or no free connection in time ("busy")
        resp = web.json_response({"error": redis_refusal(request.path, e).text}, status=503,
                                 headers={"Retry-After": "5"})
    except web.HTTPRequestEntityTooLarge:  # a body past client_max_size, sent without its length: the page's line
        resp = web.json_response({"error": "that upload is too big: send one photo and a short message"}, status=413)
    if not isinstance(resp, web.StreamResponse) or not resp.prepared:
        resp.headers.update(HEADERS)
    return resp


def _duration(seconds: int) -> str:
    """'7 days', '1 hour', '90 minutes': how long something is kept, in words."""
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}{'s' * (seconds != size)}"
    return f"{round(seconds / 60)} minutes"


async def _json_object(request: web.Request) -> dict | None:
    """The request's body as a JSON object, or None when it is not one (not JSON, not UTF-8, not an object)."""
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors; [[[[...
        return None
    return body if isinstance(body, dict) else None


async def _read_capped(part, limit: int) -> bytes | None:
    """A multipart file, or None as soon as it grows past `limit` bytes."""
    chunks, size = [], 0
    while chunk := await part.read_chunk(2**16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _send(resp: web.StreamResponse, event: dict) -> None:
    await resp.write(f"data: {json.dumps(event)}\n\n".encode())


async def serve(core: BotCore, host: str, port: int, stop: asyncio.Event,
                started: asyncio.Future | None = None) -> None:
    """Run the web chat and its event pump until `stop` is set. `started` gets the bound URL."""
    chat = WebChat(core)
    runner = web.AppRunner(chat.app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound[1]}/"
    if started is not None:
        started.set_result(url)
    pump = asyncio.create_task(EventPump(core, chat).run(stop))
    try:
        await stop.wait()
    finally:
        for v in chat.visitors.values():  # end the open event streams so the server can close
            v.push({"type": "bye"})
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        await runner.cleanup()
