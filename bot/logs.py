"""One logging set-up for every long-running stylebot process (run, engine, the front ends): our own messages at
INFO, libraries' at WARNING (discord.py, python-telegram-bot and httpx narrate every request at INFO; open_clip's
remarks are rerouted to our DEBUG where it builds a model, see `engine.edit`). `STYLEBOT_LOG_LEVEL=DEBUG` shows ours
in full."""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(name)s %(message)s"


def setup_logging() -> None:
    """Root at WARNING with one stderr handler; the `stylebot` loggers at INFO (or $STYLEBOT_LOG_LEVEL)."""
    logging.basicConfig(level=logging.WARNING, format=FORMAT)
    level = os.environ.get("STYLEBOT_LOG_LEVEL", "INFO").upper()
    logging.getLogger("stylebot").setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
