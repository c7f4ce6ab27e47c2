"""`stylebot`: the one console script. Reads config.toml once, then runs a subcommand."""

from __future__ import annotations

import argparse
import sys

from bot.config import load_config
from storage.errors import StylebotError, set_prog


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
