"""What every chat adapter shares: the loop that carries the engine's answers back to the platform.

An adapter does two things and decides nothing:
1. platform event -> `bot.core.Command` / reaction -> `BotCore.handle` / `BotCore.react_emoji`, then posts the
   `Reply` (and tells the core which message acknowledged the job: `BotCore.set_status_message`);
2. implements `Platform` (three methods) so that `EventPump` can show progress, post results, and tell the other
   people in a morph that it was made.

`EventPump` reads the adapter's results stream through its consumer group, so results that finished while the
adapter was down are posted when it comes back. A result is acknowledged (and leaves the stream) only after the
platform accepted it; one the platform keeps refusing is given up after `max_attempts` (logged), so one bad chat
cannot block all. Progress arrives on a pub/sub channel (best effort, never stored): it is throttled per job
(`ChatConfig.progress_interval_s`), only the newest step is shown, except that a new preview image is always
shown (the engine sends one every `preview_every` steps: the face taking shape), and progress of a job whose
result was posted is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol

from bot.core import ACTIONS, BotCore, result_actions
from storage.records import Origin, ProgressEvent, ResultEvent

log = logging.getLogger("stylebot.adapters")


@dataclass
class Result:
    """An engine answer, ready to post."""

    job_id: str
    user_id: str
    ok: bool                            # False: `text` is the reason it failed
    text: str                           # caption, or the one-line reason
    media: str = ""                     # what `payload` is: "image" (PNG) | "animation" (GIF) | "" (text only)
    payload: bytes = b""
    result_id: str | None = None        # set when reactions on the posted message can rerun it
    engine: str = ""                    # the engine process that made it (for logs, not for users)
    model: str = ""                     # the generator that made it, e.g. "ffhq-1024"
    actions: tuple[str, ...] = ()       # the reruns that apply (buttons to show), see `bot.core.RESULT_ACTIONS`
    shows: str = ""                     # what the result shows: "face" | "edit" | "morph" ("" when unknown)
    first: bool = False                 # a first answer: the job's refined answer will replace it in place

    @classmethod
    def of(cls, event: ResultEvent) -> "Result":
        """The engine's answer as the platform posts it: a failure's reason, or a result with its reruns."""
        if event.type != "done":
            return cls(event.job_id, event.user_id, False, event.error or "failed", engine=event.engine,
                       model=event.model)
        return cls(event.job_id, event.user_id, True, event.text, media=event.media, payload=event.payload,
                   result_id=event.result_id or None, engine=event.engine, model=event.model, shows=event.shows,
                   actions=result_actions(event.shows) if event.result_id else (), first=event.first)

    @property
    def filename(self) -> str:
        return f"stylebot-{self.job_id[:8]}." + ("gif" if self.media == "animation" else "png")


class Platform(Protocol):
    name: str                           # "telegram" | "discord" | "web": the results stream it reads

    async def show_progress(self, origin: Origin, text: str, preview: bytes | None) -> None:
        """Show how far a job is (edit the status message `origin.status`, if any). May drop updates."""

    async def show_result(self, origin: Origin, result: Result) -> str | None:
        """Post a result (or its failure) where `origin` says; return the posted message's ref for reactions. A
        result whose job was answered first (`origin.answer`: the message that shows the first answer) replaces that
        message's image and caption in place (posted anew when that message is gone)."""

    async def show_notice(self, origin: Origin, text: str) -> None:
        """Post a line to someone where `origin` says (where they said /share), not as an answer to a job of theirs;
        on the web chat only while they still share."""


def progress_text(doing: str, step: int, total: int, eta_s: float | None = None) -> str:
    """'finding your face: step 150 of 375, about 12 s left' ('started' before the first step)."""
    if step <= 0:
        return f"{doing}: started"
    text = f"{doing}: step {step} of {total}"
    if eta_s is not None and step < total:
        text += f", about {_duration(eta_s)} left"
    return text


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min"


