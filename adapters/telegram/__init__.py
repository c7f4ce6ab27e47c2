"""Telegram front end (python-telegram-bot 22): Telegram updates -> `bot.core.Command`s, answers -> messages.

- `/invert` as the caption of a photo, as a reply to a photo, or on a photo sent as a file (uncompressed); the
  file size Telegram reports is checked against `[limits]` before anything is downloaded. An album (several photos
  sent at once arrive as one message each, with one `media_group_id`) is answered once, when all of it is in: one
  line that asks for one photo per /invert.
- `/morph @a @b [frames]`: @usernames are resolved by the core from the users it has seen; a text mention (a user
  without a username) carries the user id; replying to someone's message with `/morph @me` names them.
- Reactions on a result rerun it (`message_reaction` updates; in groups a bot sees them only as an admin), and
  every result carries small buttons that do the same.
- One central error handler: nothing a user sends can crash the application.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from telegram import (InlineKeyboardButton, InlineKeyboardMarkup, InputFile, InputMediaAnimation, InputMediaPhoto,
                      Message, ReplyParameters, Update)
from telegram.constants import ChatType
from telegram.error import BadRequest
from telegram.ext import (AIORateLimiter, Application, CallbackQueryHandler, ContextTypes, MessageHandler,
                          MessageReactionHandler, filters)

from adapters.base import EventPump, Result, rerun_hint
from bot.core import BotCore, Command, Reaction, human_size
from storage.records import Origin

log = logging.getLogger("stylebot.telegram")

ALLOWED_UPDATES = ["message", "message_reaction", "callback_query"]
BUTTON = "rr"                           # callback data: "rr:<action>:<result id>" (at most 64 bytes)
ALBUM_WAIT_S = 1.0                      # an album's messages arrive within a moment of each other: wait for the rest


def _uid(user) -> str:
    return f"telegram:{user.id}"


def _name(user) -> str:
    """A label for a user in a mention. Only a real @username is claimed as the user's @name (a first name is
    anyone's to type: "alice" without a username must not take @alice from the real one)."""
    return user.username or user.first_name or str(user.id)


def _ref(chat_id: int, message_id: int) -> str:
    return f"{chat_id}:{message_id}"


