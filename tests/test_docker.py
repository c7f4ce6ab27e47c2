"""Docker cannot build here, so check what can be checked: every container runs a real `stylebot` command, the
engine reserves a GPU, secrets come from the environment, the web chat is published on loopback only."""

from __future__ import annotations

import re

import yaml

from bot.cli import build_parser
from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_runs_a_stylebot_command_that_parses():
    parser = build_parser()
    for name, service in COMPOSE["services"].items():
        if name == "redis":
            continue
        args = parser.parse_args(service["command"])
        assert args.command == service["command"][0]
        assert service["environment"]["STYLEBOT_REDIS_URL"] == "redis://redis:6379/0"


def test_engine_reserves_a_gpu_and_keeps_weights_in_a_volume():
    engine = COMPOSE["services"]["engine"]
    devices = engine["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.startswith("weights:") for v in engine["volumes"])
    assert "--appendonly" in COMPOSE["services"]["redis"]["command"]


def test_no_secret_values_in_compose_and_web_on_loopback():
    for service in COMPOSE["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if "TOKEN" in key or "PASSWORD" in key:
                assert re.fullmatch(r"\$\{\w+:-\}", value), f"{key} must come from the environment"
    assert COMPOSE["services"]["web"]["ports"] == ["127.0.0.1:8080:8080"]


def test_dockerfile_runs_as_a_user_with_the_pinned_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER stylebot$", text, re.M)
    readme = (ROOT / "README.md").read_text()
    pins = re.findall(r"torch==\S+ torchvision==\S+", text)
    assert pins and pins[0] in readme
