"""Per-user data in Redis: the user's current face, the latents behind their recent results (and the aligned crop
behind a face), consent to share, the @name they go by. (/forget is `JobQueue.forget`: it also takes the user's jobs
off the queue.)

Latents are stored as raw little-endian float32 bytes with their shape and model id, never pickled; no torch here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as redis
from redis.exceptions import ResponseError

from storage import lua
from storage.errors import StylebotError
from storage.keys import Keys, as_str
from storage.queue import Write
from storage.records import Origin


@dataclass
class StoredLatent:
    ws: np.ndarray                      # float32 [num_ws, w_dim]
    model_id: str
    created: float = field(default_factory=time.time)
    meta: dict = field(default_factory=dict)  # e.g. recipe, psnr, likeness, prompt
    w0: np.ndarray | None = None        # an edit's start latent (for stronger / weaker)

    @property
    def finite(self) -> bool:
        """False when the latent holds NaN or infinity (a diverged optimisation, a damaged value): never render it."""
        return bool(np.isfinite(self.ws).all() and (self.w0 is None or np.isfinite(self.w0).all()))


class NonFiniteLatent(ValueError):
    """A latent with NaN or infinite values was about to be stored."""


def _pack(lat: StoredLatent) -> dict[str, bytes | str]:
    if not lat.finite:
        raise NonFiniteLatent("refusing to store a latent that holds NaN or infinite values")
    d: dict[str, bytes | str] = {"ws": np.ascontiguousarray(lat.ws, dtype="<f4").tobytes(),
                                 "shape": json.dumps(list(lat.ws.shape)), "model_id": lat.model_id,
                                 "created": repr(lat.created), "meta": json.dumps(lat.meta)}
    if lat.w0 is not None:
        d["w0"] = np.ascontiguousarray(lat.w0, dtype="<f4").tobytes()
    return d


class DamagedLatent(StylebotError):
    """A stored latent that cannot be read: a field missing, short or malformed, or its key of another type."""

    def __init__(self):
        super().__init__("a stored face is damaged and cannot be read: its owner can send the photo again with "
                         "/invert, or /forget it")


def _unpack(h: dict) -> StoredLatent | None:
    if not h:
        return None
    try:
        h = {as_str(k): v for k, v in h.items()}
        shape = json.loads(h["shape"])
        ws = np.frombuffer(h["ws"], dtype="<f4").reshape(shape).copy()
        w0 = np.frombuffer(h["w0"], dtype="<f4").reshape(shape).copy() if "w0" in h else None
        meta = json.loads(as_str(h["meta"]))
        if not isinstance(meta, dict):
            raise TypeError("meta is not an object")
        return StoredLatent(ws, as_str(h["model_id"]), float(as_str(h["created"])), meta, w0)
    except (KeyError, TypeError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DamagedLatent() from e


class LatentStore:
    def __init__(self, client: redis.Redis, keys: Keys = Keys(), *, latent_ttl_s: int = 30 * 86_400,
                 result_ttl_s: int = 7 * 86_400):
        self.r, self.keys = client, keys
        self.latent_ttl_s, self.result_ttl_s = latent_ttl_s, result_ttl_s
        self._claim_name = lua.CLAIM_NAME.register(client)

    def face_write(self, user_id: str, latent: StoredLatent, result_id: str = "", *, replaces: str = "") -> Write:
        """The user's face, as one of a job's guarded writes (`JobQueue.finish`); `result_id`: the result it is
        (kept in the hash); `replaces`: written only while the face is still that result's (a refined face replaces
        its own first answer, not the first answer of a photo sent after it) or there is none."""
        value = _pack(latent) | ({"result": result_id} if result_id else {})
        return Write(self.keys.latent(user_id), value, self.latent_ttl_s, ("result", replaces) if replaces else None)

    def result_write(self, user_id: str, result_id: str, latent: StoredLatent) -> Write:
        """The latents behind one of the user's results, as one of a job's guarded writes."""
        return Write(self.keys.result_latent(user_id, result_id), _pack(latent), self.result_ttl_s)

    async def set_face(self, user_id: str, latent: StoredLatent) -> None:
        """Store a face directly (tools, tests); the engine stores through `face_write`, guarded by the epoch."""
        await self._put(user_id, self.face_write(user_id, latent))

    async def face(self, user_id: str) -> StoredLatent | None:
        """The user's current face, or None; `DamagedLatent` when what is stored cannot be read."""
        return await self._read(self.keys.latent(user_id))

    async def _read(self, key: str) -> StoredLatent | None:
        try:
            return _unpack(await self.r.hgetall(key))
        except ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise DamagedLatent() from e
            raise

    async def set_result(self, user_id: str, result_id: str, latent: StoredLatent) -> None:
        """Store a result's latents directly (tools, tests)."""
        await self._put(user_id, self.result_write(user_id, result_id, latent))

    async def _put(self, user_id: str, w: Write) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(w.key)
            p.hset(w.key, mapping=w.value)
            p.expire(w.key, w.ttl_s)
            p.zadd(self.keys.index(user_id), {w.key: time.time() + w.ttl_s})
            p.expire(self.keys.index(user_id), max(self.latent_ttl_s, self.result_ttl_s))
            await p.execute()

    def morph_write(self, user_id: str, result_id: str, latent: StoredLatent) -> Write:
        """A morph's result, under a name that holds no user id (`Keys.morph_result`): it is listed in the index
        of both people in it, and whichever of them says /forget, it goes, leaving no id in the other's index."""
        latent = StoredLatent(latent.ws, latent.model_id, latent.created, {**latent.meta, "owner": user_id}, latent.w0)
        return Write(self.keys.morph_result(result_id), _pack(latent), self.result_ttl_s)

    def crop_write(self, user_id: str, result_id: str, crop: bytes) -> Write:
        """The aligned face crop behind a face result, kept with it (so it can be refined), as a guarded write."""
        return Write(self.keys.target(user_id, result_id), crop, self.result_ttl_s)

    async def aligned_crop(self, user_id: str, result_id: str) -> bytes | None:
        """The aligned face crop behind a face result (`crop_write`; JPEG, PNG before), or None."""
        return await self.r.get(self.keys.target(user_id, result_id))

    async def drop_morph_result(self, result_id: str) -> None:
        """Delete the latents behind a morph result (one of its people withdrew before it was posted)."""
        await self.r.delete(self.keys.morph_result(result_id))

    async def result(self, user_id: str, result_id: str) -> StoredLatent | None:
        found = await self._read(self.keys.result_latent(user_id, result_id))
        if found is None:  # a morph's result: its owner is written inside
            found = await self._read(self.keys.morph_result(result_id))
            if found is not None and found.meta.get("owner") != user_id:
                return None
        return found

    async def share(self, user_id: str, on: bool, where: Origin | None = None) -> None:
        """Allow others to /morph with the user's face (`where`: the chat to tell them in when someone does), or
        stop it."""
        if on:
            await self.r.set(self.keys.shared(user_id), where.to_json() if where else "1", ex=self.latent_ttl_s)
        else:
            await self.r.delete(self.keys.shared(user_id))

    async def is_shared(self, user_id: str) -> bool:
        return bool(await self.r.exists(self.keys.shared(user_id)))

    async def shared_where(self, user_id: str) -> Origin | None:
        """Where the user said /share, while they share (None: they do not, or shared before it was kept)."""
        raw = await self.r.get(self.keys.shared(user_id))
        try:
            return Origin.from_json(raw) if raw and raw != b"1" else None
        except (TypeError, ValueError):
            return None

    async def claim_name(self, adapter: str, user_id: str, name: str) -> str:
        """Make @name on `adapter` name this user, unless it names someone else (never taken from its holder); a new
        name frees the user's old one. Returns the name's owner (`user_id` when it is theirs now)."""
        k = self.keys
        owner = await self._claim_name(name=k.name_index(adapter, name), display_name=k.display_name(user_id),
                                       name_key=k.name_key(user_id), user_id=user_id, shown_as=f"{adapter}:{name}",
                                       ttl=self.latent_ttl_s)
        return as_str(owner)

    async def user_called(self, adapter: str, name: str) -> str | None:
        """The id of the user called @name on an adapter, or None."""
        uid = await self.r.get(self.keys.name_index(adapter, name))
        return as_str(uid) if uid else None

    async def name_of(self, adapter: str, user_id: str) -> str:
        """The @name the user claimed on `adapter`, or ""."""
        shown_as = as_str(await self.r.get(self.keys.display_name(user_id)) or b"")
        on, _, name = shown_as.partition(":")
        return name if on == adapter else ""
