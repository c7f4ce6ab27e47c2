"""One loader for every generator file people have: official StyleGAN2-ADA `.pkl`, NVIDIA's TensorFlow-era `.pkl`
(StyleGAN2 `stylegan2-ffhq-config-f.pkl`, StyleGAN `karras2019stylegan-ffhq-1024x1024.pkl`, and the community's
generators trained with that code), rosinality `.pt`, the StyleGAN1 port's `karras2019stylegan-ffhq-1024x1024.pt`
(lernapparat's layout), our `.safetensors`.

`load_generator(path)` sniffs the format from the file's first bytes (not its name), rebuilds the architecture
from what the file says about itself, and loads the weights into our `Generator` with `strict=True`. Every
failure is a `CheckpointError` whose one-line message names the file and what was wrong with it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine import safe_pickle
from storage.errors import StylebotError
from engine.ops import fir_filter
from engine import stylegan1
from engine.stylegan2 import ARCHITECTURES, Generator, StyleGAN2Config
from engine.tf_networks import TFNetworkError, generator_from_tf

FORMATS = ("pkl", "tensorflow", "torch", "safetensors")
FAMILIES = {"stylegan2": (StyleGAN2Config, Generator), "stylegan1": (stylegan1.StyleGAN1Config, stylegan1.Generator)}
SAFETENSORS_FORMAT = "stylebot-generator-v1"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # legacy (pre-zip) torch.save magic number
_TF_NETWORK_CLASS = b"dnnlib.tflib.network"  # the first global of a TensorFlow-era (G, D, Gs) pickle


class CheckpointError(StylebotError, ValueError):
    """A weights file that cannot be loaded; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def sniff_format(path: str | Path) -> str:
    """'pkl' (network pickle), 'tensorflow' (a network pickle whose first object is a TensorFlow network), 'torch'
    (torch.save of a dict: rosinality or the StyleGAN1 port), or 'safetensors', from the first bytes."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    if len(head) < 2:
        raise CheckpointError(path, f"file is empty or truncated ({len(head)} bytes)")
    if head.startswith(b"PK\x03\x04") or head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch"
    if head[:1] == b"\x80":
        return "tensorflow" if _TF_NETWORK_CLASS in head else "pkl"
    if len(head) < 9:
        raise CheckpointError(path, f"file is empty or truncated ({len(head)} bytes)")
    header_len = struct.unpack("<Q", head[:8])[0]
    if head[8:9] == b"{" and 0 < header_len < path.stat().st_size:
        return "safetensors"
    raise CheckpointError(path, "not a StyleGAN2 network pickle, a PyTorch checkpoint or a safetensors file")


def load_generator(path: str | Path, *, model_id: str | None = None, device: str | torch.device = "cpu") -> Generator:
    """Load any supported generator file into an eval-mode `Generator` with frozen weights."""
    path = Path(path)
    fmt = sniff_format(path)
    reader = {"pkl": _read_pkl, "tensorflow": _read_pkl, "torch": _read_torch, "safetensors": _read_safetensors}[fmt]
    cfg, state, stored_id = reader(path)
    G = FAMILIES[cfg.family][1](cfg, model_id=model_id or stored_id or path.stem)
    no_w_avg = "mapping.w_avg" not in state
    if no_w_avg:  # no average w (the StyleGAN1 port, a rosinality training checkpoint): load the rest, estimate it
        state["mapping.w_avg"] = G.mapping.w_avg
    # Buffers the state dict leaves out but the file carries (StyleGAN1's constant noise maps, from a TensorFlow
    # pickle or our safetensors): copied in after the strict load.
    buffers = dict(G.named_buffers())
    extra = {k: state.pop(k) for k in set(state) - set(G.state_dict()) if k in buffers}
    try:
        G.load_state_dict(state, strict=True)
        with torch.no_grad():
            for name, value in extra.items():
                buffers[name].copy_(value)
    except RuntimeError as e:
        raise CheckpointError(path, f"weights do not fit the architecture it declares: {_first_line(e)}") from None
    G = G.eval().requires_grad_(False).to(device)
    if no_w_avg:
        G.mapping.w_avg.copy_(estimate_w_avg(G, generator=torch.Generator().manual_seed(0)))
    return G


def estimate_w_avg(G, n: int = 10_000, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean w over `n` z ~ N(0, I) drawn from `generator` (else torch's global RNG), c all zeros: for weights
    that carry no average w (built-in random models, the StyleGAN1 port, rosinality checkpoints without
    `latent_avg`)."""
    dev = G.mapping.w_avg.device
    with torch.no_grad():
        z = torch.randn([n, G.z_dim], generator=generator).to(dev)
        return G.mapping(z, torch.zeros([n, G.c_dim], device=dev))[:, 0].mean(dim=0)


