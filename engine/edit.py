"""StyleCLIP latent optimisation: move a W+ latent toward a text prompt with CLIP, staying near where it started.

loss = (1 - cos(CLIP(image), CLIP(prompt))) + l2 * ||w - w0||^2, Adam lr 0.1 with StyleCLIP's ramp-up / cosine
ramp-down (Patashnik et al. 2021; defaults from the official repository: 300 steps, l2 0.008; the seed project
used 150 steps and 0.005, offered as recipe "seed"). `restyle` makes an edit stronger or weaker afterwards:
w0 + k (w - w0), one synthesis pass, no new optimisation.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from engine.device import autocast_for
from engine.errors import StylebotError
from engine.images import to_uint8
from engine.optim import Preview, Progress, adam_step, lr_schedule, report

log = logging.getLogger("stylebot.clip")

TINY_CLIP = "stylebot-tiny-clip"    # a tiny open_clip architecture (engine/clip_configs/), random weights, for tests
MAX_PROMPT_CHARS = 200


class EditError(StylebotError):
    """A prompt or CLIP model that cannot be used; the message says why."""


@dataclass(frozen=True)
class EditRecipe:
    steps: int
    l2: float
    lr: float = 0.1


EDIT_RECIPES = {"default": EditRecipe(steps=300, l2=0.008), "seed": EditRecipe(steps=150, l2=0.005)}


@dataclass
class EditResult:
    ws: torch.Tensor                    # [N, num_ws, w_dim] edited latents
    w0: torch.Tensor                    # [N, num_ws, w_dim] where they started
    images: np.ndarray                  # uint8 [N, R, R, 3]
    losses: np.ndarray                  # [steps, N]
    similarity: list[float]             # final cosine similarity image <-> prompt


class ClipScorer:
    """An open_clip model and tokenizer, with the image preprocessing done inside the graph."""

    def __init__(self, name: str, pretrained: str | None, device: str | torch.device = "cpu"):
        import open_clip

        _register_tiny()
        if name == TINY_CLIP:
            pretrained = None
        _check_reachable(name, pretrained)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                with _open_clip_logs_as_ours():
                    self.model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
                    self.tokenizer = open_clip.get_tokenizer(name)
        except RuntimeError as e:
            raise EditError(f"CLIP model {name} ({pretrained}) is not available: {str(e).splitlines()[0][:200]}. "
                            "With internet open_clip downloads it once into its cache; offline, use --clip tiny") from None
        self.model.eval().requires_grad_(False)
        self.name, self.pretrained = name, pretrained
        cfg = self.model.visual.preprocess_cfg
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, (tuple, list)) else self.size
        dev = next(self.model.parameters()).device
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=dev).reshape(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=dev).reshape(1, 3, 1, 1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            t = self.model.encode_text(self.tokenizer(prompts).to(self.mean.device))
        return F.normalize(t.float(), dim=-1)

    def encode_image(self, img: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Generator images [N, 3, H, W] in [-1, 1] -> unit CLIP embeddings (float32), differentiably; the image
        encoder runs in `precision` (bf16: under autocast)."""
        x = (img + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        with autocast_for(x.device, precision):
            emb = self.model.encode_image(x)
        return F.normalize(emb.float(), dim=-1)


class _RerouteRootRecords(logging.Filter):
    """Records logged straight on the root logger (open_clip's `logging.info(...)`) go to ours at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("open_clip: %s", record.getMessage())
        return False


@contextmanager
def _open_clip_logs_as_ours():
    """While open_clip builds a model: its chatter ("Model initialized randomly", which is what a tiny or not yet
    loaded CLIP is) reaches our log at DEBUG instead of the terminal; we say what matters ourselves."""
    f = _RerouteRootRecords()
    logging.getLogger().addFilter(f)  # a logger's filters see only records logged on it, not propagated ones
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def _check_reachable(name: str, pretrained: str | None, timeout: float = 3.0) -> None:
    """Fail in seconds, not after a minute of retries, when CLIP weights are neither cached nor downloadable."""
    import open_clip

    if not pretrained or os.path.isfile(pretrained):
        return
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        return  # open_clip names the unknown tag itself
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants

        cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
        snapshots = cache / ("models--" + os.path.split(hub)[0].replace("/", "--")) / "snapshots"
        if snapshots.is_dir() and any(snapshots.iterdir()):
            return
        url = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    else:
        url = cfg.get("url", "")
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout).close()
    except OSError as e:
        raise EditError(f"CLIP model {name} ({pretrained}) is not in open_clip's cache and {parsed.hostname} cannot be "
                        f"reached ({e.strerror or e}): run once with internet to cache it, or use --clip tiny") from None


@lru_cache(maxsize=1)
def _register_tiny() -> None:
    import open_clip

    open_clip.add_model_config(Path(__file__).with_name("clip_configs"))


def check_prompt(prompt: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    prompt = " ".join(prompt.split())
    if not prompt:
        raise EditError("the prompt is empty: describe the edit, e.g. /edit really angry face")
    if len(prompt) > max_chars:
        raise EditError(f"the prompt is {len(prompt)} characters long; keep it under {max_chars}")
    return prompt


def learning_rate(step: int, total: int, lr: float) -> float:
    """StyleCLIP's schedule: linear ramp-up over the first 5 %, cosine ramp-down over the last 25 %."""
    return lr_schedule(step, total, lr, rampup=0.05, rampdown=0.25)


def edit(
    G,
    clip: ClipScorer,
    w0: torch.Tensor,                   # [N, num_ws, w_dim] starting latents
    prompts: list[str] | str,           # one prompt for all, or one per latent
    *,
    recipe: str = "default",
    steps: int | None = None,
    l2: float | None = None,
    init_ws: torch.Tensor | None = None,  # [N, num_ws, w_dim] start here instead of w0 (refining an edit); L2 stays to w0
    progress: Progress | None = None,
    preview: Preview | None = None,     # low-resolution look at the current images, every preview_every steps
    preview_every: int = 100,
    precision: str = "fp32",            # "bf16": generator and CLIP's image encoder under bf16 autocast; else float32
) -> EditResult:
    r = EDIT_RECIPES[recipe]
    total, l2 = steps or r.steps, r.l2 if l2 is None else l2
    device = G.mapping.w_avg.device
    w0 = w0.to(device, torch.float32).reshape(-1, G.num_ws, G.w_dim)
    n = w0.shape[0]
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    text = clip.encode_text([check_prompt(p) for p in prompts])          # [N, D]
    start = w0 if init_ws is None else init_ws.to(device, torch.float32).reshape(w0.shape)
    w = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=r.lr)
    history = np.zeros([total, n], dtype=np.float32)
    for step in range(total):
        with autocast_for(device, precision):
            img = G.synthesis(w, noise_mode="const")
        img = img.float()
        sim = (clip.encode_image(img, precision) * text).sum(-1)
        per_sample = (1 - sim) + l2 * (w - w0).square().flatten(1).sum(1)
        history[step] = adam_step(opt, per_sample, learning_rate(step, total, r.lr))
        report(step + 1, total, history[step], img, progress, preview, preview_every)
    with torch.no_grad():
        img = G.synthesis(w, noise_mode="const")
        sim = (clip.encode_image(img) * text).sum(-1)
    return EditResult(w.detach().cpu(), w0.cpu(), to_uint8(img), history, sim.cpu().tolist())


def restyle(G, w0: torch.Tensor, w: torch.Tensor, k: float) -> tuple[torch.Tensor, np.ndarray]:
    """A stronger (k > 1) or weaker (k < 1) version of an edit: w0 + k (w - w0), rendered in one pass."""
    device = G.mapping.w_avg.device
    w0, w = w0.to(device).reshape(-1, G.num_ws, G.w_dim), w.to(device).reshape(-1, G.num_ws, G.w_dim)
    ws = w0 + k * (w - w0)
    with torch.no_grad():
        return ws.cpu(), to_uint8(G.synthesis(ws, noise_mode="const"))
