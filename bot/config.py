"""config.toml, read once at the entry point into frozen dataclasses that flow down explicitly.

The dataclass defaults are the shipped config.toml's values (a test keeps them equal). Secrets never live here:
tokens and passwords come from the environment.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from storage.errors import StylebotError

ENV_CONFIG = "STYLEBOT_CONFIG"
ENV_REDIS_URL = "STYLEBOT_REDIS_URL"    # overrides [redis] url (containers name their Redis by service)


class ConfigError(StylebotError, ValueError):
    """config.toml is unreadable or names an option that does not exist."""


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"                # auto | cpu | cuda
    model: str = "auto"                 # auto (ffhq-1024 on a GPU, ffhq-256 on a CPU, if downloaded; else tiny) | name
    # optimisations in the pool at once, or auto (what the GPU's free memory holds; on a CPU the timed
    # size with the least time per row)
    max_active: int | str = field(default="auto", metadata={"types": (int, str)})
    drain_s: float = 30.0               # on SIGTERM, jobs that end within this are finished
    precision: str = "auto"             # auto (tf32 on CUDA, fp32 on a CPU) | fp32 | tf32 | bf16 (autocast)
    compile: str = "auto"               # auto (torch.compile the generator on CUDA, not on a CPU) | off

    def __post_init__(self):
        if self.max_active != "auto" and (type(self.max_active) is not int or self.max_active < 1):
            raise ConfigError(f"[engine] max_active must be \"auto\" or a whole number of at least 1, "
                              f"got {self.max_active!r}")
        if self.drain_s < 0:
            raise ConfigError("[engine] drain_s must be at least 0")
        if self.precision not in ("auto", "fp32", "tf32", "bf16"):
            raise ConfigError(f"[engine] precision must be \"auto\", \"fp32\", \"tf32\" or \"bf16\", "
                              f"got {self.precision!r}")
        if self.compile not in ("auto", "off"):
            raise ConfigError(f"[engine] compile must be \"auto\" or \"off\", got {self.compile!r}")


@dataclass(frozen=True)
class WeightsConfig:
    dir: str = "~/.cache/stylebot/weights"  # where downloaded and imported weights live
    download_timeout: float = 15.0      # seconds to wait for a server before giving up


@dataclass(frozen=True)
class InvertConfig:
    encoder: str = "auto"               # the first answer's encoder: auto (the one trained for the model, else a
                                        # downloaded e4e / pSp of it) | none | a registry name (e4e-ffhq, psp-ffhq)
    refine: str = "always"              # always (the optimisation refines the encoder's face) | never
    train_minutes: float = 2.0          # `stylebot run` trains a built-in model's missing encoder this long; 0: never

    def __post_init__(self):
        if self.refine not in ("always", "never"):
            raise ConfigError(f"[invert] refine must be \"always\" or \"never\", got {self.refine!r}")
        if self.train_minutes < 0:
            raise ConfigError("[invert] train_minutes must be at least 0")


@dataclass(frozen=True)
class EditConfig:
    clip_model: str = "ViT-B-32"        # open_clip architecture for /edit ("stylebot-tiny-clip" = tiny, random)
    clip_pretrained: str = "openai"     # open_clip pretrained tag (downloaded once into open_clip's cache)
    max_prompt_chars: int = 200         # longer prompts are refused
    stronger: float = 1.5               # factor per "stronger" step: w0 + k (w - w0)
    weaker: float = 0.67                # factor per "weaker" step


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"  # without a password: set STYLEBOT_REDIS_PASSWORD in the environment
    prefix: str = "stylebot:"           # every key this product writes starts with this
    max_connections: int = 64           # connections a process opens at most; commands beyond wait for one
    pool_timeout_s: float = 5.0         # how long a command waits for a free connection before "busy"

    def __post_init__(self):
        if self.max_connections < 2 or self.pool_timeout_s <= 0:
            raise ConfigError("[redis] max_connections must be at least 2 and pool_timeout_s above 0")


@dataclass(frozen=True)
class QueueConfig:
    max_deliveries: int = 10            # a job handed out more often than this (its engines kept dying) is failed
    reclaim_idle_s: float = 30.0        # a job whose engine has not touched it for this long is taken over
    heartbeat_ttl_s: int = 15           # an engine without a heartbeat this fresh counts as offline


@dataclass(frozen=True)
class LimitsConfig:
    max_photo_bytes: int = 15728640     # 15 MiB; bigger uploads are refused before they are read whole
    max_photo_pixels: int = 64000000    # width x height, read from the header (a 50 MP phone photo fits)
    max_frames: int = 120               # most frames a /morph may ask for
    default_frames: int = 24            # frames when /morph names none
    max_jobs_per_user: int = 3          # queued + running per user
    max_queue: int = 200                # whole queue; beyond it: "busy, try again in a few minutes"


@dataclass(frozen=True)
class ChatConfig:
    progress_interval_s: float = 3.0    # at most one progress edit per job this often (platform rate limits)
    stronger_emoji: str = "🔥 👍 💯 ⚡"  # reactions on an edit that rerun it stronger (space-separated)
    weaker_emoji: str = "👎 🥱 😐"       # reactions that rerun it weaker
    refine_emoji: str = "👌 ✍ 🤩"        # reactions that continue the optimisation for more steps
    redo_emoji: str = "🤔 🤨 🔁"         # reactions that run the command again on your current face
    result_ttl_s: int = 604800          # results (and the messages that show them) can be rerun this long: 7 days

    def action(self, emoji: str) -> str | None:
        """The rerun an emoji asks for (variation selectors ignored), or None."""
        bare = emoji.replace("\ufe0f", "")
        for action in ("stronger", "weaker", "refine", "redo"):
            if bare in getattr(self, f"{action}_emoji").replace("\ufe0f", "").split():
                return action
        return None


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"             # the local web chat listens here; 0.0.0.0 exposes it to your network
    port: int = 8080                    # and on this port


@dataclass(frozen=True)
class TelegramConfig:
    api_url: str = "https://api.telegram.org/bot"  # Bot API base (a local Bot API server or a test peer)
    file_url: str = "https://api.telegram.org/file/bot"  # file download base


@dataclass(frozen=True)
class DiscordConfig:
    api_url: str = "https://discord.com/api/v10"  # REST base; the gateway URL comes from its /gateway/bot


@dataclass(frozen=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    web: WebConfig = field(default_factory=WebConfig)
    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    source: str = "defaults"            # the file this came from (not an option)


SECTIONS = {"engine": EngineConfig, "weights": WeightsConfig, "invert": InvertConfig, "edit": EditConfig, "redis": RedisConfig,
            "queue": QueueConfig, "limits": LimitsConfig, "chat": ChatConfig, "web": WebConfig,
            "telegram": TelegramConfig, "discord": DiscordConfig}


def find_config(explicit: str | Path | None = None) -> Path | None:
    """--config, else $STYLEBOT_CONFIG, else ./config.toml, else None (built-in defaults)."""
    for candidate in (explicit, os.environ.get(ENV_CONFIG)):
        if candidate:
            p = Path(candidate).expanduser()
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            return p
    local = Path("config.toml")
    return local if local.is_file() else None


def load_config(path: str | Path | None = None) -> Config:
    cfg = _load(find_config(path))
    if os.environ.get(ENV_REDIS_URL):
        cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=os.environ[ENV_REDIS_URL]))
    return cfg


def _load(p: Path | None) -> Config:
    if p is None:
        return Config()
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: {e}") from None
    sections = {name: _section(p, name, cls, data.pop(name, {})) for name, cls in SECTIONS.items()}
    if data:
        raise ConfigError(f"{p}: unknown section(s) {sorted(data)}")
    return Config(**sections, source=str(p))


# Options that older versions had: a config file that still sets one is told what became of it.
REMOVED = {
    ("engine", "scheduler"): "the engine always batches continuously now (the static scheduler is gone)",
    ("queue", "batch_size"): "it sized the static scheduler's batches, which are gone ([engine] max_active sizes "
                             "the pool)",
}


def _section(path: Path, name: str, cls: type, values: dict):
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if (name, key) in REMOVED:
            raise ConfigError(f"{path}: [{name}] {key} was removed: {REMOVED[name, key]}; delete the line")
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) in [{name}]: {sorted(unknown)}")
    for key, value in values.items():
        expected = known[key].metadata.get("types", type(known[key].default))  # "types": an option of two kinds
        if expected is float and isinstance(value, int):
            values[key] = float(value)
        elif not isinstance(value, expected):
            kind = " or ".join(t.__name__ for t in expected) if isinstance(expected, tuple) else expected.__name__
            raise ConfigError(f"{path}: [{name}] {key} must be {kind}, got {value!r}")
    return cls(**values)
