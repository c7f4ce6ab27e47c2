"""A Telegram Bot API peer on loopback: the methods the adapter uses, with the real JSON shapes, and a way for a
test to act as Telegram's users (send a photo, a command, a reaction, press a button).

PTB talks to it through `base_url` / `base_file_url`; every call is recorded in `calls` as (method, params).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from aiohttp import web

from fakes import serve_on_loopback

BOT = {"id": 1000, "is_bot": True, "first_name": "stylebot", "username": "stylebot_bot", "can_join_groups": True,
       "can_read_all_group_messages": False, "supports_inline_queries": False}


def _error(code: int, description: str) -> web.Response:
    return web.json_response({"ok": False, "error_code": code, "description": description}, status=code)


class FakeTelegram:
    def __init__(self, token: str = "123:TEST"):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}               # file_id -> bytes served under /file/bot<token>/<id>
        self.sent: dict[int, dict] = {}                 # message_id -> Message the bot sent
        self._updates: list[dict] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(100)
        self._arrived = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""

    # -- server ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=50 * 2**20)
        app.router.add_post(f"/bot{self.token}/{{method}}", self._method)
        app.router.add_get(f"/file/bot{self.token}/{{path}}", self._file)
        self.runner, self.url = await serve_on_loopback(app)

    async def close(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()
        await self.runner.cleanup()

    async def _file(self, request: web.Request) -> web.Response:
        self.calls.append(("download", {"path": request.match_info["path"]}))
        data = self.files.get(request.match_info["path"])
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _method(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        form = await request.post()
        params: dict = {}
        for key, value in form.items():
            if hasattr(value, "file"):
                params[key] = {"filename": value.filename, "bytes": value.file.read()}
            else:
                try:
                    params[key] = json.loads(value)
                except (json.JSONDecodeError, TypeError):
                    params[key] = value
        if method != "getUpdates":
            self.calls.append((method, params))
        handler = getattr(self, f"m_{method}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        result = await handler(params)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"ok": True, "result": result})

    # -- Bot API methods -------------------------------------------------------------------------------------

    async def m_getMe(self, p):
        return BOT

    async def m_deleteWebhook(self, p):
        return True

    async def m_getUpdates(self, p):
        offset, timeout = int(p.get("offset", 0) or 0), float(p.get("timeout", 0) or 0)
        deadline = time.monotonic() + min(timeout, 2.0)
        async with self._arrived:
            while True:
                ready = [u for u in self._updates if u["update_id"] >= offset]
                if ready or time.monotonic() >= deadline:
                    return ready
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    pass

    def _bot_message(self, chat_id, **fields) -> dict:
        msg = {"message_id": next(self._message_ids), "date": int(time.time()), "from": BOT,
               "chat": {"id": int(chat_id), "type": "private", "first_name": "user"}, **fields}
        self.sent[msg["message_id"]] = msg
        return msg

    async def m_sendMessage(self, p):
        return self._bot_message(p["chat_id"], text=p["text"])

    async def m_editMessageText(self, p):
        msg = self.sent.get(int(p["message_id"]))
        if msg is None:
            return _error(400, "Bad Request: message to edit not found")
        if msg.get("text") == p["text"]:
            return _error(400, "Bad Request: message is not modified")
        msg["text"] = p["text"]
        return msg

    async def m_sendPhoto(self, p):
        file_id = f"sent{len(self.files)}"
        self.files[file_id] = p["photo"]["bytes"]
        size = {"file_id": file_id, "file_unique_id": file_id, "width": 32, "height": 32,
                "file_size": len(p["photo"]["bytes"])}
        return self._bot_message(p["chat_id"], photo=[size], caption=p.get("caption", ""))

    async def m_sendAnimation(self, p):
        file_id = f"sent{len(self.files)}"
        self.files[file_id] = p["animation"]["bytes"]
        anim = {"file_id": file_id, "file_unique_id": file_id, "width": 32, "height": 32, "duration": 1}
        return self._bot_message(p["chat_id"], animation=anim, caption=p.get("caption", ""))

    async def m_editMessageMedia(self, p):
        msg = self.sent.get(int(p["message_id"]))
        if msg is None:
            return _error(400, "Bad Request: message to edit not found")
        media = p["media"]
        attached = str(media.get("media", ""))
        if not attached.startswith("attach://") or attached[len("attach://"):] not in p:
            return _error(400, "Bad Request: wrong file identifier/HTTP URL specified")
        data = p[attached[len("attach://"):]]["bytes"]
        file_id = f"sent{len(self.files)}"
        self.files[file_id] = data
        for old in ("photo", "animation"):
            msg.pop(old, None)
        if media["type"] == "photo":
            msg["photo"] = [{"file_id": file_id, "file_unique_id": file_id, "width": 32, "height": 32,
                             "file_size": len(data)}]
        else:
            msg["animation"] = {"file_id": file_id, "file_unique_id": file_id, "width": 32, "height": 32,
                                "duration": 1}
        msg["caption"] = media.get("caption", "")
        if "reply_markup" in p:
            msg["reply_markup"] = p["reply_markup"]
        msg["edit_date"] = int(time.time())
        return msg

    async def m_answerCallbackQuery(self, p):
        return True

    async def m_getFile(self, p):
        file_id = p["file_id"]
        return {"file_id": file_id, "file_unique_id": file_id, "file_size": len(self.files.get(file_id, b"")),
                "file_path": file_id}

    # -- acting as users -------------------------------------------------------------------------------------

    async def push(self, update: dict) -> None:
        update["update_id"] = next(self._update_ids)
        async with self._arrived:
            self._updates.append(update)
            self._arrived.notify_all()

    @staticmethod
    def user(uid: int, username: str | None) -> dict:
        u = {"id": uid, "is_bot": False, "first_name": (username or "anon").title()}
        if username:
            u["username"] = username
        return u

    def message(self, user: dict, text: str = "", *, photo: bytes | None = None, document: tuple | None = None,
                reply_to: dict | None = None) -> dict:
        """A message as Telegram would deliver it; `document` = (file name, mime type, bytes, reported size)."""
        msg = {"message_id": next(self._message_ids), "date": int(time.time()), "from": user,
               "chat": {"id": user["id"], "type": "private", "first_name": user["first_name"]}}
        key = "caption" if photo is not None or document is not None else "text"
        if text:
            msg[key] = text
            if text.startswith("/"):
                msg[f"{key}_entities" if key == "caption" else "entities"] = [
                    {"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        if photo is not None:
            file_id = f"in{len(self.files)}"
            self.files[file_id] = photo
            msg["photo"] = [{"file_id": file_id, "file_unique_id": file_id, "width": 320, "height": 320,
                             "file_size": len(photo)}]
        if document is not None:
            name, mime, data, size = document
            file_id = f"in{len(self.files)}"
            self.files[file_id] = data
            msg["document"] = {"file_id": file_id, "file_unique_id": file_id, "file_name": name, "mime_type": mime,
                               "file_size": size}
        if reply_to is not None:
            msg["reply_to_message"] = reply_to
        return msg

    async def say(self, user: dict, text: str = "", **kw) -> dict:
        msg = self.message(user, text, **kw)
        await self.push({"message": msg})
        return msg

    async def react(self, user: dict, message_id: int, emoji: str, chat: dict | None = None) -> None:
        """A reaction in the user's private chat with the bot, or in `chat` (a group)."""
        await self.push({"message_reaction": {
            "chat": chat or {"id": user["id"], "type": "private", "first_name": user["first_name"]},
            "message_id": message_id, "user": user, "date": int(time.time()),
            "old_reaction": [], "new_reaction": [{"type": "emoji", "emoji": emoji}]}})

    async def press(self, user: dict, message: dict, data: str) -> None:
        await self.push({"callback_query": {"id": str(next(self._update_ids)), "from": user, "chat_instance": "1",
                                            "data": data, "message": message}})

    # -- waiting for the bot ---------------------------------------------------------------------------------

    async def wait_for(self, predicate, timeout: float = 60.0):
        """The first recorded call (method, params) matching `predicate`, waiting for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for call in self.calls[seen:]:
                if predicate(*call):
                    return call
            seen = 0
            await asyncio.sleep(0.05)
        raise AssertionError("no matching Bot API call; calls so far: "
                             + repr([(m, p.get("text") or p.get("caption")) for m, p in self.calls]))
