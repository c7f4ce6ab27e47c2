"""The packages' layers hold: `storage` (Redis, and the error base every process raises) imports no other package of
ours; `engine` imports only `storage`; the bot core (`bot/`: config, photo checks, the core) may use torch-free parts
of the engine, and `adapters` the bot core; on top, the `stylebot` entry point and the commands it runs start
engines and front ends, so they may import any package. And the front ends (the bot core, the adapters, the
`stylebot` parser) never load torch, so a chat process stays small and starts in a moment."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "engine", "adapters", "storage")
# which of our packages each one may import (itself included), from any of its modules, at any depth
ALLOWED = {
    "storage": {"storage"},
    "engine": {"engine", "storage"},
    "bot": {"bot", "engine", "storage"},  # torch-free engine modules at import time (align's size check); the
                                          # model commands import the rest inside their handlers
    "adapters": {"adapters", "bot", "storage"},
}
SHELL = {"bot/cli.py", "bot/serve.py", "bot/model_commands.py"}  # the entry point and its commands: any package
FRONT_ENDS = ["bot.cli", "bot.core", "bot.serve", "adapters.base", "adapters.web", "adapters.telegram",
              "adapters.discord"]
HEAVY = ("torch", "torchvision", "open_clip", "dlib")


def imports_of(path: Path) -> set[tuple[str, int]]:
    """(our top-level package, line) of every absolute import in a file, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update((n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in PACKAGES)
    return found


def layer_violations(root: Path) -> list[str]:
    """Every import that goes against the layers, as "path:line imports package"."""
    out = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            if str(path.relative_to(root)) in SHELL:
                continue
            out += [f"{path.relative_to(root)}:{line} imports {imported}"
                    for imported, line in sorted(imports_of(path)) if imported not in allowed]
    return out


def test_no_package_imports_a_layer_above_it():
    assert layer_violations(ROOT) == []


def test_the_check_finds_an_engine_module_that_imports_the_bot(tmp_path):
    """On a copy of the tree where the engine's loop imports bot.config, the check names that line, and only it."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    loop = tmp_path / "engine" / "loop.py"
    lines = loop.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("import asyncio"))
    lines.insert(at, "from bot.config import Config\n")
    loop.write_text("".join(lines))
    assert layer_violations(tmp_path) == [f"engine/loop.py:{at + 1} imports bot"]


@pytest.mark.parametrize("module", FRONT_ENDS)
def test_a_front_end_does_not_load_torch(module):
    """Imported in a fresh interpreter, a front end (with the whole `stylebot` parser built, every subcommand's
    options) leaves torch, torchvision, open_clip and dlib unloaded."""
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); import bot.cli; "
            f"bot.cli.build_parser(); print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []
