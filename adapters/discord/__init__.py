"""Discord front end (discord.py 2.7): slash commands -> `bot.core.Command`s, the engine's answers -> messages.

- Application commands with typed options: `/invert photo:<attachment>` (its size is checked before it is
  downloaded), `/morph a:<user> b:<user> [frames]`, `/edit prompt:<text>`, `/forget`, `/share`, `/unshare`,
  `/status`, `/help`. Each is deferred at once; its original response shows the core's reply, then the progress.
- A result comes as a follow-up of the interaction while its token lives (15 minutes), later as a channel message
  that mentions the user. Buttons under it (they keep working after a restart) and emoji reactions rerun it.
- Intents: guilds (channels, upload limits) and reactions (guilds and DMs); nothing privileged. Interactions
  need no intent, and the users a command names arrive resolved in its payload.
- One central error handler: nothing a user sends crashes the client.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time

import discord
from discord import app_commands

from adapters.base import EventPump, Result, rerun_hint
from bot.core import COMMANDS, BotCore, Command, Reaction, Reply, human_size
from storage.records import Origin

log = logging.getLogger("stylebot.discord")

FOLLOWUP_WINDOW_S = 14 * 60             # an interaction token lasts 15 minutes: keep a minute's margin
UPLOAD_LIMIT = 10 * 2**20               # what any server accepts; boosted servers and interactions may say more
SORRY = "something went wrong on my side; please try again"


def _uid(user: discord.abc.Snowflake) -> str:
    return f"discord:{user.id}"


def _ref(channel_id: int, message_id: int) -> str:
    return f"{channel_id}:{message_id}"


def _only(user_id: int | str) -> discord.AllowedMentions:
    """Mentions that ping this user and nobody else (captions carry users' prompts)."""
    return discord.AllowedMentions(everyone=False, roles=False, replied_user=False,
                                   users=[discord.Object(int(user_id))])


class RerunButton(discord.ui.DynamicItem[discord.ui.Button],
                  template=r"stylebot:(?P<action>[a-z]+):(?P<result_id>[0-9a-f]+)"):
    """A button under a result (stronger, weaker, refine, redo); its custom id carries all it needs."""

    def __init__(self, action: str, result_id: str, label: str | None = None):
        super().__init__(discord.ui.Button(label=label or action, style=discord.ButtonStyle.secondary,
                                           custom_id=f"stylebot:{action}:{result_id}"))
        self.action, self.result_id = action, result_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match) -> RerunButton:
        return cls(match["action"], match["result_id"], item.label)

    async def callback(self, interaction: discord.Interaction) -> None:
        """Rerun the result; errors go to the client's one error handler (discord.py would only log them)."""
        client = _bot(interaction)
        try:
            await client.rerun(interaction, self.action, self.result_id)
        except Exception as e:  # noqa: BLE001 - reported to the user in one line, logged in full
            await client.on_app_command_error(interaction, e)


def _bot(interaction: discord.Interaction) -> StyleBot:
    return interaction.client  # type: ignore[return-value]  # the client that received it: ours


def _about(name: str) -> str:
    """A command's description for Discord's picker: the core's help line without the usage part."""
    return (COMMANDS[f"/{name}"].__doc__ or name).partition(": ")[2][:100] or name


