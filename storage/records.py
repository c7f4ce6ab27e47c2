"""What crosses Redis, typed: a job, the result event that answers it, its progress events, where its answer goes.

Each record is built here and read here: `to_json` / `from_json` (a job: `to_fields` / `from_fields`) are the only
code that knows its wire form, JSON in stream entries, hashes, strings and pub/sub messages (never pickle); binary
payloads (photos, images, GIFs) travel beside the JSON, in their own keys or fields. Events and origins leave the
fields at their default out of their JSON, and their readers ignore fields they do not know.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from storage.keys import as_str


def _object(raw: str | bytes) -> dict:
    """`raw` parsed: a JSON object, else ValueError."""
    d = json.loads(raw)
    if not isinstance(d, dict):
        raise ValueError(f"a record is a JSON object, not {type(d).__name__}")
    return d


def _known(cls, d: dict) -> dict:
    """The fields of the record `cls` in `d` (the keys it does not know left out)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _set(record, leave_out: tuple[str, ...] = ()) -> dict:
    """The record's fields that are not at their default (required ones always), as a dict for JSON."""
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        default = f.default if f.default_factory is MISSING else f.default_factory()
        if f.name not in leave_out and (default is MISSING or value != default):
            out[f.name] = value
    return out


@dataclass
class Job:
    """One unit of engine work."""

    op: str                             # invert | morph | edit | restyle | refine
    user_id: str
    adapter: str                        # which adapter's results stream gets the answer
    params: dict[str, Any] = field(default_factory=dict)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    message_id: str = ""                # stream entry id, set when claimed
    deliveries: int = 1                 # how many times the stream has handed it out (a resume counts too)
    epochs: dict[str, str] = field(default_factory=dict)  # user id -> epoch token at admission (set by `admit`)
    suspect: int = 0                    # times it was running beside others when an engine died (or a step raised)
    faults: int = 0                     # times an engine died or raised while running it alone

    def to_fields(self) -> dict[str, str]:
        d = asdict(self)
        for name in ("message_id", "deliveries", "epochs", "suspect", "faults"):
            d.pop(name)
        return {"job": json.dumps(d)}

    @classmethod
    def from_fields(cls, message_id: str, fields: dict, deliveries: int = 1) -> "Job":
        d = json.loads(fields["job"])
        epochs = {k.removeprefix("epoch:"): as_str(v) for k, v in fields.items() if k.startswith("epoch:")}
        return cls(**d, message_id=message_id, deliveries=deliveries, epochs=epochs)


@dataclass
class ResultEvent:
    """A job's answer, from the engine (or from /forget, for a morph it stopped) to the adapter that posts it."""

    job_id: str
    user_id: str                        # who asked: the answer goes to them
    type: str                           # "done" | "failed" (then `error` says why)
    text: str = ""                      # the caption of a result
    error: str = ""                     # the one-line reason a job failed
    media: str = ""                     # what `payload` is: "image" (PNG) | "animation" (GIF) | "" (none)
    shows: str = ""                     # what the result shows: "face" | "edit" | "morph" ("" when unknown)
    result_id: str = ""                 # the result that reactions on the posted message rerun ("" = none)
    model: str = ""                     # the generator that made it, e.g. "ffhq-1024"
    engine: str = ""                    # the engine process that made it (for logs, not for users)
    epoch: str = ""                     # the user's epoch token when the job was queued ("" = from before epochs)
    others: list[str] = field(default_factory=list)  # the other people in it (a morph's), who may withdraw
    first: bool = False                 # a first answer (one pass): the job's refined answer follows and replaces it
    payload: bytes = b""                # the image or GIF; stored beside the JSON, never in it

    @classmethod
    def done(cls, job: Job, text: str, *, media: str = "", shows: str = "", result_id: str = "", model: str = "",
             engine: str = "", payload: bytes = b"", first: bool = False) -> "ResultEvent":
        """A job's result (or, with `first`, its first answer), with its user, epoch and other people taken from the
        job."""
        return cls(job.job_id, job.user_id, "done", text=text, media=media, shows=shows, result_id=result_id,
                   model=model, engine=engine, payload=payload, first=first, **cls._about(job))

    @property
    def ref(self) -> str:
        """The id its body is stored under (`Keys.result_data`) and its results stream entry names: the job's id, or
        for a first answer an id of its own, so that the refined answer stored after it does not replace it unposted."""
        return first_answer_ref(self.job_id) if self.first else self.job_id

    @classmethod
    def failed(cls, job: Job, error: str, *, engine: str = "") -> "ResultEvent":
        """A job's failure with its one-line reason, with its user, epoch and other people taken from the job."""
        return cls(job.job_id, job.user_id, "failed", error=error, engine=engine, **cls._about(job))

    @staticmethod
    def _about(job: Job) -> dict:
        return {"epoch": job.epochs.get(job.user_id, ""), "others": [u for u in job.epochs if u != job.user_id]}

    def to_json(self) -> str:
        return json.dumps(_set(self, leave_out=("payload",)))

    @classmethod
    def from_json(cls, raw: str | bytes, payload: bytes = b"") -> "ResultEvent":
        """Raises ValueError or TypeError when `raw` is not a result event. Reads the events of the version before
        `media` and `shows` too (their `kind` and `result_kind`): results wait up to a day to be posted."""
        d = _object(raw)
        if "kind" in d or "result_kind" in d:
            d["media"], d["shows"] = d.pop("kind", ""), d.pop("result_kind", "")
        return cls(**{**_known(cls, d), "payload": payload})


def first_answer_ref(job_id: str) -> str:
    """The id of a job's first answer (`ResultEvent.ref`)."""
    return f"{job_id}.first"


@dataclass
class ProgressEvent:
    """How far a running job is (published, never stored): adapters edit the job's status message with it."""

    job_id: str
    user_id: str
    step: int                           # 0: started
    total: int
    eta_s: float | None = None          # seconds left, as the engine measured its step rate
    preview: bytes | None = None        # a small JPEG of the face so far

    def to_json(self) -> str:
        d = _set(self, leave_out=("preview",))
        if self.preview is not None:
            d["preview"] = base64.b64encode(self.preview).decode()
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "ProgressEvent":
        """Raises ValueError or TypeError when `raw` is not a progress event."""
        d = _known(cls, _object(raw))
        if d.get("preview") is not None:
            d["preview"] = base64.b64decode(d["preview"])
        return cls(**d)


@dataclass
class Origin:
    """Where a job's answer goes on its platform. The adapter fills in its own fields (in the `Command`), the core
    adds the job's when it queues it, the adapter adds `status` once it has acknowledged the job; the event pump reads
    it to show progress and post the result."""

    op: str = ""                        # the job's operation
    job_id: str = ""
    doing: str = ""                     # what the job does, in words (`bot.core.job_words`)
    status: str = ""                    # the platform message that acknowledged the job (progress edits it)
    answer: str = ""                    # the platform message that shows its first answer (the refined one edits it)
    # Telegram
    chat_id: int | None = None
    reply_to: int | None = None         # the message the answer replies to
    # Discord: the interaction's follow-ups while its token is fresh, else the channel
    application_id: str = ""
    token: str = ""
    created: float = 0.0                # when the interaction was made (its token lasts 15 minutes)
    channel_id: str = ""
    mention: str = ""                   # the user to mention in the channel
    upload_limit: int = 0               # bytes the server takes in one file
    # web chat
    user: str = ""                      # the visitor's user id

    def to_json(self) -> str:
        return json.dumps(_set(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Origin":
        return cls(**_known(cls, _object(raw)))
