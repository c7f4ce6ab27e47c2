"""The latent file (`.npz`): `ws` float32 [num_ws, w_dim], `model_id`, its generator `family`, `created`, the settings
that made it, and for an edit its start latent `w0` (so that it can be made stronger or weaker later)."""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.errors import StylebotError, command


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


def check_finite(ws: np.ndarray, *paths: str | Path) -> None:
    """Refuse to write a latent holding NaN or infinity (it renders as a black square), nor what it renders."""
    if not np.isfinite(ws).all():
        raise LatentError(f"the optimisation diverged (the latent holds NaN or infinite values): nothing was written "
                          f"to {', '.join(map(str, paths))}; try fewer steps or a smaller --strength")


def save_latent(path: str | Path, latent: Latent) -> None:
    """Write `latent` to exactly `path` (np.savez alone would add `.npz` to other names)."""
    check_finite(latent.ws, path)
    extra = {} if latent.w0 is None else {"w0": latent.w0.astype(np.float32)}
    with open(path, "wb") as f:
        np.savez(f, ws=latent.ws.astype(np.float32), model_id=np.array(latent.model_id),
                 family=np.array(latent.family), created=np.array(latent.created),
                 settings=np.array(json.dumps(latent.settings)), **extra)


def _not_ours(path: str | Path, why: str) -> LatentError:
    """'X: not a stylebot latent file (.npz) ...' with how to make one."""
    return LatentError(f"{path}: not a stylebot latent file (.npz): {why}; `{command('invert')}` makes one from a "
                       f"photo, `{command('latent import')}` from a bare W+ array")


def load_latent(path: str | Path) -> Latent:
    """A latent file written by `save_latent`, or a one-line refusal (not ours, unreadable, NaN)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise LatentError(f"{path}: cannot read ({e.strerror or e})") from None
    if head != b"PK\x03\x04":
        raise _not_ours(path, "it is a bare .npy array" if head == b"\x93NUM" else "it is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "ws" not in f or "model_id" not in f:
                raise _not_ours(path, "it has no `ws` and `model_id` arrays")
            latent = Latent(ws=f["ws"].astype(np.float32), model_id=str(f["model_id"]),
                            settings=json.loads(str(f["settings"])) if "settings" in f else {},
                            created=float(f["created"]) if "created" in f else 0.0,
                            w0=f["w0"].astype(np.float32) if "w0" in f else None,
                            family=str(f["family"]) if "family" in f else "")
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise _not_ours(path, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__) from None
    if latent.ws.ndim != 2 or (latent.w0 is not None and latent.w0.shape != latent.ws.shape):
        raise LatentError(f"{path}: a latent of shape {list(latent.ws.shape)}; expected [num_ws, w_dim]")
    if not np.isfinite(latent.ws).all() or (latent.w0 is not None and not np.isfinite(latent.w0).all()):
        raise LatentError(f"{path}: the latent holds NaN or infinite values (a diverged optimisation); "
                          "invert the photo again")
    return latent


def _is_ours(path: Path) -> bool:
    """Whether a zip file is a stylebot .npz (it has `ws` and `model_id`), not a PyTorch file."""
    try:
        with zipfile.ZipFile(path) as z:
            return {"ws.npy", "model_id.npy"} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


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
        elif _is_ours(path):
            model = load_latent(path).model_id
            raise LatentError(f"{path}: already a stylebot latent of model {model}: use it directly with "
                              f"`{command('morph')}`, `{command('edit')}` or `{command('invert --refine')}`")
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
    if arr.dtype.kind not in "fiu":  # strings, objects, booleans: no latent
        raise LatentError(f"{path}: holds {arr.dtype} values, not numbers; expected a W+ latent")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise LatentError(f"{path}: expected a finite W+ latent of shape [num_ws, w_dim] or [1, num_ws, w_dim], "
                          f"got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise LatentError(f"{path}: the latent holds NaN or infinite values; expected a finite W+ latent")
    return arr.astype(np.float32)
