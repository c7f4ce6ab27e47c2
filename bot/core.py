"""The bot core: every platform's commands decided once. Adapters turn platform events into `Command`s and
`Reaction`s and post the `Reply`s; the engine's results come back through `JobQueue.read_events`.

No torch here: the core checks input, limits and consent, enqueues jobs and answers at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from dataclasses import dataclass, field, replace

from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

from bot.config import ChatConfig, EditConfig, LimitsConfig
from bot.photos import check_photo, human_size  # noqa: F401 - human_size is imported from here by the adapters
from storage.connect import unreachable
from storage.errors import StylebotError, no_face_yet
from storage.keys import Keys
from storage.latents import LatentStore
from storage.queue import JobQueue
from storage.records import Job, Origin, ResultEvent

log = logging.getLogger("stylebot.bot")
BUSY = "I'm busy right now: try again in a few minutes"
OUTAGE = "the bot's storage is not answering; your earlier results are safe; try again in a minute"

Image.MAX_IMAGE_PIXELS = None  # we check dimensions ourselves, before decoding, with our own limit


@dataclass
class Command:
    adapter: str                        # "telegram" | "discord" | "web"
    user_id: str                        # stable per platform, e.g. "telegram:12345"
    user_name: str                      # what others type after @ to name this user
    text: str                           # the message, e.g. "/edit really angry face"
    photo: bytes | None = None
    mentions: dict[str, str] = field(default_factory=dict)  # @name -> user id, when the platform resolved it
    origin: Origin = field(default_factory=Origin)  # where the answer goes: the adapter's fields of it


@dataclass
class Reaction:
    adapter: str
    user_id: str
    result_id: str                      # the job id behind the result message
    action: str                         # "stronger" | "weaker" | "refine" | "redo"
    origin: Origin = field(default_factory=Origin)
    epoch: str = ""                     # the result's epoch, from the message link ("" = not known)


ACTIONS = {
    "stronger": "make an edit stronger",
    "weaker": "make an edit weaker",
    "refine": "optimise a face or an edit for more steps",
    "redo": "run the command again on your current face",
}


# Which reruns apply to a result, by what it shows (the engine says: "face", "edit" or "morph"); adapters show only
# these buttons, and the core refuses the others with a reason.
RESULT_ACTIONS = {
    "face": ("refine", "redo"),
    "edit": ("stronger", "weaker", "refine", "redo"),
    "morph": ("redo",),
}


def result_actions(shows: str) -> tuple[str, ...]:
    """The reruns that apply to a result that shows this (all of them when it is unknown: older results)."""
    return RESULT_ACTIONS.get(shows, tuple(ACTIONS))


def job_words(op: str, params: dict) -> str:
    """What a job does, in the words a person uses (the acknowledgement and progress say it)."""
    if op == "restyle":
        return "making the edit " + ("stronger" if float(params.get("factor", 1)) >= 1 else "weaker")
    if op == "refine":
        return "doing it again" if params.get("restart") else "refining"
    if op == "edit" and params.get("prompt"):
        return f"editing your face: {params['prompt']}"
    return {"invert": "finding your face", "morph": "morphing", "edit": "editing your face"}.get(op, op)


@dataclass
class Reply:
    text: str
    job_id: str | None = None           # set when a job was queued: its result will follow
    forgotten: bool = False             # /forget went through: adapters drop what they hold about the user too


ECHO_CHARS = 40  # the most of a user's own words a reply repeats: every reply fits every platform (Telegram: 4,096)


def shown(text: str, limit: int = ECHO_CHARS) -> str:
    """What a reply repeats of a user's words: at most `limit` characters, cut with an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


INVISIBLE = {"Cc", "Cf", "Co", "Cn", "Cs"}  # control, format (zero-width), private-use, unassigned, surrogates


def redis_refusal(what: str, e: Exception) -> Reply:
    """The answer when Redis failed a command: the storage is away (`OUTAGE`), or too busy to lend a connection."""
    outage = unreachable(e)
    log.warning("answering %s with %s: %s", what, "the storage outage" if outage else "busy", e)
    return Reply(OUTAGE if outage else BUSY)


