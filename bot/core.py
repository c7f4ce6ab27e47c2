"""The bot core: every platform's commands decided once. Adapters turn platform events into `Command`s and
`Reaction`s and post the `Reply`s; the engine's results come back through `JobQueue.read_events`.

No torch here: the core checks input, limits and consent, enqueues jobs and answers at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from PIL import Image

from bot.config import ChatConfig, EditConfig, LimitsConfig
from bot.photos import check_photo, human_size  # noqa: F401 - human_size is imported from here by the adapters
from storage.keys import Keys
from storage.latents import LatentStore
from storage.queue import Job, JobQueue

Image.MAX_IMAGE_PIXELS = None  # we check dimensions ourselves, before decoding, with our own limit


@dataclass
class Command:
    adapter: str                        # "telegram" | "discord" | "web"
    user_id: str                        # stable per platform, e.g. "telegram:12345"
    user_name: str                      # what others type after @ to name this user
    text: str                           # the message, e.g. "/edit really angry face"
    photo: bytes | None = None
    mentions: dict[str, str] = field(default_factory=dict)  # @name -> user id, when the platform resolved it
    origin: dict = field(default_factory=dict)  # where the answer goes (chat id, message to reply to): JSON-able


@dataclass
class Reaction:
    adapter: str
    user_id: str
    result_id: str                      # the job id behind the result message
    action: str                         # "stronger" | "weaker" | "refine" | "redo"
    origin: dict = field(default_factory=dict)


ACTIONS = {
    "stronger": "make an edit stronger",
    "weaker": "make an edit weaker",
    "refine": "optimise a face or an edit for more steps",
    "redo": "run the command again on your current face",
}


# Which reruns apply to which kind of result (the engine names the kind: "face", "edit" or "morph"); adapters show
# only these buttons, and the core refuses the others with a reason.
RESULT_ACTIONS = {
    "face": ("refine", "redo"),
    "edit": ("stronger", "weaker", "refine", "redo"),
    "morph": ("redo",),
}


def result_actions(kind: str | None) -> tuple[str, ...]:
    """The reruns that apply to a result of this kind (all of them when the kind is unknown: older results)."""
    return RESULT_ACTIONS.get(kind or "", tuple(ACTIONS))


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


class BotCore:
    def __init__(self, queue: JobQueue, store: LatentStore, limits: LimitsConfig = LimitsConfig(),
                 edit: EditConfig = EditConfig(), chat: ChatConfig = ChatConfig()):
        self.queue, self.store, self.limits, self.edit, self.chat = queue, store, limits, edit, chat
        self.keys: Keys = queue.keys

    @classmethod
    def from_config(cls, cfg, client) -> "BotCore":
        """The core as `stylebot` runs it: queue and store on `client` with the config's prefix and limits."""
        keys = Keys(cfg.redis.prefix)
        queue = JobQueue(client, keys, max_deliveries=cfg.queue.max_deliveries,
                         reclaim_idle_ms=int(cfg.queue.reclaim_idle_s * 1000), result_ttl_s=cfg.chat.result_ttl_s)
        store = LatentStore(client, keys, result_ttl_s=cfg.chat.result_ttl_s)
        return cls(queue, store, cfg.limits, cfg.edit, cfg.chat)

    async def handle(self, cmd: Command) -> Reply:
        """Answer a command at once: queued (with position), or a one-line reason."""
        await self.queue.r.set(self.keys.name_index(cmd.adapter, cmd.user_name), cmd.user_id)
        await self.queue.r.set(self.keys.display_name(cmd.user_id), f"{cmd.adapter}:{cmd.user_name}")
        name, _, rest = cmd.text.strip().partition(" ")
        handler = COMMANDS.get(name.lower().split("@")[0])
        if handler is None:
            return Reply(f"unknown command {name!r}: try /help")
        return await handler(self, cmd, rest.strip())

    async def react(self, reaction: Reaction) -> Reply:
        """Rerun a result: stronger or weaker (edits), refine (more steps), redo (same command, current face)."""
        if reaction.action not in ACTIONS:
            return Reply(f"unknown reaction {reaction.action!r}")
        result = await self.store.result(reaction.user_id, reaction.result_id)
        if result is None:
            return Reply("that result has expired, or it is not yours to rerun")
        cmd = Command(reaction.adapter, reaction.user_id, "", "", origin=reaction.origin)
        op = result.meta.get("op")
        if reaction.action in ("stronger", "weaker"):
            if result.w0 is None:
                return Reply("only edits can be made stronger or weaker")
            factor = self.edit.stronger if reaction.action == "stronger" else self.edit.weaker
            return await self._enqueue(cmd, "restyle", {"result_id": reaction.result_id, "factor": factor})
        if reaction.action == "refine":
            if op not in ("invert", "edit"):
                return Reply("only faces and edits can be refined")
            return await self._enqueue(cmd, "refine", {"result_id": reaction.result_id})
        redo = result.meta.get("redo")
        if not redo:
            return Reply("that result cannot be redone; send the command again")
        if redo["op"] in ("edit", "morph") and await self.store.face(reaction.user_id) is None:
            return Reply("there is no face for you yet: send a photo with /invert first")
        if redo["op"] == "morph":
            for uid in (redo["params"]["a"], redo["params"]["b"]):
                if uid != reaction.user_id and not await self.store.is_shared(uid):
                    return Reply("the other person no longer allows morphs with their face")
        if redo["op"] == "invert":
            redo = {"op": "refine", "params": {"result_id": reaction.result_id, "restart": True}}
        return await self._enqueue(cmd, redo["op"], dict(redo["params"]))

    async def react_emoji(self, adapter: str, user_id: str, message_ref: str, emoji: str,
                          origin: dict | None = None) -> Reply | None:
        """A reaction on a platform message: None when the emoji means nothing to us (stay quiet), else a reply."""
        action = self.chat.action(emoji)
        if action is None:
            return None
        return await self.react_message(adapter, user_id, message_ref, action, origin)

    async def react_message(self, adapter: str, user_id: str, message_ref: str, action: str,
                            origin: dict | None = None) -> Reply:
        """A rerun asked for on a platform message (a reaction or a button under it)."""
        found = await self.result_at(adapter, message_ref)
        if found is None:
            return Reply("that message is not one of my results, or it has expired")
        owner, result_id = found
        if owner != user_id:
            return Reply("only the person who asked for a result can rerun it")
        return await self.react(Reaction(adapter, user_id, result_id, action, origin or {}))

    # -- where answers go: origins of jobs, messages that show results ---------------------------------------

    async def origin(self, user_id: str, job_id: str) -> dict | None:
        """Where a job's answer goes, as the adapter gave it (plus "op" and, once posted, "status")."""
        raw = await self.queue.r.get(self.keys.origin(user_id, job_id))
        return json.loads(raw) if raw else None

    async def set_status_message(self, user_id: str, job_id: str, ref: str) -> None:
        """Remember the message that acknowledged a job: progress edits it."""
        origin = await self.origin(user_id, job_id)
        if origin is not None:
            origin["status"] = ref
            await self.queue.r.set(self.keys.origin(user_id, job_id), json.dumps(origin), keepttl=True)

    async def remember_result(self, adapter: str, message_ref: str, user_id: str, result_id: str) -> None:
        """A platform message now shows a result: reactions on it rerun that result."""
        await self.queue.r.set(self.keys.message(adapter, message_ref), f"{user_id} {result_id}",
                               ex=self.chat.result_ttl_s)

    async def aligned_crop(self, user_id: str, result_id: str | None) -> bytes | None:
        """PNG of the aligned face crop behind a face result (kept with it for refines), or None."""
        return await self.queue.r.get(self.keys.target(user_id, result_id)) if result_id else None

    async def result_at(self, adapter: str, message_ref: str) -> tuple[str, str] | None:
        """(owner user id, result id) of the result a message shows, or None."""
        raw = await self.queue.r.get(self.keys.message(adapter, message_ref))
        if not raw:
            return None
        owner, _, result_id = (raw.decode() if isinstance(raw, bytes) else raw).rpartition(" ")
        return owner, result_id

    # -- commands --------------------------------------------------------------------------------------------

    async def cmd_invert(self, cmd: Command, rest: str) -> Reply:
        """/invert (with a photo): find your face's latent and show its reconstruction"""
        if cmd.photo is None:
            return Reply("send a photo with /invert as its caption")
        problem = check_photo(cmd.photo, self.limits)
        if problem:
            return Reply(problem)
        return await self._enqueue(cmd, "invert", {}, photo=cmd.photo)

    async def cmd_morph(self, cmd: Command, rest: str) -> Reply:
        """/morph @a @b [frames]: a GIF from one face to another (@me is you)"""
        m = re.fullmatch(r"@(\S+)\s+@(\S+)(?:\s+(\d+))?", rest)
        if not m:
            return Reply("usage: /morph @me @friend [frames]")
        frames = int(m.group(3) or self.limits.default_frames)
        if not 2 <= frames <= self.limits.max_frames:
            return Reply(f"frames must be between 2 and {self.limits.max_frames}")
        users, names = [], {}
        for name in (m.group(1), m.group(2)):
            uid = (cmd.user_id if name.lower() == "me"
                   else cmd.mentions.get(name) or await self.user_called(cmd.adapter, name))
            if uid is None:
                return Reply(f"I don't know @{name}: they need to talk to me once (for example /help)")
            if uid != cmd.user_id and not await self.store.is_shared(uid):
                return Reply(f"@{name} has not allowed morphs with their face: they can send /share to allow it")
            if await self.store.face(uid) is None:
                who = "you" if uid == cmd.user_id else f"@{name}"
                return Reply(f"there is no face for {who} yet: send a photo with /invert first")
            users.append(uid)
            names[uid] = "you" if uid == cmd.user_id else f"@{name}"
        return await self._enqueue(cmd, "morph", {"a": users[0], "b": users[1], "frames": frames, "names": names})

    async def cmd_edit(self, cmd: Command, rest: str) -> Reply:
        """/edit <text>: change your face toward a description, e.g. /edit really angry face"""
        prompt = " ".join(rest.split())
        if not prompt:
            return Reply("the prompt is empty: describe the edit, e.g. /edit really angry face")
        if len(prompt) > self.edit.max_prompt_chars:
            return Reply(f"the prompt is {len(prompt)} characters long; keep it under {self.edit.max_prompt_chars}")
        if await self.store.face(cmd.user_id) is None:
            return Reply("there is no face for you yet: send a photo with /invert first")
        return await self._enqueue(cmd, "edit", {"prompt": prompt})

    async def cmd_share(self, cmd: Command, rest: str) -> Reply:
        """/share: allow others to /morph with your face"""
        await self.store.share(cmd.user_id, True)
        return Reply("others can now /morph with your face; /unshare stops it")

    async def cmd_unshare(self, cmd: Command, rest: str) -> Reply:
        """/unshare: stop others from using your face"""
        await self.store.share(cmd.user_id, False)
        return Reply("others can no longer /morph with your face")

    async def cmd_forget(self, cmd: Command, rest: str) -> Reply:
        """/forget: delete your face, your results and everything else I keep about you"""
        name = await self.queue.r.get(self.keys.display_name(cmd.user_id))
        if name:
            adapter, _, user_name = (name.decode() if isinstance(name, bytes) else name).partition(":")
            await self.queue.r.delete(self.keys.name_index(adapter, user_name))
        for job_id in await self.queue.r.smembers(self.keys.user_jobs(cmd.user_id)):  # photos of unfinished jobs
            await self.queue.r.delete(self.keys.photo(job_id.decode() if isinstance(job_id, bytes) else job_id))
        n = await self.store.forget(cmd.user_id)
        return Reply(f"done: deleted everything I kept about you ({n} items)")

    async def cmd_status(self, cmd: Command, rest: str) -> Reply:
        """/status: the queue, the engine, and your face"""
        engines = [k async for k in self.queue.r.scan_iter(match=self.keys.heartbeat_pattern)]
        face = await self.store.face(cmd.user_id)
        return Reply(f"engines online: {len(engines)}; jobs in the queue: {await self.queue.pending_count()}; "
                     + (f"your face: {face.model_id}" if face else "no face for you yet"))

    async def cmd_help(self, cmd: Command, rest: str) -> Reply:
        """/help: this list"""
        lines = [f.__doc__ for f in COMMANDS.values()]
        lines.append("react to a result to rerun it: " + "; ".join(
            f"{getattr(self.chat, f'{a}_emoji').split()[0]} {what}" for a, what in ACTIONS.items()))
        return Reply("\n".join(lines))

    # -- helpers ---------------------------------------------------------------------------------------------

    async def user_called(self, adapter: str, name: str) -> str | None:
        """The user id known as `name` on an adapter, or None."""
        uid = await self.queue.r.get(self.keys.name_index(adapter, name))
        return uid.decode() if isinstance(uid, bytes) else uid

    async def _enqueue(self, cmd: Command, op: str, params: dict, photo: bytes | None = None) -> Reply:
        if await self.queue.pending_count() >= self.limits.max_queue:
            return Reply("I'm busy right now: try again in a few minutes")
        if await self.queue.r.scard(self.keys.user_jobs(cmd.user_id)) >= self.limits.max_jobs_per_user:
            return Reply(f"you already have {self.limits.max_jobs_per_user} jobs waiting: wait for one to finish")
        job = Job(op=op, user_id=cmd.user_id, adapter=cmd.adapter, params=params)
        origin = {**cmd.origin, "op": op, "job_id": job.job_id, "doing": job_words(op, params)}
        await self.queue.r.set(self.keys.origin(cmd.user_id, job.job_id), json.dumps(origin), ex=self.chat.result_ttl_s)
        position = await self.queue.enqueue(job, photo=photo)
        engines = [k async for k in self.queue.r.scan_iter(match=self.keys.heartbeat_pattern)]
        ahead = position - 1
        if not engines:
            when = "waiting for the engine, which is offline right now" + (f" ({ahead} jobs ahead)" if ahead else "")
        else:
            when = f"waiting behind {ahead} job{'s' * (ahead > 1)}" if ahead else "starting now"
        return Reply(f"{job_words(op, params)}: {when}", job_id=job.job_id)


COMMANDS = {
    "/invert": BotCore.cmd_invert, "/morph": BotCore.cmd_morph, "/edit": BotCore.cmd_edit,
    "/share": BotCore.cmd_share, "/unshare": BotCore.cmd_unshare, "/forget": BotCore.cmd_forget,
    "/status": BotCore.cmd_status, "/help": BotCore.cmd_help,
}
