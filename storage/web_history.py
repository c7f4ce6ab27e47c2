"""The web chat's history in Redis: each visitor's chat log and the images it shows, under the user's keys."""

from __future__ import annotations

import json
import time

from storage import lua
from storage.queue import JobQueue


class WebHistory:
    """Each visitor's chat log (`Keys.web_log`, JSON messages, each an object whose first key is its "id") and the
    images it shows (`Keys.web_media`), beside the queue's keys: they live `ttl_s` (the log from its last message),
    the log keeps the newest `size` messages, and /forget deletes them (they are listed in the user's index)."""

    def __init__(self, queue: JobQueue, *, ttl_s: int, size: int):
        self.r, self.keys, self.ttl_s, self.size = queue.r, queue.keys, ttl_s, size
        self.index_ttl_s = max(queue.index_ttl_s, ttl_s)  # the index outlives every key it lists
        self._write = lua.WEB_WRITE.register(queue.r)

    async def load(self, user_id: str) -> list[dict]:
        """The visitor's messages, oldest first (unreadable ones skipped)."""
        out = []
        for raw in await self.r.lrange(self.keys.web_log(user_id), 0, -1):
            try:
                msg = json.loads(raw)
                msg["id"]
            except (ValueError, TypeError, KeyError):
                continue
            out.append(msg)
        return out

    async def write(self, user_id: str, add: list[dict] = (), replace: list[dict] = (), *,
                    media: dict[str, bytes] | None = None, answering: str | None = None,
                    while_sharing: bool = False) -> bool:
        """Store messages (`add`: appended unless their id is there already, then replaced; `replace`: only
        replaced) and images (media id -> bytes), all or nothing. `answering`: the job they answer; nothing is
        written (False) once its origin is gone (the user said /forget since). `while_sharing`: nothing is written
        unless the user shares their face (a notice that someone used it). Raises when Redis does."""
        media = media or {}
        specs: list = []
        for flag, messages in (("1", add), ("0", replace)):
            for m in messages:
                specs += [m["id"], flag, json.dumps({"id": m["id"], **m})]  # the id first: the script finds it there
        log_key = self.keys.web_log(user_id)
        guard = (self.keys.origin(user_id, answering) if answering else self.keys.shared(user_id) if while_sharing
                 else None)
        return bool(await self._write(
            log=log_key, index=self.keys.index(user_id), guard=guard or log_key,
            more_keys=[self.keys.web_media(user_id, i) for i in media],
            ttl=self.ttl_s, now=time.time(), index_ttl=self.index_ttl_s, cap=self.size,
            guarded=int(guard is not None), media_template=self.keys.web_media(user_id, lua.ANY_ID),
            n_messages=len(specs) // 3, more_args=[*specs, *media.values()]))

    async def media(self, user_id: str, media_id: str) -> bytes | None:
        """An image the visitor was shown, or None (expired, forgotten, or someone else's)."""
        return await self.r.get(self.keys.web_media(user_id, media_id))
