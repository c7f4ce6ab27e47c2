"""config.toml: what ships is what the code defaults to, every option is explained, typos are caught."""

from __future__ import annotations

import dataclasses
import re

import pytest

from bot.config import SECTIONS, Config, ConfigError, load_config
from conftest import ROOT


def test_shipped_config_equals_the_code_defaults():
    cfg = load_config(ROOT / "config.toml")
    assert dataclasses.replace(cfg, source="defaults") == Config()


def test_every_option_in_config_toml_has_a_comment():
    lines = (ROOT / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+\s*=", line):
            assert lines[i - 1].startswith("#"), f"config.toml line {i + 1} ({line!r}) has no comment above it"


def test_every_dataclass_option_is_in_config_toml():
    text = (ROOT / "config.toml").read_text()
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):
            assert re.search(rf"^{f.name}\s*=", text, re.M), f"[{section}] {f.name} missing from config.toml"


@pytest.mark.parametrize("body, message", [
    ("[engine]\ndevise = 'cpu'\n", "unknown option(s) in [engine]: ['devise']"),
    ("[engin]\n", "unknown section(s) ['engin']"),
    ("[weights]\ndownload_timeout = 'soon'\n", "download_timeout must be float"),
    ("[engine\n", "config.toml"),
    ('[engine]\nscheduler = "static"\n', "[engine] scheduler was removed: the engine always batches continuously now"),
    ("[queue]\nbatch_size = 8\n", "[queue] batch_size was removed: it sized the static scheduler's batches"),
])
def test_bad_config_is_one_clear_line(tmp_path, body, message):
    p = tmp_path / "config.toml"
    p.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert message in str(err.value) and str(p) in str(err.value)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().engine.device = "cuda"
