"""StyleCLIP latent optimisation: move a W+ latent toward a text prompt with CLIP, staying near where it started.

Recipes (each is its source step for step, proven by a fixture that the source's own code computed on tiny networks:
tests/test_edit_parity.py):
- "styleclip" (the default): orpatashnik/StyleCLIP `optimization/run_optimization.py`, what the paper's latent
  optimisation edits used (Patashnik et al. 2021): 300 steps, Adam lr 0.1 with a linear ramp-up over the first 5 %
  and a cosine ramp-down over the last 25 %, loss = 1 - logits / 100 + 0.008 * sum of squares of (w - w0), where
  CLIP sees the generator's [-1, 1] image through nearest upsampling x7 and average pooling by resolution / 32
  (224 px), with no CLIP mean/std normalisation;
- "seed": the seed project's StyleCLIP notebook: 150 steps, l2 0.005, ramp-down over the last 50 %, the image mapped
  to [0, 1] by (x + 1) / 2 and clamped before the same pooling.
`logits` is CLIP's `logit_scale.exp() * cosine` (100 x cosine for OpenAI's weights). `restyle` makes an edit
stronger or weaker afterwards: w0 + k (w - w0), one synthesis pass, no new optimisation.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from engine.device import autocast_for
from storage.errors import StylebotError
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
    l2: float                           # weight of the sum of squared differences between the latent and its start
    lr: float = 0.1
    rampup: float = 0.05                # linear ramp-up over this first fraction of the steps
    rampdown: float = 0.25              # cosine ramp-down over this last fraction
    unit_pixels: bool = False           # CLIP sees (x + 1) / 2 clamped to [0, 1] (the seed's), else x in [-1, 1]


EDIT_RECIPES = {
    "styleclip": EditRecipe(steps=300, l2=0.008),
    "seed": EditRecipe(steps=150, l2=0.005, rampdown=0.50, unit_pixels=True),
}
DEFAULT_EDIT_RECIPE = "styleclip"
CLIP_INPUT = 224  # the pooling below turns any resolution that is a multiple of 32 into this


def learning_rate(step: int, total: int, r: EditRecipe) -> float:
    """StyleCLIP's `get_lr(step / total, lr)` with the recipe's ramps."""
    return lr_schedule(step, total, r.lr, rampup=r.rampup, rampdown=r.rampdown)


def clip_view(img: torch.Tensor) -> torch.Tensor:
    """What StyleCLIP feeds CLIP: `AvgPool2d(R // 32)(Upsample(scale_factor=7)(img))`, nearest upsampling, so a
    resolution R that is a multiple of 32 becomes 224 px; nothing else (no mean/std normalisation). Both are linear
    and act on rows and columns apart, so it is computed as P @ img @ P.T with P [224, R] (`_pool_matrix`): the
    same numbers, up to the order of float32 sums, without the 7R x 7R image (616 MB a face at 1024 px, and as
    much again for its gradient)."""
    p = _pool_matrix(img.shape[-1], img.device)
    return p @ img.float() @ p.T


@lru_cache(maxsize=8)
def _pool_matrix(r: int, device: torch.device) -> torch.Tensor:
    """Row j: the weights of the input pixels in output pixel j, i.e. in upsampled pixels j k .. j k + k - 1
    (k = R // 32), upsampled pixel u being input pixel u // 7."""
    k = r // 32
    u = torch.arange(CLIP_INPUT * k)
    p = torch.zeros(CLIP_INPUT, r, dtype=torch.float64)
    p.index_put_((u // k, u // 7), torch.full_like(u, 1, dtype=torch.float64) / k, accumulate=True)
    return p.float().to(device)


class EditLoss:
    """One recipe's per-sample loss, shared by `edit()` and the continuous pool (engine.pool)."""

    def __init__(self, recipe: EditRecipe, clip: "ClipScorer", resolution: int, precision: str = "fp32"):
        if resolution % 32:
            raise EditError(f"StyleCLIP's pooling needs a resolution that is a multiple of 32, not {resolution} px")
        if clip.size != CLIP_INPUT:
            raise EditError(f"StyleCLIP's pooling makes {CLIP_INPUT} px images and CLIP model {clip.name} takes "
                            f"{clip.size} px: use a {CLIP_INPUT} px CLIP (ViT-B-32, as StyleCLIP)")
        self.recipe, self.clip, self.precision = recipe, clip, precision

    def similarity(self, img: torch.Tensor, text: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """[N] cosine between CLIP's embedding of the recipe's view of each image ([-1, 1]) and its prompt's; CLIP
        runs in `precision` (default: the loss's; the similarity reported to users is taken in "fp32")."""
        x = ((img + 1) / 2).clamp(0, 1) if self.recipe.unit_pixels else img
        return (self.clip.encode_image(clip_view(x), precision or self.precision) * text).sum(-1)

    def __call__(self, img: torch.Tensor, ws: torch.Tensor, w0: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[N] 1 - logits / 100 + l2 * ||w - w0||^2, each sample its own."""
        logits = self.clip.logit_scale * self.similarity(img, text)
        return (1 - logits / 100) + self.recipe.l2 * (ws - w0).square().flatten(1).sum(1)


@dataclass
class EditResult:
    ws: torch.Tensor                    # [N, num_ws, w_dim] edited latents
    w0: torch.Tensor                    # [N, num_ws, w_dim] where they started
    images: np.ndarray                  # uint8 [N, R, R, 3]
    losses: np.ndarray                  # [steps, N]
    similarity: list[float]             # final cosine similarity image <-> prompt


class ClipScorer:
    """An open_clip model and its tokenizer. Weights trained with QuickGELU (OpenAI's, as StyleCLIP used) get the
    QuickGELU architecture, whatever the model name says."""

    def __init__(self, name: str, pretrained: str | None, device: str | torch.device = "cpu"):
        import open_clip

        _register_tiny()
        if name == TINY_CLIP:
            pretrained = None
        _check_known(name)
        _check_reachable(name, pretrained)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                with _open_clip_logs_as_ours():
                    self.model = open_clip.create_model(name, pretrained=pretrained or None, device=device,
                                                        force_quick_gelu=_trained_with_quick_gelu(name, pretrained))
                    self.tokenizer = open_clip.get_tokenizer(name)
        except RuntimeError as e:
            raise EditError(f"CLIP model {name} ({pretrained}) is not available: {str(e).splitlines()[0][:200]}. "
                            "With internet open_clip downloads it once into its cache; offline, use --clip tiny") from None
        self.model.eval().requires_grad_(False)
        self.name, self.pretrained = name, pretrained
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, (tuple, list)) else self.size
        self.logit_scale = self.model.logit_scale.exp().item()  # 100 for OpenAI's weights

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            t = self.model.encode_text(self.tokenizer(prompts).to(self.model.logit_scale.device))
        return F.normalize(t.float(), dim=-1)

    def encode_image(self, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """CLIP input images [N, 3, size, size], as given (the recipes feed them unnormalised, as StyleCLIP does) ->
        unit embeddings (float32), differentiably; the image encoder runs in `precision` (bf16: under autocast)."""
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


def _trained_with_quick_gelu(name: str, pretrained: str | None) -> bool:
    """OpenAI's CLIP weights were trained with QuickGELU, but open_clip's "ViT-B-32" config uses nn.GELU: loaded
    as it is, the network is not the one trained (open_clip only warns). The tag's own config says which."""
    import open_clip

    return bool(pretrained and (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu"))


def _check_known(name: str) -> None:
    """Refuse in one line, with a few close names, a CLIP model that open_clip does not know (open_clip's own error
    lists every one of its configurations, 100 and more, cut off by our one-line message)."""
    import open_clip

    if ":" in name:  # hf-hub:org/repo, local-dir:path: open_clip looks those up itself
        return
    known = open_clip.list_models()
    if name.replace("/", "-") in known:  # open_clip reads OpenAI's "ViT-B/32" as "ViT-B-32"
        return
    by_lower = {k.lower(): k for k in known}
    close = [by_lower[k] for k in difflib.get_close_matches(name.replace("/", "-").lower(), by_lower, n=3, cutoff=0.6)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise EditError(f"CLIP model {name!r} is not one open_clip knows: {hint}ViT-B-32 is StyleCLIP's, and tiny the "
                    "built-in one with random weights")


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


def edit(
    G,
    clip: ClipScorer,
    w0: torch.Tensor,                   # [N, num_ws, w_dim] starting latents
    prompts: list[str] | str,           # one prompt for all, or one per latent
    *,
    recipe: str = DEFAULT_EDIT_RECIPE,
    steps: int | None = None,
    l2: float | None = None,
    init_ws: torch.Tensor | None = None,  # [N, num_ws, w_dim] start here instead of w0 (refining an edit); L2 stays to w0
    progress: Progress | None = None,
    preview: Preview | None = None,     # low-resolution look at the current images, every preview_every steps
    preview_every: int = 100,
    precision: str = "fp32",            # "bf16": generator and CLIP's image encoder under bf16 autocast; else float32
) -> EditResult:
    r = EDIT_RECIPES[recipe] if l2 is None else replace(EDIT_RECIPES[recipe], l2=l2)
    total = steps or r.steps
    device = G.mapping.w_avg.device
    loss = EditLoss(r, clip, G.img_resolution, precision)
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
        history[step] = adam_step(opt, loss(img, w, w0, text), learning_rate(step, total, r))
        report(step + 1, total, history[step], img, progress, preview, preview_every)
    with torch.no_grad():
        img = G.synthesis(w, noise_mode="const")
        sim = loss.similarity(img, text, "fp32")
    return EditResult(w.detach().cpu(), w0.cpu(), to_uint8(img), history, sim.cpu().tolist())


def restyle(G, w0: torch.Tensor, w: torch.Tensor, k: float) -> tuple[torch.Tensor, np.ndarray]:
    """A stronger (k > 1) or weaker (k < 1) version of an edit: w0 + k (w - w0), rendered in one pass."""
    device = G.mapping.w_avg.device
    w0, w = w0.to(device).reshape(-1, G.num_ws, G.w_dim), w.to(device).reshape(-1, G.num_ws, G.w_dim)
    ws = w0 + k * (w - w0)
    with torch.no_grad():
        return ws.cpu(), to_uint8(G.synthesis(ws, noise_mode="const"))
