"""`stylebot`: the one console script. Reads config.toml once, then runs a subcommand."""

from __future__ import annotations

import argparse
import os
import sys

# Before torch loads its OpenMP runtime: threads that wait at the end of a parallel region sleep instead of spinning.
# Spinning, torch's threads took the cores from each other and from other processes: on 2 busy cores, an inversion
# on tiny had 40-60 steps of up to 3.7 s (about 50 s for 300 steps); with threads that sleep, none over 0.2 s after
# the first, and 17-22 s (`docs/benchmarks.md#cpu-threads`). Set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bot.config import load_config  # noqa: E402
from storage.errors import StylebotError, set_prog  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from bot import model_commands, serve

    parser = argparse.ArgumentParser(
        prog="stylebot",
        description="A chat bot that puts your face into StyleGAN's latent space and plays with it.",
    )
    parser.add_argument("--config", help="config file (default: $STYLEBOT_CONFIG, else ./config.toml, else defaults)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_commands(sub)
    model_commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_prog(sys.argv[0])  # hints name stylebot the way it was started here
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        return args.handler(args, cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except StylebotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