def save_safetensors(G: Generator, path: str | Path) -> None:
    """Write our own format: the state dict under our names (plus StyleGAN1's constant noise maps, which it leaves
    out), the architecture and model id in the metadata."""
    meta = {"format": SAFETENSORS_FORMAT, "family": G.cfg.family, "config": json.dumps(G.cfg.to_dict()),
            "model_id": G.model_id}
    tensors = G.state_dict() | {k: b for k, b in G.named_buffers() if k.endswith("noise_const")}
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(state, str(path), metadata=meta)


# -- network pickles: official StyleGAN2-ADA, and NVIDIA's TensorFlow-era ones ------------------------------------

def _read_pkl(path: Path):
    try:
        with path.open("rb") as f:
            data = safe_pickle.load(f)
    except safe_pickle.UnsafePickleError as e:
        raise CheckpointError(path, f"unsafe pickle, nothing was run: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(path, f"corrupt or truncated network pickle ({type(e).__name__}: {_first_line(e)})") from None
    Gs = _tf_generator(path, data)
    if Gs is not None:
        try:
            cfg, state = generator_from_tf(Gs)
        except TFNetworkError as e:
            raise CheckpointError(path, f"TensorFlow network pickle: {e}") from None
        return cfg, state, None
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), safe_pickle.PersistentObject):
        raise CheckpointError(path, "a pickle, but not a StyleGAN2-ADA network pickle (no 'G_ema' network in it)")
    G_ema = data["G_ema"]
    return _config_from_init_kwargs(path, G_ema.init_kwargs), G_ema.state_dict(), None


def _tf_generator(path: Path, data) -> safe_pickle.TensorFlowNetwork | None:
    """Gs of a TensorFlow-era pickle: the last of (G, D, Gs), or a lone network; None if it is no such pickle."""
    TF = safe_pickle.TensorFlowNetwork
    if isinstance(data, TF):
        return data
    if not isinstance(data, tuple) or not any(isinstance(x, TF) for x in data):
        return None
    if len(data) != 3 or not all(isinstance(x, TF) for x in data):
        raise CheckpointError(path, f"a TensorFlow network pickle, but not the (G, D, Gs) tuple of networks "
                                    f"(found {tuple(type(x).__name__ for x in data)})")
    return data[2]


def _config_from_init_kwargs(path: Path, kw: dict) -> StyleGAN2Config:
    mapping = dict(kw.get("mapping_kwargs") or {})
    synthesis = dict(kw.get("synthesis_kwargs") or {})
    arch = synthesis.get("architecture", "skip")
    if arch not in ARCHITECTURES:
        raise CheckpointError(path, f"synthesis architecture {arch!r} is not supported (only {ARCHITECTURES})")
    try:
        return StyleGAN2Config(
            z_dim=int(kw["z_dim"]), c_dim=int(kw.get("c_dim", 0)), w_dim=int(kw["w_dim"]),
            img_resolution=int(kw["img_resolution"]), img_channels=int(kw.get("img_channels", 3)),
            mapping_layers=int(mapping.get("num_layers", 8)),
            mapping_lr_multiplier=float(mapping.get("lr_multiplier", 0.01)),
            channel_base=int(synthesis.get("channel_base", 32768)), channel_max=int(synthesis.get("channel_max", 512)),
            conv_clamp=synthesis.get("conv_clamp"), architecture=arch,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"G_ema does not describe a StyleGAN2 generator ({e})") from None


