"""Every kind of job the engine runs, found by the job's op: a new kind is a handler (`engine.handlers.base`) in a
file of its own and one line here."""

from __future__ import annotations

from engine.handlers.base import Handler, OnePass, Rows, Work
from engine.handlers.edit import Edit
from engine.handlers.invert import Invert
from engine.handlers.morph import Morph
from engine.handlers.refine import Refine
from engine.handlers.restyle import Restyle

HANDLERS: dict[str, Handler] = {
    "invert": Invert(),     # a photo -> the user's face (a row of the pool)
    "edit": Edit(),         # a prompt -> an edited face (a row)
    "refine": Refine(),     # more steps for a face or an edit, or a redo of a face (a row)
    "restyle": Restyle(),   # an edit made stronger or weaker (one pass, at once)
    "morph": Morph(),       # two faces -> a GIF (one pass, a few frames between ticks)
}

__all__ = ["HANDLERS", "Handler", "OnePass", "Rows", "Work"]
