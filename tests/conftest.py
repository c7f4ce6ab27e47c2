from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# As `stylebot` does (bot/cli.py): torch's threads sleep at barriers instead of spinning, before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
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
    """tests/fixtures/stylegan2_parity.safetensors: inputs and outputs that NVIDIA's code computed with tiny
    generators whose weights are drawn from the seeds it records (scripts/make_stylegan2_parity.py)."""

    def __init__(self, path: Path = FIXTURES / "stylegan2_parity.safetensors"):
        self.tensors = load_file(str(path))
        meta = safe_open(str(path), "pt").metadata()
        self.cases: dict[str, dict] = json.loads(meta["cases"])
        self.truncation: dict = json.loads(meta["truncation"])
        self.weight_seeds: dict[str, int] = json.loads(meta["weight_seeds"])
        self.fingerprints: dict[str, str] = json.loads(meta["fingerprints"])

    def state(self, case: str) -> dict[str, torch.Tensor]:
        """The case's weights, under NVIDIA's names (which are ours): drawn as the script drew them."""
        from engine.stylegan2 import Generator, StyleGAN2Config
        from fingerprints import fingerprint, seeded_weights

        G = Generator(StyleGAN2Config(**self.cases[case]))
        state = G.state_dict()
        state.update(seeded_weights({k: v.shape for k, v in state.items() if not k.endswith("resample_filter")},
                                    self.weight_seeds[case]))
        G.load_state_dict(state, strict=True)
        assert fingerprint(G) == self.fingerprints[case], (
            "our StyleGAN2 no longer holds the weights the fixture was computed with: "
            "regenerate it with scripts/make_stylegan2_parity.py")
        return state

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str):
        return self.tensors.get(key)


def stylegan1_port_state(part: str) -> dict[str, torch.Tensor]:
    """What the StyleGAN1 parity fixture's `part` ("mapping", or case "a" / "b"'s synthesis) held when the port's
    code computed it, under the port's names, as a port file holds it: the weights drawn from the seed the fixture
    records, by the names and shapes it records (scripts/make_stylegan1_parity.py), and the port's fixed blur kernel
    (the script checked that it is our Blur's) under each buffer name it records."""
    from engine.stylegan1 import Blur
    from fingerprints import seeded_weights

    meta = safe_open(str(FIXTURES / "stylegan1_parity.safetensors"), "pt").metadata()
    state = seeded_weights(json.loads(meta["param_shapes"])[part], json.loads(meta["seeds"])[part])
    state.update({k: Blur().kernel for k in json.loads(meta["buffer_names"]).get(part, [])})
    return state


# How close a float32 computation must come to a reference computed by other code (NVIDIA's, the port's) on another
# CPU. Sums taken in another order (another SIMD width, another convolution algorithm, another batch size) differ
# by a few ulp each; through a dozen layers of unnormalised random weights the outputs reach |20| and the rounding
# grows with them, so the bound is relative to the output's largest magnitude. Measured: 0 to 3.5e-6 of that scale
# on 1 and 2 threads with the earlier fixtures, 0 to 2.0e-6 with today's (2 threads, AMD EPYC); real defects the
# fixtures guard (noise on/off, fused vs plain upscale) are above 1e-3.
PARITY_REL_TOL = 1e-4


