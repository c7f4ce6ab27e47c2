"""The latent file (`.npz`): `ws` float32 [num_ws, w_dim], `model_id`, its generator `family`, `created`, the settings
that made it, and for an edit its start latent `w0` (so that it can be made stronger or weaker later)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import StylebotError


FAMILY_NAMES = {"stylegan2": "StyleGAN2", "stylegan1": "StyleGAN1"}


class LatentError(StylebotError):
    """A latent file that is unreadable or belongs to another model."""


@dataclass
class Latent:
    ws: np.ndarray                      # float32 [num_ws, w_dim]
    model_id: str                       # the generator it belongs to
    settings: dict = field(default_factory=dict)  # how it was made (operation, recipe, steps, psnr, ...)
    created: float = field(default_factory=time.time)
    w0: np.ndarray | None = None        # float32 [num_ws, w_dim]: an edit's start latent
    family: str = ""                    # "stylegan2" | "stylegan1" ("" in files written before families)

    def check_model(self, G) -> None:
        if self.family and self.family != G.cfg.family:
            raise LatentError(f"this latent was made with a {FAMILY_NAMES.get(self.family, self.family)} generator "
                              f"({self.model_id}), and {G.model_id} is {FAMILY_NAMES.get(G.cfg.family, G.cfg.family)}: "
                              f"their W spaces do not mix. Use --model {self.model_id} or invert the photo again")
        if self.model_id != G.model_id:
            raise LatentError(f"this latent belongs to model {self.model_id!r}, not {G.model_id!r}: "
                              f"use --model {self.model_id} or invert the photo again")
        if self.ws.shape != (G.num_ws, G.w_dim):
            raise LatentError(f"latent shape {self.ws.shape} does not fit {G.model_id} ({G.num_ws}, {G.w_dim})")


def save_latent(path: str | Path, latent: Latent) -> None:
    extra = {} if latent.w0 is None else {"w0": latent.w0.astype(np.float32)}
    np.savez(path, ws=latent.ws.astype(np.float32), model_id=np.array(latent.model_id), family=np.array(latent.family),
             created=np.array(latent.created), settings=np.array(json.dumps(latent.settings)), **extra)


def load_latent(path: str | Path) -> Latent:
    try:
        with np.load(path, allow_pickle=False) as f:
            return Latent(ws=f["ws"].astype(np.float32), model_id=str(f["model_id"]),
                          settings=json.loads(str(f["settings"])) if "settings" in f else {},
                          created=float(f["created"]) if "created" in f else 0.0,
                          w0=f["w0"].astype(np.float32) if "w0" in f else None,
                          family=str(f["family"]) if "family" in f else "")
    except (OSError, KeyError, ValueError) as e:
        raise LatentError(f"{path}: not a stylebot latent file ({e})") from None


def read_raw_latent(path: str | Path) -> np.ndarray:
    """A bare W+ array saved by other tools (the seed's notebook, Image2StyleGAN ports): `.npy` or `torch.save`,
    shape [1, num_ws, w_dim] or [num_ws, w_dim] (a dict holding one such tensor is accepted too). Never unpickles
    code: `.npy` without pickles, torch files with weights_only=True."""
    import pickle

    path = Path(path)
    try:
        head = path.open("rb").read(6)
    except OSError as e:
        raise LatentError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if head == b"\x93NUMPY":
            arr = np.load(path, allow_pickle=False)
        elif not head.startswith((b"PK\x03\x04", b"\x80")):
            raise LatentError(f"{path}: not a .npy array or a PyTorch file")
        else:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
                if len(tensors) != 1:
                    raise ValueError(f"a dict with {len(tensors)} tensors; expected exactly one latent")
                obj = tensors[0]
            if not isinstance(obj, torch.Tensor):
                raise ValueError(f"holds a {type(obj).__name__}, not a tensor")
            arr = obj.detach().float().numpy()
    except pickle.UnpicklingError:
        raise LatentError(f"{path}: refused by torch.load(weights_only=True): it holds objects, not only tensors") \
            from None
    except (ValueError, OSError, RuntimeError, EOFError) as e:
        raise LatentError(f"{path}: not a latent array ({str(e).strip().splitlines()[0][:200]})") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise LatentError(f"{path}: expected a finite W+ latent of shape [num_ws, w_dim] or [1, num_ws, w_dim], "
                          f"got {list(arr.shape)}")
    return arr.astype(np.float32)