def _commands() -> list[app_commands.Command]:
    """The slash commands, with typed options; each hands its interaction to `StyleBot.ask`."""

    @app_commands.command(name="invert", description=_about("invert"))
    @app_commands.describe(photo="a photo with one face (JPEG or PNG)")
    async def invert(interaction: discord.Interaction, photo: discord.Attachment) -> None:
        """/invert photo: find your face's latent."""
        await _bot(interaction).ask(interaction, "/invert", attachment=photo)

    @app_commands.command(name="morph", description="a GIF from one face to another")
    @app_commands.describe(a="the first face (you, or someone who allowed it with /share)", b="the second face",
                           frames="how many frames the GIF has")
    async def morph(interaction: discord.Interaction, a: discord.User, b: discord.User,
                    frames: int | None = None) -> None:
        """/morph a b [frames]: a GIF from one face to another."""
        names, mentions = [], {}
        for who in (a, b):
            if who.id == interaction.user.id:
                names.append("me")
            else:
                names.append(who.name)
                mentions[who.name] = _uid(who)
        text = f"/morph @{names[0]} @{names[1]}" + ("" if frames is None else f" {frames}")
        await _bot(interaction).ask(interaction, text, mentions=mentions)

    @app_commands.command(name="edit", description=_about("edit"))
    @app_commands.describe(prompt="what the face should become, e.g. really angry face")
    async def edit(interaction: discord.Interaction, prompt: str) -> None:
        """/edit prompt: move your face toward a description."""
        await _bot(interaction).ask(interaction, f"/edit {prompt}")

    def plain(name: str) -> app_commands.Command:
        async def run(interaction: discord.Interaction) -> None:
            await _bot(interaction).ask(interaction, f"/{name}")

        run.__doc__ = f"/{name}: {_about(name)}"
        return app_commands.Command(name=name, description=_about(name), callback=run)

    return [invert, morph, edit] + [plain(n) for n in ("forget", "share", "unshare", "status", "help")]


