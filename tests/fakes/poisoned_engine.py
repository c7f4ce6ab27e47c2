"""`stylebot engine` with one injected fault, as a native library that crashes on one input would be: a job whose
photo is the file named by $POISON_PHOTO kills the engine's process (SIGKILL, no clean-up) while its face is aligned.
Run as `python tests/fakes/poisoned_engine.py --config ... engine --name ...` (the arguments of `bot.cli`)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import engine.handlers.invert as invert  # noqa: E402
from bot.cli import main  # noqa: E402

POISON = Path(os.environ["POISON_PHOTO"]).read_bytes()
_align_photo = invert.align_photo


def align_photo(photo: bytes | None, resolution: int):
    if photo == POISON:
        os.kill(os.getpid(), signal.SIGKILL)
    return _align_photo(photo, resolution)


invert.align_photo = align_photo

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
