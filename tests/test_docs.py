"""README.md and docs/ say only what works: every `stylebot ...` command they show parses, and every relative link
(and its #anchor) leads somewhere. The parser is built in-process (`bot.cli.build_parser`, which imports no torch),
so this takes well under a second."""

from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from collections.abc import Iterator

import pytest

from bot.cli import build_parser
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # a span may wrap onto the next line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def shown(page) -> tuple[list[list[str]], list[list[str]]]:
    """(commands in code blocks, commands in inline code) of one page: each the arguments after `stylebot`."""
    text = page.read_text()
    blocks, inline = [], []
    for block in FENCE.findall(text):
        for line in block.splitlines()[1:-1]:
            if not re.search(r"(^|[\s/])stylebot(\s|$)", line):  # not a command line (diagrams, docker compose)
                continue
            for part in re.split(r"&&|\|\||;|\|", line):
                if args := after_stylebot(shlex.split(part, comments=True)):
                    blocks.append(args)
    for span in INLINE.findall(FENCE.sub("", text)):
        if (args := after_stylebot(span.split())) and args[0] != "...":  # `stylebot ...`: any command
            inline.append(args)
    return blocks, inline


def after_stylebot(words: list[str]) -> list[str] | None:
    for i, word in enumerate(words):
        if word == "stylebot" or word.endswith("/stylebot"):
            return words[i + 1:] or ["--help"]
    return None


def subcommand_path(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """The subcommands that `args` names, in order (`weights download ffhq-256` -> `weights download`)."""
    path = []
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not args or args[0] not in subs[0].choices:
            return path
        path.append(args[0])
        parser, args = subs[0].choices[args[0]], args[1:]


def commands() -> tuple[set[tuple[str, ...]], set[tuple[str, ...]]]:
    blocks, inline = set(), set()
    for page in PAGES:
        b, i = shown(page)
        blocks.update(tuple(c) for c in b)
        inline.update(tuple(c) for c in i)
    return blocks, inline


def test_the_pages_show_commands_at_all():
    blocks, inline = commands()
    assert ("run",) in blocks  # README's run command
    assert len(blocks) >= 10 and len(inline) >= 10


def test_every_command_in_a_code_block_parses_as_written(capsys):
    blocks, _ = commands()
    for args in sorted(blocks):
        if "--help" in args:
            continue
        try:
            parsed = build_parser().parse_args(list(args))
        except SystemExit:
            pytest.fail(f"`stylebot {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()}")
        assert callable(parsed.handler), args


def test_the_help_of_every_subcommand_shown(capsys):
    """`--help` of each distinct subcommand path that a page shows, in code blocks or inline (`weights download`
    is a subcommand of the group `weights`), exits 0."""
    blocks, inline = commands()
    parser = build_parser()
    paths = {tuple(subcommand_path(parser, list(args))) for args in blocks | inline}
    unknown = sorted(" ".join(a) for a in blocks | inline if not subcommand_path(parser, list(a)) and a != ("--help",))
    assert not unknown, f"commands shown that stylebot does not have: {unknown}"
    assert ("weights", "download") in paths and ("run",) in paths
    for path in sorted(paths):
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args([*path, "--help"])
        assert exit.value.code == 0, path
        assert "usage: stylebot" in capsys.readouterr().out


def anchors(page) -> Iterator[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens, -1 for repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+\s+(.*?)\s*$", FENCE.sub("", page.read_text()), re.M):
        slug = "".join(c for c in heading.lower().replace("`", "")
                       if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        yield slug if n == 0 else f"{slug}-{n}"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in set(anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for marker in ("<!-- run-command -->", "<!-- /run-command -->", "<!-- test-command -->", "<!-- /test-command -->"):
        assert readme.count(marker) == 1, marker
    assert "docs/images/web-chat.png" in readme