class StyleBot(discord.AutoShardedClient):
    """The client (Discord -> core) and the `Platform` the event pump posts to (core -> Discord).

    AutoShardedClient, not Client: it asks `GET /gateway/bot` where the gateway is (and how many shards), so
    `[discord] api_url` is all it takes to point the bot at another server; a plain Client dials discord.gg.
    """

    name = "discord"

    def __init__(self, core: BotCore):
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_reactions = True
        intents.dm_reactions = True
        super().__init__(intents=intents, max_messages=None, allowed_mentions=discord.AllowedMentions.none())
        self.core = core
        self.tree = app_commands.CommandTree(self)
        for command in _commands():
            self.tree.add_command(command)
        self.tree.error(self.on_app_command_error)
        self._pump_stop = asyncio.Event()
        self._pump: asyncio.Task | None = None

    async def setup_hook(self) -> None:
        """Register the slash commands and the result buttons; start posting the engine's answers."""
        self.add_dynamic_items(RerunButton)
        await self.tree.sync()
        self._pump = asyncio.create_task(EventPump(self.core, self).run(self._pump_stop))

    async def close(self) -> None:
        """Stop the event pump (it finishes the post in hand), then disconnect."""
        self._pump_stop.set()
        if self._pump is not None and not self._pump.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._pump), 10)
            except Exception:  # noqa: BLE001 - a pump that does not stop in time is cancelled: closing anyway
                self._pump.cancel()
        await super().close()

    # -- Discord -> core -------------------------------------------------------------------------------------

    @staticmethod
    def origin(interaction: discord.Interaction) -> Origin:
        """Where a command's answers go: the interaction's follow-ups, later its channel."""
        return Origin(application_id=str(interaction.application_id), token=interaction.token,
                      channel_id=str(interaction.channel_id), created=interaction.created_at.timestamp(),
                      mention=str(interaction.user.id), upload_limit=interaction.filesize_limit)

    async def ask(self, interaction: discord.Interaction, text: str, *, attachment: discord.Attachment | None = None,
                  mentions: dict[str, str] | None = None) -> None:
        """A slash command: defer at once, hand it to the core, show the reply in the original response."""
        await interaction.response.defer(thinking=True)
        user, photo = interaction.user, None
        attached = len(((interaction.data or {}).get("resolved") or {}).get("attachments") or {})
        if attachment is not None and attached > 1:  # /invert has one photo option; a client may send more
            await interaction.edit_original_response(content=f"send one photo per /invert (this message has "
                                                             f"{attached})")
            return
        if attachment is not None:
            limit = self.core.limits.max_photo_bytes
            if attachment.size > limit:  # refused on what Discord says, before anything is downloaded
                await interaction.edit_original_response(
                    content=f"that photo is {human_size(attachment.size)}; send one under {human_size(limit)}")
                return
            photo = await attachment.read()
        reply = await self.core.handle(Command("discord", _uid(user), user.name, text, photo=photo,
                                               mentions=mentions or {}, origin=self.origin(interaction)))
        await self._acknowledge(interaction, reply)

    async def rerun(self, interaction: discord.Interaction, action: str, result_id: str) -> None:
        """A button under a result: the core reruns it; the reply is for the presser's eyes only."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        reply = await self.core.react(Reaction("discord", _uid(interaction.user), result_id, action,
                                               self.origin(interaction)))
        await self._acknowledge(interaction, reply)

    async def _acknowledge(self, interaction: discord.Interaction, reply: Reply) -> None:
        msg = await interaction.edit_original_response(content=reply.text)
        if reply.job_id:
            await self.core.set_status_message(_uid(interaction.user), reply.job_id,
                                               _ref(interaction.channel_id or 0, msg.id))

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """An emoji on one of our messages: the core reruns the result it shows, or says why not."""
        me = self.user
        if me is None or payload.user_id == me.id:
            return
        if payload.message_author_id is not None and payload.message_author_id != me.id:
            return  # people reacting to each other's messages: none of our business
        guild = self.get_guild(payload.guild_id) if payload.guild_id else None
        origin = Origin(channel_id=str(payload.channel_id), mention=str(payload.user_id),
                        upload_limit=guild.filesize_limit if guild else UPLOAD_LIMIT)
        uid = f"discord:{payload.user_id}"
        reply = await self.core.react_emoji("discord", uid, _ref(payload.channel_id, payload.message_id),
                                            str(payload.emoji), origin)
        if reply is None:
            return
        channel = self.get_partial_messageable(payload.channel_id, guild_id=payload.guild_id)
        sent = await channel.send(f"<@{payload.user_id}> {reply.text}", allowed_mentions=_only(payload.user_id),
                                  reference=channel.get_partial_message(payload.message_id).to_reference(
                                      fail_if_not_exists=False))
        if reply.job_id:
            await self.core.set_status_message(uid, reply.job_id, _ref(payload.channel_id, sent.id))

    # -- errors ----------------------------------------------------------------------------------------------

    async def on_app_command_error(self, interaction: discord.Interaction, error: Exception) -> None:
        """The one handler of failed commands and buttons: log it in full, tell the user one line."""
        what = (interaction.data or {}).get("name") or (interaction.data or {}).get("custom_id")
        text = SORRY
        if isinstance(error, app_commands.CommandNotFound):  # registered by an older version, gone from this one
            log.warning("discord: /%s is registered with Discord but unknown here", error.name)
            text = f"/{error.name} is not one of my commands any more: try /help"
        else:
            log.error("discord: %s by %s failed", what, interaction.user.id, exc_info=error)
        try:
            if interaction.response.is_done():
                await interaction.edit_original_response(content=text)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("discord: could not tell the user that it failed", exc_info=True)

    async def on_error(self, event_method: str, /, *args, **kwargs) -> None:
        """Any other handler that failed (a reaction): log it; one line in the channel when there is one."""
        log.exception("discord: %s failed", event_method)
        payload = args[0] if args else None
        if isinstance(payload, discord.RawReactionActionEvent):
            try:
                await self.get_partial_messageable(payload.channel_id).send(SORRY)
            except discord.HTTPException:
                pass

    # -- core -> Discord (Platform) --------------------------------------------------------------------------

    @staticmethod
    def _fresh(origin: Origin) -> bool:
        """Whether follow-ups on the origin's interaction token are still accepted."""
        return bool(origin.token) and time.time() - origin.created < FOLLOWUP_WINDOW_S

    def _webhook(self, origin: Origin) -> discord.Webhook:
        return discord.Webhook.partial(int(origin.application_id), origin.token, client=self)

    async def show_progress(self, origin: Origin, text: str, preview: bytes | None) -> None:
        if not origin.status:
            return
        channel_id, _, message_id = origin.status.partition(":")
        try:
            if self._fresh(origin):  # the interaction's own response (perhaps ephemeral): through its webhook
                await self._webhook(origin).edit_message(int(message_id), content=text)
            else:
                await self.get_partial_messageable(int(channel_id)).get_partial_message(int(message_id)).edit(
                    content=text)
        except discord.HTTPException as e:  # deleted, or the token expired: progress is best effort
            log.debug("discord: progress edit refused: %s", e)

    async def show_notice(self, origin: Origin, text: str) -> None:
        """In the channel where the person said /share, mentioning them."""
        mention = origin.mention
        content = f"<@{mention}> {text}" if mention else text
        await self.get_partial_messageable(int(origin.channel_id)).send(
            content[:2000], allowed_mentions=_only(mention) if mention else None)

    async def show_result(self, origin: Origin, result: Result) -> str | None:
        text, upload = f"couldn't do that: {result.text}", False
        if result.ok:
            limit = max(origin.upload_limit, UPLOAD_LIMIT)
            if len(result.payload) > limit:
                text = (f"couldn't post that result: it is {human_size(len(result.payload))} and this server "
                        f"takes files up to {human_size(limit)}")
            else:
                text = result.text + (f"\n{rerun_hint(self.core, result.actions)}" if result.actions else "")
                upload = bool(result.payload)

        def attached() -> dict:  # a File is read once: a fresh one per attempt
            if not upload:
                return {}
            extra: dict = {"file": discord.File(io.BytesIO(result.payload), filename=result.filename)}
            if result.actions:
                extra["view"] = self._buttons(result.result_id, result.actions)
            return extra

        if origin.answer and upload and not result.first:  # the refined answer: the first answer's message shows it
            try:
                await self._edit_answer(origin, text, attached)
                return origin.answer
            except discord.NotFound as e:  # deleted meanwhile: posted anew (other errors: the pump tries again)
                log.info("discord: the first answer %s is gone (%s); posting anew", origin.answer, e)
        if self._fresh(origin):
            try:
                sent = await self._webhook(origin).send(text[:2000], wait=True, **attached())
                return _ref(sent.channel.id, sent.id)
            except discord.HTTPException as e:
                if e.status not in (401, 404):  # 401/404: the token expired early (clocks differ): use the channel
                    raise
        mention = origin.mention
        content = f"<@{mention}> {text}" if mention else text
        channel = self.get_partial_messageable(int(origin.channel_id))
        sent = await channel.send(content[:2000], allowed_mentions=_only(mention) if mention else None, **attached())
        return _ref(sent.channel.id, sent.id)

    async def _edit_answer(self, origin: Origin, text: str, attached) -> None:
        """The message `origin.answer` (a follow-up of the interaction, or a channel message) shows `text` and the
        file that `attached()` makes (a fresh one per attempt) instead of what it showed."""
        channel_id, _, message_id = origin.answer.partition(":")
        if self._fresh(origin):
            extra = attached()
            try:
                await self._webhook(origin).edit_message(int(message_id), content=text[:2000],
                                                         attachments=[extra.pop("file")], **extra)
                return
            except discord.HTTPException as e:
                if e.status not in (401, 404):  # the token expired early: the message is edited in its channel
                    raise
        extra = attached()
        posted_by_webhook = self._fresh(origin)  # a follow-up mentions nobody; a channel message mentions its user
        content = f"<@{origin.mention}> {text}" if origin.mention and not posted_by_webhook else text
        await self.get_partial_messageable(int(channel_id)).get_partial_message(int(message_id)).edit(
            content=content[:2000], attachments=[extra.pop("file")], **extra)

    def _buttons(self, result_id: str, actions: tuple[str, ...]) -> discord.ui.View:
        view = discord.ui.View(timeout=None)
        for action in actions:
            emoji = getattr(self.core.chat, f"{action}_emoji").split()[0]
            view.add_item(RerunButton(action, result_id, f"{emoji} {action}"))
        return view


def build_client(cfg, core: BotCore) -> StyleBot:
    """The client for `core`; `cfg` is the whole config (its `[discord]` section says where Discord is)."""
    return StyleBot(core)


async def serve(cfg, core: BotCore, token: str, stop: asyncio.Event) -> None:
    """Connect to Discord and answer until `stop` is set, then close cleanly. The token is never logged."""
    discord.http.Route.BASE = cfg.discord.api_url.rstrip("/")
    client = build_client(cfg, core)
    async with client:
        running = asyncio.create_task(client.start(token))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not running.done():
                await client.close()
            await running  # a login refused, a gateway gone for good: raised here
