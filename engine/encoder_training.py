"""Training an e4e encoder for any generator on the generator's own samples (`stylebot encoder train`, issue 27).

The published encoders fit one generator each (rosinality's FFHQ config-f). Every other generator (ffhq-256,
StyleGAN1, TensorFlow pickles of other faces, `tiny`) makes its own training data: W+ drawn from its mapping
network and rendered, so the answer to each image is known. `EncoderTrainer` teaches an `Encoder4Editing`
(engine/encoders.py) to recover it, and writes it in the authors' checkpoint layout, which `load_encoder` reads.

- **Samples** (`sample_ws`): two w from the mapping network, style-mixed at a random layer with StyleGAN2's
  probability (0.9), truncated toward the average w by a psi drawn per sample from `psi` (0.5 to 1): W alone
  would teach nothing about ws that differ between layers, which inverting a photo in W+ gives, and truncation
  fills the centre of W, where photos of ordinary faces land. Rendered with random noise (`noise_mode='random'`)
  and rounded to 8-bit pixels, as a photo reaches the encoder; the encoder's answer is rendered with the constant
  noise every later render uses. Each step draws its samples from a seed of its own (`sample_seed(seed, step)`),
  so a resumed run sees the batches an unbroken one would have seen.
- **Losses** (`TrainSettings`): e4e's (Tov et al. 2021, omertov/encoder4editing `training/coach.py calc_loss`)
  are L2 (MSE of the [-1, 1] images, `l2_lambda` 1.0), LPIPS (`lpips_lambda` 0.8), an identity loss (ArcFace,
  `id_lambda` 0.1 by default, 0.5 in their README's run), and, while deltas are switched on progressively, a delta
  regulariser (`delta_norm_lambda` 2e-4) and a latent discriminator (`w_discriminator_lambda` 0.1) that keep the ws
  near W. We keep L2 and LPIPS with their weights (at `min(resolution, 256)` px, e4e's `face_pool`), and add what
  real photos cannot give: a latent loss, the squared distance to the W+ that drew the image divided by the spread
  of W+ around the average w (`latent_scale`, so the average w scores 1 on any generator). It replaces the identity
  loss (identity follows from the latent, and the random models have no identity to measure) and does the
  regulariser's and the discriminator's work directly: the targets are ws the generator draws (W, or two W mixed),
  so an encoder pulled to them stays where the generator was trained (trained on the image losses alone, tiny's
  encoder reached the same PSNR with ws farther from the truth than the average w: 1.9 to 3.4 times its squared
  distance). Every delta trains from the first step (no progressive stages): with the latent known there is
  nothing to bootstrap.
- **Schedule**: the latent loss alone for the first `latent_warmup` steps, then the image losses ramp in over
  `image_ramp` steps. A step with them costs about 6x one without on tiny (LPIPS's VGG16 at full width is most
  of it), and in the first minutes on a CPU the cheap steps gain as much PSNR per second; per step the image
  losses are the stronger signal, which longer runs can afford. Measured on tiny: docs/models.md.
- **Optimiser**: Adam, lr 1e-3 (e4e uses Ranger, Adam with lookahead, at 1e-4 for 200,000 steps of batch 8; on
  tiny 3e-4 and 1e-3 ended 2 minutes within 0.3 dB of each other).
- **Validation**: a fixed held-out set (`VAL_SEED`, drawn as the training samples, never trained on); its mean
  PSNR against the render of the encoder's W+, beside the PSNR of rendering the average w for every target.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints import CheckpointError, read_torch_file
from engine.encoders import IR_SE_50, EncoderCheckpoint, EncoderConfig, build_encoder, generator_fingerprint, \
    load_encoder
from engine.images import to_uint8
from engine.invert import psnr
from engine.lpips import LPIPS

VAL_SEED = 20_210_202  # the held-out samples: one fixed draw, apart from every training step's
LOSS_SIZE = 256        # image losses at most this size (e4e's face_pool to 256 px)


@dataclass(frozen=True)
class TrainSettings:
    """How an encoder is trained; saved in the checkpoint's `opts` (under e4e's names where e4e has the option)."""

    batch_size: int = 8                 # samples a step (e4e's README trains with 8)
    learning_rate: float = 1e-3         # Adam's
    latent_lambda: float = 1.0          # squared W+ error / latent_scale (ours: the answer is known)
    l2_lambda: float = 1.0              # MSE of the images in [-1, 1] (e4e's default)
    lpips_lambda: float = 0.8           # LPIPS, VGG (e4e's default weight; e4e's own LPIPS runs AlexNet)
    latent_warmup: int = 1000           # steps of the latent loss alone before the image losses join ...
    image_ramp: int = 1000              # ... their weights growing linearly to full over these steps
    psi: tuple[float, float] = (0.5, 1.0)  # truncation psi of each sample, uniform in this range
    style_mixing_prob: float = 0.9      # share of samples whose ws switch to a second w at a random layer
    val_samples: int = 64               # held-out samples the validation PSNR averages
    seed: int = 0                       # the encoder's initial weights and the training samples

    def __post_init__(self) -> None:
        object.__setattr__(self, "psi", tuple(float(p) for p in self.psi))
        if self.batch_size < 1 or self.val_samples < 1 or not 0 < self.psi[0] <= self.psi[1]:
            raise ValueError(f"need batch_size >= 1, val_samples >= 1 and 0 < psi[0] <= psi[1], got {self}")


def encoder_config_for(G: nn.Module) -> EncoderConfig:
    """The e4e architecture we train for generator G.

    - Input: the face at the generator's own resolution, at most 256 px (e4e feeds 256 px to its 1024 px decoder):
      a 32 px generator's face holds no detail a larger copy would add, and the backbone's cost grows with the
      square of its input.
    - Widths: IR-SE-50's (64, 128, 256, 512) scaled by w_dim / 512, at least 16, so that the pyramid's top is as wide
      as a w, as in e4e (512-wide features under 512-wide heads); the stem as the first stage.
    - Depth: IR-SE-50's units (3, 4, 14, 3) for a 256 px input or larger; smaller inputs take one unit per stage
      and two in the third (IR-SE-50's deepest), since a 32 px face is 2 x 2 px after the fourth stage and deeper
      stacks there only cost time: on 2 CPU cores `tiny`'s encoder is a few ms a face.
    So ffhq-256 and every 1024 px model (w_dim 512) get e4e's published backbone, and `tiny` (32 px, w_dim 64)
    one with widths (16, 16, 32, 64) and 5 units.
    """
    res, w_dim = G.img_resolution, G.w_dim
    input_size = min(res, 256)
    widths = tuple(max(16, c * w_dim // 512) for c, _ in IR_SE_50)
    units = tuple(n for _, n in IR_SE_50) if input_size >= 256 else (1, 1, 2, 1)
    return EncoderConfig(kind="e4e", n_styles=G.num_ws, w_dim=w_dim, stem=widths[0],
                         stages=tuple(zip(widths, units)), se_reduction=16 if w_dim >= 256 else 4,
                         input_size=input_size)


def sample_seed(seed: int, step: int) -> int:
    """The RNG seed of training step `step` (0-based) of a run seeded `seed`: a stream apart from VAL_SEED's."""
    return int.from_bytes(hashlib.sha256(f"encoder-train {seed} {step}".encode()).digest()[:8], "little") >> 1


def sample_ws(G: nn.Module, n: int, rng: torch.Generator, *, psi: tuple[float, float] = (0.5, 1.0),
              style_mixing_prob: float = 0.9) -> torch.Tensor:
    """W+ [n, num_ws, w_dim] the generator draws: w1 (mixed with w2 from a random layer on, for a share
    `style_mixing_prob` of the samples), then truncated toward the average w by psi ~ U(psi)."""
    dev = G.mapping.w_avg.device
    z = torch.randn([2 * n, G.z_dim], generator=rng)
    psis = torch.empty(n).uniform_(psi[0], psi[1], generator=rng)
    mixed = torch.rand(n, generator=rng) < style_mixing_prob
    cut = torch.randint(1, max(G.num_ws, 2), (n,), generator=rng)
    with torch.no_grad():
        w = G.mapping(z.to(dev), None, truncation_psi=1)[:, 0]
    layer = torch.arange(G.num_ws)
    second = (mixed[:, None] & (layer[None] >= cut[:, None])).to(dev)        # [n, num_ws]
    ws = torch.where(second[..., None], w[n:, None], w[:n, None])
    w_avg = G.mapping.w_avg
    return w_avg + psis.to(dev)[:, None, None] * (ws - w_avg)


def as_photo(img: torch.Tensor) -> torch.Tensor:
    """A render in [-1, 1] as the encoder sees a photo: rounded to 8-bit pixels as `to_uint8` writes them, back in
    [-1, 1] as `encoder_input` reads them."""
    return (img * 127.5 + 128).clamp(0, 255).floor() / 127.5 - 1


def render_targets(G: nn.Module, ws: torch.Tensor, seed: int) -> torch.Tensor:
    """The images of ws with random noise drawn from `seed`, as 8-bit photos [N, 3, R, R] in [-1, 1]."""
    dev = ws.device
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return as_photo(G.synthesis(ws, noise_mode="random"))


def seen_as(img: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
    """A render compared with photos: where a photo's pixel is saturated (255 or 0) and the render lies beyond it,
    the render counts as equal to it, since both are written as that pixel (random-weight models saturate a good
    share of their pixels; an L2 to the clipped value would pull renders toward numbers no photo shows)."""
    over = ((photos >= 1) & (img > 1)) | ((photos <= -1) & (img < -1))
    return torch.where(over, photos, img)


def resized(img: torch.Tensor, size: int) -> torch.Tensor:
    """Square images at `size` px: bilinear with antialiasing (what PIL's bilinear resize does), else as they are."""
    if img.shape[-1] == size:
        return img
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def mean_psnr(images: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean PSNR (dB) over pairs of images in [-1, 1], each written to 8 bits first (what a user is sent)."""
    a, b = to_uint8(images), to_uint8(targets)
    return float(np.mean([psnr(x, y) for x, y in zip(a, b)]))


class EncoderTrainer:
    """An e4e encoder being trained for generator G: its weights, Adam's state, the step count and the held-out set.

    `train_step()` runs one step and returns its losses; `validate()` the held-out PSNR; `checkpoint()` the dict to
    save (e4e's layout plus the training state); `resume(path)` continues from such a file."""

    def __init__(self, G: nn.Module, lpips: LPIPS | None, *, settings: TrainSettings = TrainSettings(),
                 cfg: EncoderConfig | None = None):
        if getattr(G, "c_dim", 0):
            raise ValueError(f"{G.model_id} is a conditional generator: encoders are trained for unconditional ones")
        self.G, self.lpips, self.settings = G, lpips, settings
        self.cfg = cfg or encoder_config_for(G)
        if (self.cfg.n_styles, self.cfg.w_dim) != (G.num_ws, G.w_dim):
            raise ValueError(f"an encoder of {self.cfg.n_styles} ws of {self.cfg.w_dim} does not fit "
                             f"{G.model_id} ({G.num_ws} ws of {G.w_dim})")
        self.device = G.mapping.w_avg.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.encoder = build_encoder(self.cfg).to(self.device)
        self.latent_avg = G.mapping.w_avg.detach().clone()[None].repeat(G.num_ws, 1)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=settings.learning_rate)
        self.step = 0
        self.fingerprint = generator_fingerprint(G)
        rng = torch.Generator().manual_seed(VAL_SEED)
        self.val_ws = sample_ws(G, settings.val_samples, rng, psi=settings.psi,
                                style_mixing_prob=settings.style_mixing_prob)
        self.val_images = torch.cat([render_targets(G, chunk, VAL_SEED + i)
                                     for i, chunk in enumerate(self.val_ws.split(16))])
        self.latent_scale = (self.val_ws - self.latent_avg).square().mean().item()
        self.baseline_psnr = mean_psnr(self.render(self.latent_avg.expand_as(self.val_ws)), self.val_images)

    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """Images of ws as every later render shows them (the model's constant noise), in chunks, no gradient."""
        with torch.no_grad():
            return torch.cat([self.G.synthesis(c, noise_mode="const") for c in ws.split(16)])

    def encode(self, photos: torch.Tensor) -> torch.Tensor:
        """W+ the encoder gives for photos [N, 3, R, R] in [-1, 1] at the generator's resolution."""
        return self.encoder(resized(photos, self.cfg.input_size)) + self.latent_avg

    def image_weight(self, step: int) -> float:
        """How much of their lambdas the image losses get at step `step`: 0 during the warm-up, then a linear ramp
        to 1 (switched on at once, their gradients met Adam's step sizes for the latent loss alone, and the
        validation PSNR fell back to the average w's: measured on tiny)."""
        s = self.settings
        return min(1.0, max(0.0, (step - s.latent_warmup + 1) / max(s.image_ramp, 1)))

    def losses(self, ws: torch.Tensor, targets: torch.Tensor, *, image_weight: float = 1.0
               ) -> dict[str, torch.Tensor]:
        """The terms of the loss for samples ws and their photos, and 'loss', their sum weighted by the lambdas (the
        image losses' times `image_weight`, which 0 leaves uncomputed)."""
        s = self.settings
        ws_hat = self.encode(targets)
        out = {"latent": (ws_hat - ws).square().mean() / self.latent_scale}
        if image_weight > 0 and (s.l2_lambda or s.lpips_lambda):
            size = min(self.G.img_resolution, LOSS_SIZE)
            img = seen_as(self.G.synthesis(ws_hat, noise_mode="const"), targets)
            img, target = resized(img, size), resized(targets, size)
            if s.l2_lambda:
                out["l2"] = F.mse_loss(img, target)
            if s.lpips_lambda:
                out["lpips"] = self.lpips(img, self.lpips.prepare(target)).mean()
        lambdas = {"latent": s.latent_lambda, "l2": s.l2_lambda * image_weight, "lpips": s.lpips_lambda * image_weight}
        out["loss"] = sum(lambdas[k] * v for k, v in out.items())
        return out

    def train_step(self) -> dict[str, float]:
        """One step on a fresh batch of the generator's samples; returns the losses (unweighted, and 'loss')."""
        s = self.settings
        seed = sample_seed(s.seed, self.step)
        ws = sample_ws(self.G, s.batch_size, torch.Generator().manual_seed(seed), psi=s.psi,
                       style_mixing_prob=s.style_mixing_prob)
        targets = render_targets(self.G, ws, seed)
        self.encoder.train()
        terms = self.losses(ws, targets, image_weight=self.image_weight(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        self.step += 1
        return {k: v.item() for k, v in terms.items()}

    def validate(self) -> float:
        """Mean PSNR (dB) of the held-out samples against the renders of the encoder's W+ for them."""
        self.encoder.eval()
        with torch.no_grad():
            ws = torch.cat([self.encode(c) for c in self.val_images.split(16)])
        return mean_psnr(self.render(ws), self.val_images)

    def checkpoint(self, *, val_psnr: float | None = None) -> dict:
        """e4e's checkpoint (`training/coach.py __get_save_dict` with save_training_data): state_dict (`encoder.*`
        only: the generator is named by its fingerprint, not copied), latent_avg, opts, and global_step (here the
        steps done; e4e stores the last step's index and resumes at the next), optimizer, best_val_loss (None: we
        keep the validation PSNR instead)."""
        s = self.settings
        opts = {
            "encoder_type": "Encoder4Editing", "start_from_latent_avg": True,
            "stylegan_size": self.G.img_resolution, "encoder_config": self.cfg.to_dict(),
            "decoder_fingerprint": self.fingerprint, "decoder_resolution": self.G.img_resolution,
            "generator": self.G.model_id, "generator_family": self.G.cfg.family,
            "optim_name": "adam", "lpips_type": "vgg", "id_lambda": 0.0, "delta_norm_lambda": 0.0,
            "w_discriminator_lambda": 0.0, "progressive_steps": None,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        }
        return {"state_dict": {f"encoder.{k}": v.detach().cpu() for k, v in self.encoder.state_dict().items()},
                "latent_avg": self.latent_avg.cpu(), "opts": opts, "global_step": self.step,
                "optimizer": _to_cpu(self.optimizer.state_dict()), "best_val_loss": None,
                "val_psnr": val_psnr, "baseline_psnr": self.baseline_psnr}

    def resume(self, path: str | Path) -> EncoderCheckpoint:
        """Continue from a checkpoint that `checkpoint()` wrote for this generator: its weights, Adam's state and
        step count. Refused (one-line CheckpointError) for another generator's encoder, or a file without training
        state (a published encoder). The file's architecture must be this trainer's (build it with `cfg` from
        `training_opts(path, G)`)."""
        path = Path(path)
        loaded = load_encoder(path, device=self.device, generator=self.G)
        raw = read_torch_file(path, mmap=True)
        if not isinstance(raw.get("global_step"), int) or not isinstance(raw.get("optimizer"), dict):
            raise CheckpointError(path, "it holds no training state (global_step, optimizer) to resume from")
        if loaded.cfg != self.cfg:
            raise CheckpointError(path, "its encoder's architecture is not the one being trained")
        self.encoder.load_state_dict(loaded.encoder.state_dict())
        try:
            self.optimizer.load_state_dict(raw["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(path, f"its optimizer state does not fit the encoder ({e})") from None
        self.step = raw["global_step"]
        return loaded


def training_opts(path: str | Path, G: nn.Module) -> tuple[EncoderConfig, TrainSettings]:
    """(architecture, settings) of an encoder file that `checkpoint()` wrote for generator G, read before building
    the trainer that resumes it; a file that does not load, or was trained for another generator, is refused in one
    line (CheckpointError) before any work."""
    loaded = load_encoder(path, generator=G)
    names = {f.name for f in fields(TrainSettings)}
    try:
        return loaded.cfg, TrainSettings(**{k: v for k, v in loaded.opts.items() if k in names})
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"unreadable training settings ({e})") from None


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then renamed over it: a kill mid-write leaves the old file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_cpu(state):
    """An optimizer state dict with its tensors on the CPU (the file loads on any device)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state
