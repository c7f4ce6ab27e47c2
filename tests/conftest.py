from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as redis
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tests"))

torch.set_num_threads(2)


class ParityFixture:
    """tests/fixtures/stylegan2_parity.safetensors: tiny generators, inputs and outputs made by NVIDIA's code."""

    def __init__(self, path: Path = FIXTURES / "stylegan2_parity.safetensors"):
        self.tensors = load_file(str(path))
        meta = safe_open(str(path), "pt").metadata()
        self.cases: dict[str, dict] = json.loads(meta["cases"])
        self.truncation: dict = json.loads(meta["truncation"])

    def state(self, case: str) -> dict[str, torch.Tensor]:
        prefix = f"{case}.param."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str):
        return self.tensors.get(key)


@pytest.fixture(scope="session")
def parity() -> ParityFixture:
    return ParityFixture()


REDIS_URL = os.environ.get("STYLEBOT_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest_asyncio.fixture
async def client():
    """A client of the real Redis the tests run against (scripts/ensure-redis starts one)."""
    r = redis.from_url(REDIS_URL)
    try:
        await r.ping()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"these tests need a Redis server at {REDIS_URL} (scripts/ensure-redis starts one): {e}")
    yield r
    await r.aclose()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A config.toml whose weights cache is a fresh temporary folder."""
    p = tmp_path / "config.toml"
    p.write_text(f'[engine]\ndevice = "cpu"\nmodel = "tiny"\n\n[weights]\ndir = "{tmp_path / "weights"}"\n'
                 "download_timeout = 5.0\n")
    return p