class TelegramBot:
    """The handlers (platform -> core) and the `Platform` the event pump posts to (core -> platform)."""

    name = "telegram"

    def __init__(self, core: BotCore, app: Application):
        self.core, self.app = core, app
        self._albums: dict[str, list[Message]] = {}   # media_group_id -> its messages so far
        self._answered: OrderedDict[str, tuple[str, int]] = OrderedDict()  # album -> (its command, photos seen)
        app.add_handler(MessageReactionHandler(self.on_reaction))
        app.add_handler(CallbackQueryHandler(self.on_button, pattern=rf"^{BUTTON}:"))
        app.add_handler(MessageHandler(filters.TEXT | filters.CAPTION | filters.PHOTO | filters.Document.ALL,
                                       self.on_message))
        app.add_error_handler(self.on_error)

    # -- platform -> core ------------------------------------------------------------------------------------

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A command, with or without a photo; an album's messages are gathered and answered once."""
        msg = update.effective_message
        user = update.effective_user
        if msg is None or user is None or user.is_bot:
            return
        if msg.media_group_id in self._answered:  # a late photo of an album answered already
            command, photos = self._answered[msg.media_group_id]
            self._answered[msg.media_group_id] = (command, photos + 1)
            if command == "/invert":
                await msg.reply_text(f"send one photo per /invert (this message has {photos + 1})")
            return
        if msg.media_group_id:
            album = self._albums.setdefault(msg.media_group_id, [])
            album.append(msg)
            if len(album) == 1:
                context.application.create_task(self._on_album(msg.media_group_id), update=update)
            return
        await self._on_message(msg, user)

    async def _on_album(self, group_id: str) -> None:
        """Several photos sent at once: the album's caption is the command, and /invert takes one photo."""
        await asyncio.sleep(ALBUM_WAIT_S)
        album = self._albums.pop(group_id)
        msg = next((m for m in album if m.caption), album[0])
        photos = sum(1 for m in album if m.photo or m.document)
        self._answered[group_id] = (await self._on_message(msg, album[0].from_user, photos) or "", photos)
        while len(self._answered) > 1000:
            self._answered.popitem(last=False)

    async def _on_message(self, msg: Message, user, photos: int = 1) -> str | None:
        """Answer one message (`photos`: how many its album has); the command it was, None when none."""
        text = (msg.text or msg.caption or "").strip()
        if not text.startswith("/"):
            if (msg.photo or msg.document) and msg.chat.type == ChatType.PRIVATE:
                text = "/invert"  # a photo sent to the bot on its own means /invert
            else:
                return None
        name, _, rest = text.partition(" ")
        command = name.split("@")[0].lower()
        if command == "/start":
            text = "/help"
        photo, refusal = None, None
        if command == "/invert" and photos > 1:
            refusal = f"send one photo per /invert (this message has {photos})"
        elif command == "/invert":
            photo, refusal = await self._photo(msg)
        if refusal:
            await msg.reply_text(refusal)
            return command
        mentions, text = self._mentions(msg, command, text)
        origin = Origin(chat_id=msg.chat_id, reply_to=msg.message_id)
        reply = await self.core.handle(Command("telegram", _uid(user), user.username or "", text, photo=photo,
                                               mentions=mentions, origin=origin))
        sent = await msg.reply_text(reply.text)
        if reply.job_id:
            await self.core.set_status_message(_uid(user), reply.job_id, str(sent.message_id))
        return command

    async def _photo(self, msg: Message) -> tuple[bytes | None, str | None]:
        """The photo of an /invert (its own, or the one it replies to), checked for size before downloading."""
        for m in (msg, msg.reply_to_message):
            if m is None:
                continue
            item = m.photo[-1] if m.photo else m.document
            if item is None:
                continue
            limit = self.core.limits.max_photo_bytes
            if item.file_size and item.file_size > limit:
                return None, f"that photo is {human_size(item.file_size)}; send one under {human_size(limit)}"
            data = bytes(await (await item.get_file()).download_as_bytearray())
            return data, None
        return None, None

    @staticmethod
    def _mentions(msg: Message, command: str, text: str) -> tuple[dict[str, str], str]:
        """@names Telegram resolved (text mentions of users without a username), and a replied-to user as @name."""
        mentions = {}
        for entity in msg.entities or ():
            if entity.type == "text_mention" and entity.user:
                label = _name(entity.user)
                shown = msg.parse_entity(entity)
                text = text.replace(shown, f"@{label}", 1)
                mentions[label] = _uid(entity.user)
        if command == "/morph" and msg.reply_to_message and msg.reply_to_message.from_user:
            other = msg.reply_to_message.from_user
            if text.count("@") == 1 and not other.is_bot:
                name, _, rest = text.partition(" ")
                first, _, frames = rest.partition(" ")
                text = f"{name} {first} @{_name(other)} {frames}".strip()
                mentions[_name(other)] = _uid(other)
        return mentions, text

    async def on_reaction(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """An emoji put on a message: rerun the result it shows, if it is one and the emoji means something."""
        r = update.message_reaction
        if r is None or r.user is None:
            return
        old = {getattr(x, "emoji", None) for x in r.old_reaction}
        for reaction in r.new_reaction:
            emoji = getattr(reaction, "emoji", None)
            if not emoji or emoji in old:
                continue
            origin = Origin(chat_id=r.chat.id, reply_to=r.message_id)
            reply = await self.core.react_emoji("telegram", _uid(r.user), _ref(r.chat.id, r.message_id), emoji,
                                                origin)
            if reply is not None:
                sent = await context.bot.send_message(r.chat.id, reply.text,
                                                      reply_parameters=ReplyParameters(r.message_id))
                if reply.job_id:
                    await self.core.set_status_message(_uid(r.user), reply.job_id, str(sent.message_id))
                return

    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A button under a result: stronger, weaker, refine or redo."""
        q = update.callback_query
        _, action, result_id = (q.data or "").split(":", 2)
        chat_id = q.message.chat.id if q.message else q.from_user.id
        origin = Origin(chat_id=chat_id, reply_to=q.message.message_id if q.message else None)
        reply = await self.core.react(Reaction("telegram", _uid(q.from_user), result_id, action, origin))
        await q.answer(reply.text[:200])
        if reply.job_id:
            sent = await context.bot.send_message(chat_id, reply.text)
            await self.core.set_status_message(_uid(q.from_user), reply.job_id, str(sent.message_id))

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log it; tell the user one line when there is someone to tell."""
        log.error("telegram update failed", exc_info=context.error)
        if isinstance(update, Update) and update.effective_chat is not None:
            try:
                await context.bot.send_message(update.effective_chat.id,
                                               "something went wrong on my side; please try again")
            except Exception:  # noqa: BLE001 - the chat may be gone
                pass

    # -- core -> platform (Platform) -------------------------------------------------------------------------

    async def show_progress(self, origin: Origin, text: str, preview: bytes | None) -> None:
        if not origin.status:
            return
        try:
            await self.app.bot.edit_message_text(text, chat_id=origin.chat_id, message_id=int(origin.status))
        except BadRequest as e:  # "message is not modified", or deleted by the user
            log.debug("progress edit refused: %s", e)

    async def show_notice(self, origin: Origin, text: str) -> None:
        await self.app.bot.send_message(origin.chat_id, text)

    async def show_result(self, origin: Origin, result: Result) -> str | None:
        bot, chat = self.app.bot, origin.chat_id
        reply_to = ReplyParameters(origin.reply_to, allow_sending_without_reply=True) if origin.reply_to else None
        if not result.ok:
            await bot.send_message(chat, f"couldn't do that: {result.text}", reply_parameters=reply_to)
            return None
        caption = result.text + (f"\n{rerun_hint(self.core, result.actions)}" if result.actions else "")
        markup = None
        if result.actions:
            markup = InlineKeyboardMarkup([[InlineKeyboardButton(
                f"{getattr(self.core.chat, f'{a}_emoji').split()[0]} {a}",
                callback_data=f"{BUTTON}:{a}:{result.result_id}") for a in result.actions]])
        media = InputFile(result.payload, filename=result.filename)
        if origin.answer and not result.first:  # the refined answer: the first answer's message shows it instead
            kind = InputMediaAnimation if result.media == "animation" else InputMediaPhoto
            answer_chat, _, message_id = origin.answer.partition(":")
            try:
                await bot.edit_message_media(kind(result.payload, caption=caption[:1024], filename=result.filename),
                                             chat_id=int(answer_chat), message_id=int(message_id), reply_markup=markup)
                return origin.answer
            except BadRequest as e:
                if "not modified" in str(e).lower():  # an earlier try did it (its answer was lost)
                    return origin.answer
                if "not found" not in str(e).lower():
                    raise
                log.info("telegram: the first answer %s is gone (%s); posting anew", origin.answer, e)
        send = bot.send_animation if result.media == "animation" else bot.send_photo
        sent = await send(chat, media, caption=caption[:1024], reply_parameters=reply_to, reply_markup=markup)
        return _ref(chat, sent.message_id)


def build_application(cfg, core: BotCore, token: str) -> tuple[Application, TelegramBot]:
    """PTB's Application against `[telegram] api_url` with a rate limiter, and our handlers on it."""
    app = (Application.builder().token(token).base_url(cfg.telegram.api_url).base_file_url(cfg.telegram.file_url)
           .rate_limiter(AIORateLimiter(max_retries=2)).build())
    return app, TelegramBot(core, app)


async def serve(cfg, core: BotCore, token: str, stop: asyncio.Event) -> None:
    """Poll Telegram and post answers until `stop` is set, then shut down cleanly."""
    app, bot = build_application(cfg, core, token)
    async with app:
        await app.start()
        await app.updater.start_polling(allowed_updates=ALLOWED_UPDATES, poll_interval=0.0, timeout=5)
        log.info("telegram: polling as @%s", app.bot.username)
        try:
            await EventPump(core, bot).run(stop)
        finally:
            await app.updater.stop()
            await app.stop()