def rerun_hint(core: BotCore, actions: tuple[str, ...] = tuple(ACTIONS)) -> str:
    """One line under a result: which emoji rerun it how."""
    return "react " + ", ".join(f"{getattr(core.chat, f'{a}_emoji').split()[0]} {a}" for a in actions)


def _raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled: a cancel that arrives as a redis-py read or write ends is
    lost on Python 3.11 (its `asyncio.wait_for` drops it, or turns it into an error), and the task would go on."""
    if asyncio.current_task().cancelling():
        raise asyncio.CancelledError()


class EventPump:
    def __init__(self, core: BotCore, platform: Platform, *, consumer: str = "main", max_attempts: int = 3):
        self.core, self.platform, self.consumer = core, platform, consumer
        self.max_attempts = max_attempts
        self._last_progress: dict[str, float] = {}
        self._previews: dict[str, bytes] = {}   # newest preview of each running job
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently posted jobs (bounded)
        self._attempts: dict[str, int] = {}
        self._progress = None                   # the pub/sub subscription, opened on the first step

    async def run(self, stop: asyncio.Event) -> None:
        """Post results and show progress until `stop` is set or the task is cancelled; Redis errors and platform
        outages only pause it (the results stay pending). Its pub/sub connection goes back to the pool either way."""
        grouped = False
        try:
            while not stop.is_set():
                _raise_if_cancelled()
                try:
                    if not grouped:
                        await self.core.queue.ensure_groups(adapters=(self.platform.name,))
                        grouped = True
                    await self.step()
                except Exception:  # noqa: BLE001 - Redis down, a platform outage: keep pumping, events stay pending
                    _raise_if_cancelled()
                    log.exception("%s: event pump hiccup; retrying", self.platform.name)
                    await self._unsubscribe()  # subscribe afresh on the next step
                    await asyncio.sleep(1)
        finally:
            await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        """Give the pub/sub connection back to the pool (it may be broken: that is why, at times)."""
        sub, self._progress = self._progress, None
        if sub is not None:
            try:
                await sub.aclose()
            except Exception:  # noqa: BLE001 - a broken connection is closed all the same
                log.warning("%s: closing the progress subscription failed", self.platform.name, exc_info=True)

    async def subscribe(self) -> None:
        """Start listening to progress (`step` does it when needed; progress published before is not seen)."""
        if self._progress is None:
            self._progress = await self.core.queue.listen_progress(self.platform.name)

    async def step(self, block_ms: int = 500) -> int:
        """Handle one batch of results, then the progress that arrived meanwhile; returns how many results were
        dealt with."""
        queue = self.core.queue
        await self.subscribe()
        deadline = time.monotonic() + block_ms / 1000
        while True:  # wait for results in short reads, showing progress as it comes meanwhile
            _raise_if_cancelled()
            await self._show_progress_read()
            wait_ms = max(1, min(100, int((deadline - time.monotonic()) * 1000)))
            events = await queue.read_events(self.platform.name, self.consumer, block_ms=wait_ms)
            if events or time.monotonic() >= deadline:
                break
        _raise_if_cancelled()  # what was read stays pending: the next pump posts it
        await self._show_progress_read(answering={e.job_id for _, e in events})
        done = 0
        finals = {e.job_id for _, e in events if not e.first and e.type == "done"}  # a failure shows the first answer
        for entry_id, event in events:
            if await self._post_result(event, superseded=event.first and event.job_id in finals):
                await queue.ack_event(self.platform.name, entry_id, event.user_id, event.ref)
                done += 1
        if events and not done:
            await asyncio.sleep(0.5)  # only results the platform refused: do not spin on them
        return done

    async def _show_progress_read(self, answering: set[str] = frozenset()) -> None:
        """Show the newest progress of each job among the events that have arrived: none of a job already
        answered, and of a job about to be answered (`answering`) only its last step (the engine publishes it just
        before storing the result), so that its status message ends complete, not at an older step."""
        latest: dict[str, ProgressEvent] = {}
        for event in await self.core.queue.read_progress(self._progress):
            job_id = event.job_id
            if job_id in self._finished or (job_id in answering and event.step < event.total):
                continue
            if event.preview:  # every new preview is shown (the face taking shape), in order
                self._previews[job_id] = event.preview
                while len(self._previews) > 1000:  # jobs that never answer (their user said /forget) do not pile up
                    self._previews.pop(next(iter(self._previews)))
                await self._show_progress(event, new_preview=True)
                latest.pop(job_id, None)
            else:
                latest[job_id] = event
        for event in latest.values():
            await self._show_progress(event)

    async def _show_progress(self, event: ProgressEvent, new_preview: bool = False) -> None:
        job_id, now = event.job_id, time.monotonic()
        preview = self._previews.get(job_id)
        final = event.step >= event.total
        urgent = final or event.step == 0 or new_preview
        if not urgent and now - self._last_progress.get(job_id, 0.0) < self.core.chat.progress_interval_s:
            return
        origin = await self.core.origin(event.user_id, job_id)
        if origin is None:
            return
        self._last_progress[job_id] = now
        try:
            doing = origin.doing or origin.op or "working"
            await self.platform.show_progress(origin, progress_text(doing, event.step, event.total, event.eta_s),
                                              preview)
        except Exception:  # noqa: BLE001 - progress is best effort
            log.warning("%s: could not show progress of %s", self.platform.name, job_id, exc_info=True)

    async def _post_result(self, event: ResultEvent, superseded: bool = False) -> bool:
        """True when the event is dealt with (posted, or given up on). A first answer is posted and its message kept
        in the job's origin (the refined answer replaces it there), unless the refined answer is here already
        (`superseded`: read with it, or posted before it after the platform refused it at first)."""
        job_id = event.job_id
        if event.first and (superseded or job_id in self._finished):
            return True
        if not event.first:  # the job's last answer: its progress ends
            self._last_progress.pop(job_id, None)
            self._previews.pop(job_id, None)
            self._finished[job_id] = None
            while len(self._finished) > 1000:
                self._finished.popitem(last=False)
        origin = await self.core.origin(event.user_id, job_id)
        if origin is None:  # the user said /forget, or the origin expired: nobody to answer
            return True
        if event.first and origin.answer:  # posted before the pump could acknowledge it: not twice
            return True
        if event.type != "done" and origin.answer:  # the refinement failed: the first answer stays
            event = replace(event, error=f"refining the first answer failed ({event.error}); the first answer "
                                         "stays your result")
        if event.type == "done" and event.others:  # a morph: the other person may have withdrawn since
            withdrawn = await self.core.withdrawn(event)
            if withdrawn:
                event = replace(event, type="failed", error=withdrawn)
        result = Result.of(event)
        try:
            ref = await self.platform.show_result(origin, result)
        except Exception:  # noqa: BLE001 - a platform error: retry a few times, then give up loudly
            attempts = self._attempts[event.ref] = self._attempts.get(event.ref, 0) + 1
            log.warning("%s: posting result of %s failed (attempt %d)", self.platform.name, event.ref, attempts,
                        exc_info=True)
            if attempts < self.max_attempts:
                return False
            log.error("%s: gave up posting result of %s", self.platform.name, event.ref)
            self._attempts.pop(event.ref, None)
            return True
        self._attempts.pop(event.ref, None)
        if ref is not None and result.result_id:
            await self.core.remember_result(self.platform.name, ref, result.user_id, result.result_id, event.epoch)
        if ref is not None and result.first:
            await self.core.queue.set_answer(result.user_id, job_id, ref)
        if result.ok and not result.first:
            await self._tell_others(event)
        return True

    async def _tell_others(self, event: ResultEvent) -> None:
        """The other people in a morph just posted are told who used their face. Best effort: a notice that fails is
        logged, not tried again, since trying again would post the asker's result twice."""
        try:
            for origin, text in await self.core.morph_notices(self.platform.name, event):
                await self.platform.show_notice(origin, text)
        except Exception:  # noqa: BLE001 - Redis or the platform failed: the morph itself was posted
            log.warning("%s: could not tell the other people in morph %s", self.platform.name, event.job_id,
                        exc_info=True)