def close_to_reference(ours: torch.Tensor, ref: torch.Tensor, rel: float = PARITY_REL_TOL) -> bool:
    """|ours - ref| <= rel * max |ref| everywhere (see PARITY_REL_TOL), shapes equal."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.detach().float() - ref.float()).abs().max().item()
    scale = max(ref.abs().max().item(), 1.0)
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x output scale {scale:.3g}"
    return True


@pytest.fixture(scope="session")
def parity() -> ParityFixture:
    return ParityFixture()


REDIS_URL = os.environ.get("STYLEBOT_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest_asyncio.fixture
async def client():
    """A client of the real Redis the tests run against (scripts/ensure-redis starts one)."""
    r = redis.from_url(REDIS_URL, socket_timeout=30)  # a loaded 2-core machine can stall Redis for seconds
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


@pytest.fixture(scope="module")
def G():
    """The built-in tiny StyleGAN2 (random weights), once per test module."""
    from engine.registry import build_builtin, registry_entries

    return build_builtin(registry_entries()["tiny"])


@pytest.fixture(scope="module")
def vgg():
    """A VGG16 of an eighth of the width (random weights), for tiny inversions."""
    from engine.perceptual import load_vgg16

    return load_vgg16(width=0.125)


@pytest.fixture(scope="module")
def clip():
    """The tiny random CLIP that /edit uses with the built-in models."""
    from engine.edit import TINY_CLIP, ClipScorer

    return ClipScorer(TINY_CLIP, None)


@pytest.fixture(scope="module")
def faces(G):
    """(ws, images): three targets the tiny generator drew from known latents (a self-inversion can reach them)."""
    import torch

    from engine.images import to_uint8

    torch.manual_seed(5)
    with torch.no_grad():
        ws = G.mapping(torch.randn(3, G.z_dim), None, truncation_psi=0.7)
    return ws, to_uint8(G.synthesis(ws))


class ResultRecorder:
    """A platform that keeps the results it was asked to post (progress is not kept); message refs are counters."""

    name = "web"

    def __init__(self):
        self.results = []

    async def show_progress(self, origin, text, preview):
        pass

    async def show_result(self, origin, result):
        self.results.append(result)
        return f"m{len(self.results)}"


class Stack:
    """A bot core and a running in-process engine (tiny models) on a fresh key prefix of the test Redis."""

    def __init__(self, client, *, chat=None, limits=None, invert_steps: int = 20, edit_steps: int = 10,
                 model: str = "tiny", max_active: int = 8, encoder=False, refine: bool = True):
        import uuid

        from bot.config import ChatConfig, LimitsConfig
        from bot.core import BotCore
        from engine.edit import TINY_CLIP, ClipScorer
        from engine.perceptual import load_vgg16
        from engine.registry import build_builtin, registry_entries
        from engine.loop import Engine
        from engine.services import EngineSettings
        from storage.keys import Keys
        from storage.latents import LatentStore
        from storage.queue import JobQueue

        self.client = client
        self.keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
        self.queue = JobQueue(client, self.keys, reclaim_idle_ms=60_000)
        self.store = LatentStore(client, self.keys)
        chat = chat or ChatConfig(progress_interval_s=0.0)
        self.core = BotCore(self.queue, self.store, limits or LimitsConfig(), chat=chat)
        G = build_builtin(registry_entries()[model])
        self.encoder_file = None
        slot = None
        # first answers: an encoder trained a few steps for G (or the file `encoder` names), as the engine finds it
        if encoder:
            import tempfile
            from pathlib import Path

            from engine.encoders import load_encoder
            from engine.services import EncoderSlot

            if isinstance(encoder, Path):  # one trained for longer (the screenshots of docs/images)
                trained = encoder
            else:
                self.encoder_file = trained = Path(tempfile.mkdtemp()) / f"{model}.pt"
                train_encoder(G, trained)
            slot = EncoderSlot(lambda: trained, lambda path: load_encoder(path, generator=G))
        self.engine = Engine(G, self.queue, self.store, vgg=load_vgg16(width=0.125),
                             clip_factory=lambda: ClipScorer(TINY_CLIP, None), encoder=slot,
                             settings=EngineSettings(name="test-engine", invert_steps=invert_steps,
                                                     edit_steps=edit_steps, progress_every=5, preview_every=10,
                                                     max_active=max_active, refine=refine))
        self._stop = None
        self._task = None

    async def start_engine(self) -> None:
        import asyncio

        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.engine.run(self._stop))
        # online before the test speaks: a command sent while the engine is still starting is answered "waiting for
        # the engine, which is offline", which is right, but not what a test of a running engine expects
        async def online():
            while self.engine.name not in await self.queue.engines_online():
                if self._task.done():
                    self._task.result()  # the engine failed to start: its error, not a timeout
                await asyncio.sleep(0.02)
        await asyncio.wait_for(online(), 120)

    async def close(self) -> None:
        import asyncio

        if self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 60)
        async for key in self.client.scan_iter(match=f"{self.keys.prefix}*"):
            await self.client.delete(key)
        if self.encoder_file is not None:
            import shutil

            shutil.rmtree(self.encoder_file.parent, ignore_errors=True)


def train_encoder(G, path, steps: int = 3) -> None:
    """An e4e encoder for G trained `steps` steps (its latent loss) and saved at `path` as `stylebot encoder train`
    saves one: a real encoder of G, which tests use for its mechanics (a few steps teach it little)."""
    from engine.encoder_training import EncoderTrainer, TrainSettings, save_checkpoint

    trainer = EncoderTrainer(G, None, settings=TrainSettings(batch_size=4, val_samples=4))
    for _ in range(steps):
        trainer.train_step()
    save_checkpoint(trainer.checkpoint(), path)


@pytest_asyncio.fixture
async def stack(client):
    """`Stack` with its engine running; adapters under test talk to `stack.core`."""
    s = Stack(client)
    await s.start_engine()
    yield s
    await s.close()
