"""Discord on loopback: the REST routes and the gateway that discord.py uses, with Discord's JSON shapes, and a way
for a test to act as Discord's users (run a slash command, press a button, react with an emoji).

One aiohttp server on 127.0.0.1: REST under `/api/v10` (point `discord.http.Route.BASE` at `api_url`), the gateway
at `/gateway` (what `GET /gateway/bot` answers), attachments under `/attachments/...`. Every HTTP request is kept
in `calls` as a `Call`; gateway events carry sequence numbers and are sent only for the intents the client chose.
Like Discord, it wants `Authorization: Bot <token>` on bot routes, refuses a second response to an interaction,
and refuses an interaction's webhook once its token is 15 minutes old (by the interaction's snowflake).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import WSMsgType, web

from fakes import serve_on_loopback

DISCORD_EPOCH_MS = 1420070400000
TOKEN_LIFETIME_S = 15 * 60
INTENTS = {"guilds": 1 << 0, "guild_members": 1 << 1, "guild_presences": 1 << 8, "guild_messages": 1 << 9,
           "guild_message_reactions": 1 << 10, "direct_message_reactions": 1 << 13, "message_content": 1 << 15}
PRIVILEGED = INTENTS["guild_members"] | INTENTS["guild_presences"] | INTENTS["message_content"]
OPTION_TYPES = {"string": 3, "integer": 4, "user": 6, "attachment": 11}
EPHEMERAL, LOADING = 1 << 6, 1 << 7
CALL = web.RequestKey("call", "Call")


@dataclass
class Call:
    """One HTTP request the client made, and what the fake answered."""

    method: str
    path: str                           # below the API base, e.g. "/webhooks/1/abc/messages/@original"
    query: dict
    json: Any = None                    # the JSON body (or a multipart body's payload_json)
    files: list[tuple[str, bytes]] = field(default_factory=list)
    status: int = 200
    response: Any = None

    @property
    def content(self) -> str:
        """The text the request posts: a message's content, or an interaction response's."""
        body = self.json if isinstance(self.json, dict) else {}
        if self.path.endswith("/callback"):
            body = body.get("data") or {}
        return body.get("content") or ""


def _iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat()


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body only when Content-Type is exactly application/json (no charset)
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"message": message, "code": code}, status)


class FakeDiscord:
    def __init__(self, token: str = "MTAwMA.fake.bot-token"):
        self.token = token
        self.calls: list[Call] = []
        self.messages: dict[str, dict] = {}             # message id -> message (the bot's and the users')
        self.files: dict[str, bytes] = {}               # attachment path -> bytes served there
        self.commands: dict[str, dict] = {}             # name -> registered application command
        self.gateway_queries: list[dict] = []           # the query strings the gateway was opened with
        self.identify: dict | None = None
        self.ready = asyncio.Event()
        self._serial = itertools.count()
        self._seq = 0
        self._ws: web.WebSocketResponse | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._interactions: dict[str, dict] = {}        # token -> {id, created, channel_id, original, answered}
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.application_id = self.snowflake()
        self.bot = self.user(self.application_id, "stylebot", bot=True)
        self.guild_id, self.channel_id = self.snowflake(), self.snowflake()
        self.members: dict[str, dict] = {self.bot["id"]: self._member(self.bot)}

    # -- ids and shapes ---------------------------------------------------------------------------------------

    def snowflake(self, at: float | None = None) -> str:
        """A Discord id: milliseconds since 2015 in the top bits, so ids tell when they were made."""
        ms = int((time.time() if at is None else at) * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._serial) & 0x3FFFFF))

    @staticmethod
    def created(snowflake: str) -> float:
        return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000

    @staticmethod
    def user(uid: int | str, name: str, *, bot: bool = False) -> dict:
        return {"id": str(uid), "username": name, "discriminator": "0", "global_name": None if bot else name.title(),
                "avatar": None, "bot": bot, "public_flags": 0}

    @staticmethod
    def _member(user: dict) -> dict:
        return {"user": user, "roles": [], "joined_at": _iso(), "deaf": False, "mute": False, "flags": 0,
                "nick": None, "avatar": None, "pending": False, "premium_since": None}

    def join(self, user: dict) -> dict:
        """Make `user` a member of the guild; returns the member."""
        self.members[user["id"]] = self._member(user)
        return self.members[user["id"]]

    @property
    def channel(self) -> dict:
        return {"id": self.channel_id, "type": 0, "guild_id": self.guild_id, "name": "general", "position": 0,
                "permission_overwrites": [], "nsfw": False, "topic": None, "last_message_id": None,
                "rate_limit_per_user": 0, "parent_id": None, "flags": 0}

    @property
    def guild(self) -> dict:
        everyone = {"id": self.guild_id, "name": "@everyone", "permissions": "2248473465835073", "position": 0,
                    "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0, "icon": None,
                    "unicode_emoji": None}
        return {"id": self.guild_id, "name": "faces", "icon": None, "splash": None, "discovery_splash": None,
                "owner_id": next(iter(self.members)), "afk_channel_id": None, "afk_timeout": 300,
                "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
                "roles": [everyone], "emojis": [], "stickers": [], "features": [], "mfa_level": 0,
                "system_channel_id": self.channel_id, "system_channel_flags": 0, "rules_channel_id": None,
                "max_members": 500000, "vanity_url_code": None, "description": None, "banner": None,
                "premium_tier": 0, "premium_subscription_count": 0, "preferred_locale": "en-US",
                "public_updates_channel_id": None, "nsfw_level": 0, "premium_progress_bar_enabled": False,
                "joined_at": _iso(), "large": False, "unavailable": False, "member_count": len(self.members),
                "voice_states": [], "members": list(self.members.values()), "channels": [self.channel],
                "threads": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
                "soundboard_sounds": []}

    def _message(self, author: dict, content: str, *, channel_id: str | None = None, webhook: bool = False,
                 flags: int = 0, components: list | None = None, attachments: list | None = None,
                 reference: dict | None = None) -> dict:
        msg = {"id": self.snowflake(), "channel_id": channel_id or self.channel_id, "guild_id": self.guild_id,
               "author": author, "content": content, "timestamp": _iso(), "edited_timestamp": None, "tts": False,
               "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": attachments or [],
               "embeds": [], "pinned": False, "type": 19 if reference else 0, "flags": flags,
               "components": components or [], "history": [content]}
        if webhook:
            msg["webhook_id"] = self.application_id
            msg["application_id"] = self.application_id
        if reference:
            msg["message_reference"] = {"type": 0, **reference}
        self.messages[msg["id"]] = msg
        return msg

    def _attachments(self, channel_id: str, files: list[tuple[str, bytes]]) -> list[dict]:
        out = []
        for name, data in files:
            aid = self.snowflake()
            path = f"/attachments/{channel_id}/{aid}/{name}"
            self.files[path] = data
            kind = {"png": "image/png", "gif": "image/gif", "jpg": "image/jpeg"}.get(name.rpartition(".")[2])
            out.append({"id": aid, "filename": name, "size": len(data), "url": self.url + path,
                        "proxy_url": self.url + path, "content_type": kind or "application/octet-stream"})
        return out

    @staticmethod
    def _public(msg: dict) -> dict:
        return {k: v for k, v in msg.items() if k != "history"}

    # -- server -----------------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v10"

    async def start(self) -> None:
        app = web.Application(client_max_size=100 * 2**20, middlewares=[self._record])
        api = "/api/v10"
        r = app.router
        r.add_get(f"{api}/gateway/bot", self.gateway_bot)
        r.add_get(f"{api}/users/@me", self.users_me)
        r.add_get(f"{api}/oauth2/applications/@me", self.application_me)
        r.add_put(f"{api}/applications/{{app}}/commands", self.put_commands)
        r.add_put(f"{api}/applications/{{app}}/guilds/{{guild}}/commands", self.put_commands)
        r.add_post(f"{api}/interactions/{{iid}}/{{token}}/callback", self.callback)
        r.add_route("*", f"{api}/webhooks/{{app}}/{{token}}/messages/{{mid}}", self.webhook_message)
        r.add_post(f"{api}/webhooks/{{app}}/{{token}}", self.followup)
        r.add_post(f"{api}/channels/{{cid}}/messages", self.channel_post)
        r.add_route("*", f"{api}/channels/{{cid}}/messages/{{mid}}", self.channel_message)
        r.add_get("/attachments/{cid}/{aid}/{name}", self.download)
        r.add_get("/gateway", self.gateway)
        r.add_route("*", "/{tail:.*}", self.unknown)
        self.runner, self.url = await serve_on_loopback(app)

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)
        await self.runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler):
        if request.path == "/gateway":
            return await handler(request)
        call = Call(request.method, request.path.removeprefix("/api/v10"), dict(request.query))
        if request.content_type == "application/json":
            call.json = await request.json()
        elif request.content_type.startswith("multipart/"):
            form = await request.post()
            for key, value in form.items():
                if key == "payload_json":
                    call.json = json.loads(value)
                elif hasattr(value, "file"):
                    call.files.append((value.filename, value.file.read()))
        self.calls.append(call)
        request[CALL] = call
        if request.path.startswith("/api/v10/") and not request.path.startswith(("/api/v10/webhooks/",
                                                                                 "/api/v10/interactions/")):
            if request.headers.get("Authorization") != f"Bot {self.token}":
                call.status = 401
                return _error(401, 0, "401: Unauthorized")
        resp = await handler(request)
        call.status = resp.status
        if isinstance(resp, web.Response) and resp.body and resp.content_type == "application/json":
            call.response = json.loads(resp.body)
        return resp

    async def unknown(self, request: web.Request) -> web.Response:
        return _error(404, 0, "404: Not Found")

    # -- REST: login, commands ---------------------------------------------------------------------------------

    async def gateway_bot(self, request):
        return _json({"url": self.url.replace("http", "ws", 1) + "/gateway", "shards": 1,
                      "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14400000,
                                              "max_concurrency": 1}})

    async def users_me(self, request):
        return _json({**self.bot, "verified": True, "mfa_enabled": False, "flags": 0, "locale": "en-US"})

    async def application_me(self, request):
        return _json({"id": self.application_id, "name": "stylebot", "icon": None, "description": "",
                      "bot_public": True, "bot_require_code_grant": False, "verify_key": "00" * 32,
                      "owner": self.user(self.snowflake(), "owner"), "team": None, "flags": 0, "summary": "",
                      "bot": self.bot, "interactions_endpoint_url": None, "tags": [],
                      "install_params": None, "custom_install_url": None})

    async def put_commands(self, request):
        registered = []
        for cmd in request[CALL].json or []:
            out = {"id": self.snowflake(), "application_id": self.application_id, "version": self.snowflake(),
                   "default_member_permissions": None, "type": 1, "nsfw": False, "options": [],
                   "guild_id": request.match_info.get("guild"), **cmd}
            registered.append(out)
        self.commands = {c["name"]: c for c in registered}
        return _json(registered)

    # -- REST: interactions and their webhooks ----------------------------------------------------------------

    def _token(self, token: str) -> tuple[dict | None, web.Response | None]:
        ix = self._interactions.get(token)
        if ix is None:
            return None, _error(404, 10015, "Unknown Webhook")
        if time.time() - ix["created"] > TOKEN_LIFETIME_S or ix["uses_left"] == 0:
            return None, _error(401, 50027, "Invalid Webhook Token")
        if ix["uses_left"] is not None:
            ix["uses_left"] -= 1
        return ix, None

    async def callback(self, request):
        token = request.match_info["token"]
        ix = self._interactions.get(token)
        if ix is None or ix["id"] != request.match_info["iid"]:
            return _error(404, 10062, "Unknown interaction")
        if ix["answered"]:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        ix["answered"] = True
        body = request[CALL].json or {}
        kind, data = body.get("type"), body.get("data") or {}
        info = {"id": ix["id"], "type": ix["type"]}
        if kind in (4, 5):  # a message (5: "stylebot is thinking...", edited later)
            flags = (data.get("flags") or 0) | (LOADING if kind == 5 else 0)
            msg = self._message(self.bot, data.get("content") or "", channel_id=ix["channel_id"], webhook=True,
                                flags=flags, components=data.get("components"))
            msg["interaction_metadata"] = {"id": ix["id"], "type": ix["type"], "user": ix["user"],
                                           "authorizing_integration_owners": {"0": self.guild_id}}
            ix["original"] = msg["id"]
            info.update(response_message_id=msg["id"], response_message_loading=kind == 5,
                        response_message_ephemeral=bool(flags & EPHEMERAL))
            return _json({"interaction": info, "resource": {"type": kind, "message": self._public(msg)}})
        return _json({"interaction": info})

    async def webhook_message(self, request):
        ix, refused = self._token(request.match_info["token"])
        if refused:
            return refused
        mid = request.match_info["mid"]
        mid = ix.get("original") if mid == "@original" else mid
        msg = self.messages.get(mid or "")
        if msg is None or mid not in ix["messages"] | {ix.get("original")}:
            return _error(404, 10008, "Unknown Message")
        if request.method == "GET":
            return _json(self._public(msg))
        if request.method == "DELETE":
            del self.messages[mid]
            return web.Response(status=204)
        return self._edit(msg, request[CALL])

    def _edit(self, msg: dict, call: Call) -> web.Response:
        body = call.json or {}
        if "content" in body:
            msg["content"] = body["content"] or ""
            msg["history"].append(msg["content"])
        if "components" in body:
            msg["components"] = body["components"]
        if call.files:
            msg["attachments"] = self._attachments(msg["channel_id"], call.files)
        msg["flags"] &= ~LOADING
        msg["edited_timestamp"] = _iso()
        return _json(self._public(msg))

    async def followup(self, request):
        ix, refused = self._token(request.match_info["token"])
        if refused:
            return refused
        if not ix["answered"]:
            return _error(404, 10015, "Unknown Webhook")  # follow-ups come after the first response
        call = request[CALL]
        body = call.json or {}
        msg = self._message(self.bot, body.get("content") or "", channel_id=ix["channel_id"], webhook=True,
                            flags=body.get("flags") or 0, components=body.get("components"),
                            attachments=self._attachments(ix["channel_id"], call.files))
        ix["messages"].add(msg["id"])
        return _json(self._public(msg))

    # -- REST: channels ----------------------------------------------------------------------------------------

    async def channel_post(self, request):
        cid = request.match_info["cid"]
        if cid != self.channel_id:
            return _error(404, 10003, "Unknown Channel")
        call = request[CALL]
        body = call.json or {}
        ref = body.get("message_reference")
        if ref and str(ref.get("message_id")) not in self.messages and ref.get("fail_if_not_exists", True):
            return _error(400, 50035, "Invalid Form Body")
        msg = self._message(self.bot, body.get("content") or "", channel_id=cid, components=body.get("components"),
                            attachments=self._attachments(cid, call.files),
                            reference={"message_id": str(ref["message_id"]), "channel_id": cid} if ref else None)
        msg["allowed_mentions"] = body.get("allowed_mentions")
        return _json(self._public(msg))

    async def channel_message(self, request):
        msg = self.messages.get(request.match_info["mid"])
        if msg is None or msg["channel_id"] != request.match_info["cid"]:
            return _error(404, 10008, "Unknown Message")
        if request.method == "GET":
            return _json(self._public(msg))
        if msg["author"]["id"] != self.bot["id"]:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        return self._edit(msg, request[CALL])

    async def download(self, request):
        data = self.files.get(request.path)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def downloads(self, name: str | None = None) -> list[Call]:
        """The attachment downloads the client made (of files called `name`)."""
        return [c for c in self.calls if c.path.startswith("/attachments/")
                and (name is None or c.path.endswith(f"/{name}"))]

    # -- gateway ------------------------------------------------------------------------------------------------

    async def gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        self.gateway_queries.append(dict(request.query))
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None}))
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(frame.data)
                op, d = payload.get("op"), payload.get("d")
                if op == 1:
                    await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
                elif op == 2:
                    await self._identified(ws, d)
                elif op == 6:
                    self._ws = ws
                    await self.dispatch("RESUMED", {})
        finally:
            self._sockets.discard(ws)
            if self._ws is ws:
                self._ws = None
                self.ready.clear()
        return ws

    async def _identified(self, ws: web.WebSocketResponse, d: dict) -> None:
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if int(d.get("intents", 0)) & PRIVILEGED:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        self.identify = d
        self._ws = ws
        shard = d.get("shard") or [0, 1]
        await self.dispatch("READY", {
            "v": 10, "user": {**self.bot, "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": self.guild_id, "unavailable": True}], "session_id": secrets.token_hex(16),
            "resume_gateway_url": self.url.replace("http", "ws", 1) + "/gateway", "shard": shard,
            "application": {"id": self.application_id, "flags": 0}, "private_channels": [], "relationships": [],
            "user_settings": {}, "presences": [], "geo_ordered_rtc_regions": [], "guild_join_requests": [],
            "session_type": "normal", "auth_session_id_hash": "", "_trace": ["fake-gateway"]})
        if self._has("guilds"):
            await self.dispatch("GUILD_CREATE", self.guild)
        self.ready.set()

    def _has(self, intent: str) -> bool:
        return bool(int((self.identify or {}).get("intents", 0)) & INTENTS[intent])

    async def dispatch(self, event: str, data: dict) -> int:
        """Send a DISPATCH (op 0) with the next sequence number; returns the number."""
        assert self._ws is not None, "no client is connected to the gateway"
        self._seq += 1
        await self._ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))
        return self._seq

    # -- acting as users ------------------------------------------------------------------------------------------

    def attachment(self, filename: str, content_type: str, data: bytes, size: int | None = None) -> dict:
        """An uploaded file, served on this server; `size` is what Discord reports (default: the real size)."""
        aid = self.snowflake()
        path = f"/attachments/{self.channel_id}/{aid}/{filename}"
        self.files[path] = data
        return {"id": aid, "filename": filename, "size": len(data) if size is None else size,
                "url": self.url + path, "proxy_url": self.url + path, "content_type": content_type,
                "ephemeral": True}

    def _interaction(self, user: dict, kind: int, data: dict, *, token_uses: int | None = None, **extra) -> dict:
        iid, token = self.snowflake(), "aW50ZXJhY3Rpb246" + secrets.token_hex(24)
        member = {**(self.members.get(user["id"]) or self.join(user)), "permissions": "2248473465835073"}
        ix = {"id": iid, "application_id": self.application_id, "type": kind, "data": data, "token": token,
              "version": 1, "guild_id": self.guild_id, "guild": {"id": self.guild_id, "locale": "en-US",
                                                                  "features": []},
              "channel_id": self.channel_id, "channel": self.channel, "member": member, "locale": "en-US",
              "guild_locale": "en-US", "app_permissions": "2248473465835073", "entitlements": [],
              "authorizing_integration_owners": {"0": self.guild_id}, "context": 0,
              "attachment_size_limit": 10 * 2**20, **extra}
        self._interactions[token] = {"id": iid, "type": kind, "created": self.created(iid), "user": user,
                                     "channel_id": self.channel_id, "answered": False, "messages": set(),
                                     "uses_left": token_uses}
        return ix

    async def slash(self, user: dict, name: str, *, token_uses: int | None = None, **options) -> dict:
        """`user` runs /name with options as registered (attachment: a dict from `attachment`; user: a user dict).

        `token_uses`: webhook requests the interaction's token allows before it expires (as it does after 15
        minutes), to act out a job that waited in the queue for longer than that.
        """
        cmd = self.commands.get(name)
        assert cmd is not None, f"/{name} was not registered; registered: {sorted(self.commands)}"
        kinds = {o["name"]: o["type"] for o in cmd.get("options", [])}
        given, resolved = [], {}
        for key, value in options.items():
            assert key in kinds, f"/{name} has no option {key!r}; it has {sorted(kinds)}"
            kind = kinds[key]
            if kind == OPTION_TYPES["attachment"]:
                resolved.setdefault("attachments", {})[value["id"]] = value
                value = value["id"]
            elif kind == OPTION_TYPES["user"]:
                resolved.setdefault("users", {})[value["id"]] = value
                member = {k: v for k, v in (self.members.get(value["id"]) or self.join(value)).items() if k != "user"}
                resolved.setdefault("members", {})[value["id"]] = {**member, "permissions": "0"}
                value = value["id"]
            given.append({"name": key, "type": kind, "value": value})
        data = {"id": cmd["id"], "name": name, "type": 1, "options": given}
        if resolved:
            data["resolved"] = resolved
        ix = self._interaction(user, 2, data, token_uses=token_uses)
        await self.dispatch("INTERACTION_CREATE", ix)
        return ix

    async def press(self, user: dict, message: dict, custom_id: str) -> dict:
        """`user` presses the button `custom_id` under `message`."""
        ids = [c.get("custom_id") for row in message.get("components", []) for c in row.get("components", [])]
        assert custom_id in ids, f"the message has no button {custom_id!r}; it has {ids}"
        ix = self._interaction(user, 3, {"custom_id": custom_id, "component_type": 2},
                               message=self._public(message))
        await self.dispatch("INTERACTION_CREATE", ix)
        return ix

    def posted_earlier(self, text: str, components: list | None = None) -> dict:
        """A message the bot posted before this client started (say, a result before a restart)."""
        return self._message(self.bot, text, webhook=True, components=components)

    def say(self, user: dict, text: str) -> dict:
        """A message `user` wrote in the channel (the bot, without the message intents, is not told)."""
        return self._message(user, text)

    async def react(self, user: dict, message: dict, emoji: str) -> int | None:
        """`user` reacts to `message` with a unicode emoji; None when the client's intents exclude the event."""
        if not self._has("guild_message_reactions"):
            return None
        member = self.members.get(user["id"]) or self.join(user)
        return await self.dispatch("MESSAGE_REACTION_ADD", {
            "user_id": user["id"], "type": 0, "message_id": message["id"],
            "message_author_id": message["author"]["id"], "member": member, "emoji": {"id": None, "name": emoji},
            "channel_id": message["channel_id"], "guild_id": self.guild_id, "burst": False, "burst_colors": []})

    # -- waiting for the client -----------------------------------------------------------------------------------

    async def wait_for(self, predicate, timeout: float = 60.0, after: int = 0) -> Call:
        """The first call (from index `after`) that matches `predicate`, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for call in self.calls[after:]:
                if predicate(call):
                    return call
            await asyncio.sleep(0.05)
        raise AssertionError("no matching request; requests so far:\n" + "\n".join(
            f"{c.method} {c.path} {c.status} {c.content!r}" for c in self.calls))

    def interaction(self, token: str) -> dict:
        """What the fake knows of an interaction: its original response's id, its follow-ups' ids."""
        return self._interactions[token]