def clean_prompt(text: str) -> str:
    """The prompt as CLIP should read it: whitespace of any kind (tabs and line breaks too, which are control
    characters) collapsed to single spaces, the other invisible characters removed."""
    kept = (" " if c.isspace() else c for c in text)
    return " ".join("".join(c for c in kept if unicodedata.category(c) not in INVISIBLE).split())


class BotCore:
    def __init__(self, queue: JobQueue, store: LatentStore, limits: LimitsConfig = LimitsConfig(),
                 edit: EditConfig = EditConfig(), chat: ChatConfig = ChatConfig()):
        self.queue, self.store, self.limits, self.edit, self.chat = queue, store, limits, edit, chat
        self.keys: Keys = queue.keys
        # photos are decoded in threads, off the event loop; two at most, so that big ones do not pile up in memory
        self._photo_checks = asyncio.Semaphore(2)

    @classmethod
    def from_config(cls, cfg, client) -> "BotCore":
        """The core as `stylebot` runs it: queue and store on `client` with the config's prefix and limits."""
        keys = Keys(cfg.redis.prefix)
        store = LatentStore(client, keys, result_ttl_s=cfg.chat.result_ttl_s)
        queue = JobQueue(client, keys, max_deliveries=cfg.queue.max_deliveries,
                         reclaim_idle_ms=int(cfg.queue.reclaim_idle_s * 1000), result_ttl_s=cfg.chat.result_ttl_s,
                         index_ttl_s=store.latent_ttl_s)
        return cls(queue, store, cfg.limits, cfg.edit, cfg.chat)

    async def handle(self, cmd: Command) -> Reply:
        """Answer a command at once: queued (with position), or a one-line reason ("busy" when Redis cannot keep
        up: no free connection within `[redis] pool_timeout_s`; `OUTAGE` when it does not answer at all)."""
        try:
            return await self._handle(cmd)
        except (RedisConnectionError, RedisTimeoutError) as e:
            return redis_refusal(cmd.adapter, e)
        except StylebotError as e:  # a stored value that cannot be read (`DamagedLatent`): said in one line
            return Reply(str(e))

    async def _handle(self, cmd: Command) -> Reply:
        name, rest = (cmd.text.split(maxsplit=1) + [""])[:2]  # the command ends at any whitespace: "/edit\nsmile"
        handler = COMMANDS.get(name.lower().split("@")[0])
        if handler is None:
            return Reply(f"unknown command {shown(name)!r}: try /help")
        note = None if handler is BotCore.cmd_forget else await self.claim_name(cmd.adapter, cmd.user_id, cmd.user_name)
        reply = await handler(self, cmd, rest.strip())
        if note:
            reply.text += "\n" + note
        return reply

    async def claim_name(self, adapter: str, user_id: str, user_name: str) -> str | None:
        """Make @user_name name this user, unless it names someone else: then a note saying so (never taken
        silently from its holder, for example after its former owner sent /forget and someone else took it)."""
        if not user_name:
            return None
        if await self.store.claim_name(adapter, user_id, user_name) != user_id:
            return (f"note: the name @{user_name} belongs to someone else now, so others cannot /morph with you by "
                    "that name" + ("; choose another nickname" if adapter == "web" else ""))
        return None

    async def react(self, reaction: Reaction) -> Reply:
        """Rerun a result: stronger or weaker (edits), refine (more steps), redo (same command, current face)."""
        try:
            return await self._react(reaction)
        except (RedisConnectionError, RedisTimeoutError) as e:
            return redis_refusal("a reaction", e)
        except StylebotError as e:
            return Reply(str(e))

    async def _react(self, reaction: Reaction) -> Reply:
        if reaction.action not in ACTIONS:
            return Reply(f"unknown reaction {shown(reaction.action)!r}")
        result = await self.store.result(reaction.user_id, reaction.result_id)
        if result is None:
            return Reply("that result has expired, or it is not yours to rerun")
        cmd = Command(reaction.adapter, reaction.user_id, "", "", origin=reaction.origin)
        op = result.meta.get("op")
        if reaction.action in ("stronger", "weaker"):
            if result.w0 is None:
                return Reply("only edits can be made stronger or weaker")
            factor = self.edit.stronger if reaction.action == "stronger" else self.edit.weaker
            return await self._enqueue(cmd, "restyle", {"result_id": reaction.result_id, "factor": factor},
                                       epoch=reaction.epoch)
        if reaction.action == "refine":
            if op not in ("invert", "edit"):
                return Reply("only faces and edits can be refined")
            return await self._enqueue(cmd, "refine", {"result_id": reaction.result_id}, epoch=reaction.epoch)
        redo = result.meta.get("redo")
        if not redo:
            return Reply("that result cannot be redone; send the command again")
        if redo["op"] in ("edit", "morph") and await self.store.face(reaction.user_id) is None:
            return Reply(no_face_yet("you"))
        if redo["op"] == "morph":
            for uid in (redo["params"]["a"], redo["params"]["b"]):
                if uid != reaction.user_id and not await self.store.is_shared(uid):
                    return Reply("the other person no longer allows morphs with their face")
        if redo["op"] == "invert":
            redo = {"op": "refine", "params": {"result_id": reaction.result_id, "restart": True}}
        return await self._enqueue(cmd, redo["op"], dict(redo["params"]), epoch=reaction.epoch)

    async def react_emoji(self, adapter: str, user_id: str, message_ref: str, emoji: str,
                          origin: Origin | None = None) -> Reply | None:
        """A reaction on a platform message: None when the emoji means nothing to us (stay quiet), else a reply."""
        action = self.chat.action(emoji)
        if action is None:
            return None
        return await self.react_message(adapter, user_id, message_ref, action, origin)

    async def react_message(self, adapter: str, user_id: str, message_ref: str, action: str,
                            origin: Origin | None = None) -> Reply:
        """A rerun asked for on a platform message (a reaction or a button under it)."""
        found = await self.result_at(adapter, message_ref)
        if found is None:
            return Reply("that message is not one of my results, or it has expired")
        owner, result_id, epoch = found
        if owner != user_id:
            return Reply("only the person who asked for a result can rerun it")
        return await self.react(Reaction(adapter, user_id, result_id, action, origin or Origin(), epoch))

    # -- where answers go: origins of jobs, messages that show results ---------------------------------------

    async def origin(self, user_id: str, job_id: str) -> Origin | None:
        """Where a job's answer goes, as the adapter gave it (plus the job's fields and, once posted, `status`)."""
        return await self.queue.origin(user_id, job_id)

    async def set_status_message(self, user_id: str, job_id: str, ref: str) -> None:
        """Remember the message that acknowledged a job: progress edits it."""
        await self.queue.set_status(user_id, job_id, ref)

    async def remember_result(self, adapter: str, message_ref: str, user_id: str, result_id: str,
                              epoch: str = "") -> None:
        """A platform message now shows a result: reactions on it rerun that result (`epoch`: the result's, so
        that a /forget sent meanwhile is not undone)."""
        await self.queue.remember(adapter, message_ref, user_id, result_id, epoch)

    async def withdrawn(self, event: ResultEvent) -> str | None:
        """For a morph about to be posted: the reason not to, when another person in it no longer shares (the
        engine checked when it stored it; this checks again at the last moment), its stored latents deleted."""
        for uid in event.others:
            if not await self.store.is_shared(uid):
                if event.result_id:
                    await self.store.drop_morph_result(event.result_id)
                return "the other person no longer allows morphs with their face, so the morph was not kept"
        return None

    async def morph_notices(self, adapter: str, event: ResultEvent) -> list[tuple[Origin, str]]:
        """For a morph just posted to the person who asked: a line for each other person in it, to post where they
        said /share (faces are biometric data: whoever's face was used is told by whom). None for someone who no
        longer shares, or shared before where they did was kept."""
        if event.type != "done" or not event.others:
            return []
        asker = await self.store.name_of(adapter, event.user_id)
        who = f"@{asker}" if asker else "someone"
        notices = []
        for uid in event.others:
            where = await self.store.shared_where(uid)
            if where is None:
                continue
            name = await self.store.name_of(adapter, uid)  # in a group chat, "your face" would be nobody's
            whose = f"@{name}'s" if name else "your"
            notices.append((where, f"{who} made a morph with {whose} face; /unshare stops others from using it, "
                                   "/forget deletes everything I keep about you"))
        return notices

    async def aligned_crop(self, user_id: str, result_id: str | None) -> bytes | None:
        """The aligned face crop behind a face result (kept with it for refines; JPEG, PNG before), or None."""
        return await self.store.aligned_crop(user_id, result_id) if result_id else None

    async def result_at(self, adapter: str, message_ref: str) -> tuple[str, str, str] | None:
        """(owner user id, result id, the result's epoch or "") of the result a message shows, or None."""
        return await self.queue.shown_at(adapter, message_ref)

    # -- commands --------------------------------------------------------------------------------------------

    async def cmd_invert(self, cmd: Command, rest: str) -> Reply:
        """/invert (with a photo): find your face's latent and show its reconstruction"""
        if cmd.photo is None:
            return Reply("send a photo with /invert as its caption")
        async with self._photo_checks:
            problem = await asyncio.to_thread(check_photo, cmd.photo, self.limits)
        if problem:
            return Reply(problem)
        return await self._enqueue(cmd, "invert", {}, photo=cmd.photo)

    async def cmd_morph(self, cmd: Command, rest: str) -> Reply:
        """/morph @a @b [frames]: a GIF from one face to another (@me is you)"""
        m = re.fullmatch(r"@(\S+)\s+@(\S+)(?:\s+(\d+))?", rest)
        if not m:
            return Reply("usage: /morph @me @friend [frames]")
        digits = m.group(3) or str(self.limits.default_frames)
        frames = int(digits) if len(digits) <= 9 else 0  # more digits than any frame count (and than int() reads)
        if not 2 <= frames <= self.limits.max_frames:
            return Reply(f"frames must be between 2 and {self.limits.max_frames}")
        users, names = [], {}
        for name in (m.group(1), m.group(2)):
            uid = (cmd.user_id if name.lower() == "me"
                   else cmd.mentions.get(name) or await self.user_called(cmd.adapter, name))
            if uid is None:
                return Reply(f"I don't know @{shown(name)}: they need to talk to me once (for example /help)")
            if uid != cmd.user_id and not await self.store.is_shared(uid):
                return Reply(f"@{shown(name)} has not allowed morphs with their face: they can send /share to allow "
                             "it")
            if await self.store.face(uid) is None:
                return Reply(no_face_yet("you" if uid == cmd.user_id else f"@{shown(name)}"))
            users.append(uid)
            names[uid] = "you" if uid == cmd.user_id else f"@{shown(name)}"
        if users[0] == users[1]:
            return Reply("a morph needs two different faces, e.g. /morph @me @friend")
        return await self._enqueue(cmd, "morph", {"a": users[0], "b": users[1], "frames": frames, "names": names})

    async def cmd_edit(self, cmd: Command, rest: str) -> Reply:
        """/edit <text>: change your face toward a description, e.g. /edit really angry face"""
        prompt = clean_prompt(rest)
        if not prompt:
            return Reply("the prompt is empty: describe the edit, e.g. /edit really angry face")
        if len(prompt) > self.edit.max_prompt_chars:
            return Reply(f"the prompt is {len(prompt)} characters long; keep it under {self.edit.max_prompt_chars}")
        if await self.store.face(cmd.user_id) is None:
            return Reply(no_face_yet("you"))
        return await self._enqueue(cmd, "edit", {"prompt": prompt})

    async def cmd_share(self, cmd: Command, rest: str) -> Reply:
        """/share: allow others to /morph with your face (you are told here when someone does)"""
        o = cmd.origin  # only the place: no message to reply to, no Discord token (it lasts 15 minutes)
        where = Origin(chat_id=o.chat_id, channel_id=o.channel_id, mention=o.mention, upload_limit=o.upload_limit,
                       user=o.user)
        await self.store.share(cmd.user_id, True, where)
        return Reply("others can now /morph with your face, and I will tell you here when someone does; /unshare "
                     "stops it")

    async def cmd_unshare(self, cmd: Command, rest: str) -> Reply:
        """/unshare: stop others from using your face"""
        await self.store.share(cmd.user_id, False)
        return Reply("others can no longer /morph with your face")

    async def cmd_forget(self, cmd: Command, rest: str) -> Reply:
        """/forget: delete your face, your results and everything else I keep about you"""
        went, stopped = await self.queue.forget(cmd.user_id, cmd.adapter)
        if not went:
            return Reply("done: I kept nothing about you", forgotten=True)
        jobs = f", and stopped your {stopped} unfinished job{'s' * (stopped > 1)}" if stopped else ""
        return Reply(f"done: deleted everything I kept about you ({went} item{'s' * (went > 1)}){jobs}",
                     forgotten=True)

    async def cmd_status(self, cmd: Command, rest: str) -> Reply:
        """/status: the queue, the engine, and your face"""
        engines = await self.queue.engines_online()
        face = await self.store.face(cmd.user_id)
        restarting = " (the engine is restarting)" if not engines and await self.queue.restarting() else ""
        text = (f"engines online: {len(engines)}{restarting}; jobs in the queue: {await self.queue.pending_count()}; "
                + (f"your face: kept, made with the {face.model_id} model" if face else "no face for you yet"))
        return Reply(text + await self._notice())

    async def cmd_help(self, cmd: Command, rest: str) -> Reply:
        """/help: this list"""
        lines = [f.__doc__ for f in COMMANDS.values()]
        how = "the buttons under a result rerun it" if cmd.adapter == "web" else \
            "react to a result, or use the buttons under it, to rerun it"
        lines.append(f"{how}: " + "; ".join(
            f"{getattr(self.chat, f'{a}_emoji').split()[0]} {what}" for a, what in ACTIONS.items()))
        lines.append("only the person who asked for a result can rerun it")
        lines.append("where the model has an encoder, /invert answers twice: a first guess at once, then the refined "
                     "face in the same message; a command sent in between uses whichever of the two is your face "
                     "when the engine starts it")
        return Reply("\n".join(lines))

    # -- helpers ---------------------------------------------------------------------------------------------

    async def user_called(self, adapter: str, name: str) -> str | None:
        """The user id known as `name` on an adapter, or None."""
        return await self.store.user_called(adapter, name)

    async def _notice(self) -> str:
        """A notice for everyone (set by `stylebot run` when it restarted the engine), as a line to append."""
        notice = await self.queue.notice()
        return f"\nnote: {notice}" if notice else ""

    async def _enqueue(self, cmd: Command, op: str, params: dict, photo: bytes | None = None,
                       epoch: str = "") -> Reply:
        """Queue a job in one atomic step with the checks of limits and consent (`JobQueue.admit`); `epoch`: a
        rerun's result's, refused if the user said /forget since."""
        job = Job(op=op, user_id=cmd.user_id, adapter=cmd.adapter, params=params)
        origin = replace(cmd.origin, op=op, job_id=job.job_id, doing=job_words(op, params))
        others = tuple(u for u in (params["a"], params["b"]) if u != cmd.user_id) if op == "morph" else ()
        admitted = await self.queue.admit(job, photo=photo, origin=origin, max_queue=self.limits.max_queue,
                                          max_per_user=self.limits.max_jobs_per_user, others=others, epoch=epoch)
        who = params.get("names", {}).get(admitted.user_id, "the other person")
        refused = {
            "busy": BUSY,
            "limit": f"you already have {self.limits.max_jobs_per_user} jobs waiting: wait for one to finish",
            "unshared": f"{who} no longer allows morphs with their face",
            "noface": f"there is no face for {who} any more: they need to send a photo with /invert again",
            "gone": "that result has expired, or it is not yours to rerun",
        }
        if admitted.status != "ok":
            return Reply(refused[admitted.status])
        ahead = admitted.position - 1
        if not await self.queue.engines_online():
            when = ("queued; the engine is restarting" if await self.queue.restarting() else
                    "waiting for the engine, which is offline right now") + (f" ({ahead} jobs ahead)" if ahead else "")
        else:
            when = f"waiting behind {ahead} job{'s' * (ahead > 1)}" if ahead else "starting now"
        return Reply(f"{job_words(op, params)}: {when}" + await self._notice(), job_id=job.job_id)


COMMANDS = {
    "/invert": BotCore.cmd_invert, "/morph": BotCore.cmd_morph, "/edit": BotCore.cmd_edit,
    "/share": BotCore.cmd_share, "/unshare": BotCore.cmd_unshare, "/forget": BotCore.cmd_forget,
    "/status": BotCore.cmd_status, "/help": BotCore.cmd_help,
}