# -- rosinality stylegan2-pytorch checkpoint ----------------------------------------------------------------------

def read_torch_file(path: Path, *, mmap: bool = False):
    """A `torch.save` file read by torch's restricted unpickler (`weights_only=True`): tensors and plain containers,
    plus argparse.Namespace (rosinality's training checkpoints hold their options as one: plain attributes, harmless
    to rebuild); any other global (say `os.system`) is refused before anything is called. `mmap`: map a zip-format
    file's tensors instead of reading them (for files of a gigabyte whose larger part is dropped after loading)."""
    try:
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, f"refused by torch.load(weights_only=True), nothing was run: {_refusal(e)}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(path, f"corrupt or truncated PyTorch checkpoint ({_first_line(e)})") from None


def _refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what was refused (its first line only says that the load failed)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")]
    return (named or lines or [type(e).__name__])[0][:300]


def _read_torch(path: Path):
    ckpt = read_torch_file(path)
    if _is_tf_names_list(ckpt):
        raise CheckpointError(path, "this is the intermediate file of lernapparat's StyleGAN1 notebook, a [G, D, Gs] "
                                    "list under TensorFlow's names; load the file the notebook writes next, "
                                    "karras2019stylegan-ffhq-1024x1024.for_g_all.pt (the g_all state dict; the seed "
                                    "project ships that one as karras2019stylegan-ffhq-1024x1024.pt)")
    if isinstance(ckpt, dict) and "g_mapping.dense0.weight" in ckpt:
        return _read_stylegan1_port(path, ckpt)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("g_ema"), dict):
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(path, f"a PyTorch checkpoint without a 'g_ema' state dict (found {keys}); expected "
                                    "a rosinality stylegan2-pytorch checkpoint or a StyleGAN1 port state dict "
                                    "(g_mapping.*, g_synthesis.*)")
    src = ckpt["g_ema"]
    try:
        cfg, state = rosinality_to_ours(src)
    except KeyError as e:
        raise CheckpointError(path, f"rosinality checkpoint is missing {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None:  # else (a training checkpoint): estimated from the mapping, as for the StyleGAN1 port
        state["mapping.w_avg"] = latent_avg.reshape(-1).float()
    return cfg, state, None


def _is_tf_names_list(ckpt) -> bool:
    """[G, D, Gs] state dicts under TensorFlow's variable names ("G_mapping/Dense0/weight", ...)."""
    return (isinstance(ckpt, (list, tuple)) and len(ckpt) == 3 and all(isinstance(d, dict) for d in ckpt)
            and any(str(k).startswith(("G_mapping/", "G_synthesis/")) for k in ckpt[2]))


def rosinality_to_ours(src: dict[str, torch.Tensor]) -> tuple[StyleGAN2Config, dict[str, torch.Tensor]]:
    """Map rosinality's names (style.N, conv1, convs.N, to_rgb1, to_rgbs.N, noises.noise_N) onto the official ones."""
    n_mlp = len([k for k in src if re.fullmatch(r"style\.\d+\.weight", k)])
    n_up = len({k.split(".")[1] for k in src if k.startswith("to_rgbs.")})
    w_dim = src["style.1.weight"].shape[0]
    resolution = 4 * 2 ** n_up
    state: dict[str, torch.Tensor] = {}
    for i in range(n_mlp):
        state[f"mapping.fc{i}.weight"] = src[f"style.{i + 1}.weight"]
        state[f"mapping.fc{i}.bias"] = src[f"style.{i + 1}.bias"]
    state["synthesis.b4.const"] = src["input.input"][0]

    def styled_conv(dst: str, name: str, noise: str) -> None:
        state[f"{dst}.weight"] = src[f"{name}.conv.weight"][0]
        state[f"{dst}.affine.weight"] = src[f"{name}.conv.modulation.weight"]
        state[f"{dst}.affine.bias"] = src[f"{name}.conv.modulation.bias"]
        state[f"{dst}.noise_strength"] = src[f"{name}.noise.weight"].reshape([])
        state[f"{dst}.bias"] = src[f"{name}.activate.bias"]
        state[f"{dst}.noise_const"] = src[f"noises.{noise}"][0, 0]

    def to_rgb(dst: str, name: str) -> None:
        state[f"{dst}.weight"] = src[f"{name}.conv.weight"][0]
        state[f"{dst}.affine.weight"] = src[f"{name}.conv.modulation.weight"]
        state[f"{dst}.affine.bias"] = src[f"{name}.conv.modulation.bias"]
        state[f"{dst}.bias"] = src[f"{name}.bias"].reshape(-1)

    styled_conv("synthesis.b4.conv1", "conv1", "noise_0")
    to_rgb("synthesis.b4.torgb", "to_rgb1")
    for i in range(n_up):
        res = 8 * 2 ** i
        styled_conv(f"synthesis.b{res}.conv0", f"convs.{2 * i}", f"noise_{2 * i + 1}")
        styled_conv(f"synthesis.b{res}.conv1", f"convs.{2 * i + 1}", f"noise_{2 * i + 2}")
        to_rgb(f"synthesis.b{res}.torgb", f"to_rgbs.{i}")

    # Channels per resolution; ours follow min(channel_base // res, channel_max), as rosinality's table does.
    channels = {4: state["synthesis.b4.conv1.weight"].shape[0]}
    channels.update({8 * 2 ** i: state[f"synthesis.b{8 * 2 ** i}.conv1.weight"].shape[0] for i in range(n_up)})
    channel_max = max(channels.values())
    channel_base = channels[resolution] * resolution
    cfg = StyleGAN2Config(z_dim=src["style.1.weight"].shape[1], w_dim=w_dim, img_resolution=resolution,
                          mapping_layers=n_mlp, channel_base=channel_base, channel_max=channel_max, conv_clamp=None,
                          img_channels=state["synthesis.b4.torgb.weight"].shape[0])
    if any(cfg.channels(r) != c for r, c in channels.items()):
        raise ValueError(f"channel layout {channels} is not min(base // res, max) for any base and max")
    for res in cfg.block_resolutions:  # the blocks' FIR filters are fixed, not learned
        for name in ([f"b{res}"] + [f"b{res}.conv{j}" for j in (0, 1) if res > 4 or j == 1]):
            state[f"synthesis.{name}.resample_filter"] = fir_filter()
    return cfg, state


# -- the StyleGAN1 PyTorch port (lernapparat's notebook): karras2019stylegan-ffhq-1024x1024.pt -------------------

def _read_stylegan1_port(path: Path, ckpt: dict):
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(path, "a StyleGAN1 port file must be a plain state dict of tensors")
    try:
        cfg = stylegan1.config_from_port(ckpt)
    except KeyError as e:
        raise CheckpointError(path, f"StyleGAN1 port state dict is missing {e.args[0]!r}") from None
    except (ValueError, IndexError) as e:
        raise CheckpointError(path, f"not a StyleGAN1 generator layout ({e})") from None
    return cfg, {k: v.float() for k, v in stylegan1.port_to_ours(ckpt).items()}, None


# -- our safetensors ----------------------------------------------------------------------------------------------

def _read_safetensors(path: Path):
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"corrupt or truncated safetensors file ({_first_line(e)})") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(path, "a safetensors file, but not a stylebot generator (convert it with "
                                    "`stylebot weights convert`)")
    if meta.get("family") not in FAMILIES:
        raise CheckpointError(path, f"generator family {meta.get('family')!r} is not supported by this loader")
    try:
        cfg = FAMILIES[meta["family"]][0].from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(path, f"architecture metadata is unreadable ({e})") from None
    return cfg, state, meta.get("model_id")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
