"""The base of every error whose message is meant for a person: one line, shown without a traceback; and `command`,
which names a stylebot command the way this user can run it. Every process raises these, so they live in the layer
every other one stands on (`storage` imports no other package of ours). `no_face_yet` is a line both the front
ends and the engine answer with."""

from __future__ import annotations

import os
import shutil
import sys

_prog = "stylebot"


class StylebotError(Exception):
    """A refusal or failure the user can act on; str(e) is the whole message."""


def no_face_yet(who: str) -> str:
    """The answer when `who` ("you", or "@name" of someone else) has no stored face: the step left, and whose it is.
    Said by the front ends (at once) and by the engine (when a face went meanwhile)."""
    if who == "you":
        return "there is no face for you yet: send a photo with /invert first"
    return f"there is no face for {who} yet: they need to send a photo with /invert first"


def command(rest: str) -> str:
    """`stylebot <rest>` as the running CLI was started (e.g. `.venv/bin/stylebot weights list`)."""
    return f"{_prog} {rest}"


def set_prog(argv0: str) -> None:
    """Remember how the running CLI was started (its sys.argv[0]) for the hints that `command` writes."""
    global _prog
    _prog = prog_for(argv0, list(getattr(sys, "orig_argv", [])))


def prog_for(argv0: str, orig_argv: list[str]) -> str:
    """How to start stylebot again: `stylebot` when that is on PATH, else the script or interpreter as typed."""
    if os.path.basename(argv0) == "stylebot":
        return "stylebot" if _same_file(shutil.which("stylebot"), argv0) else argv0
    if orig_argv[1:3] != ["-m", "bot.cli"]:
        return "stylebot"  # not started as a stylebot command (tests, embedding): the plain name
    python = orig_argv[0]
    script = os.path.join(os.path.dirname(python), "stylebot")
    if os.path.dirname(python) and os.path.isfile(script):
        return script  # the console script beside the interpreter, in the same environment
    on_path = shutil.which("stylebot")
    if on_path and _same_file(os.path.join(os.path.dirname(shutil.which(python) or ""), "stylebot"), on_path):
        return "stylebot"
    return f"{python} -m bot.cli"


def _same_file(a: str | None, b: str) -> bool:
    """Whether two paths name the same existing file."""
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False
