"""Read network pickles (StyleGAN2-ADA's PyTorch ones, NVIDIA's TensorFlow-era ones) without running anything
from the file.

An official `.pkl` is a dict whose networks are `torch_utils.persistence` objects: each carries the source code of
its module and is rebuilt, on a normal `pickle.load`, by *executing* that code. A TensorFlow-era `.pkl` (StyleGAN,
StyleGAN2) is a tuple `(G, D, Gs)` of `dnnlib.tflib.network.Network` objects, each also carrying its module's
source, which a normal load imports and builds a TensorFlow graph from. Here every global the stream names is
looked up in an allow-list of harmless rebuilders: persistent objects come back as `PersistentObject` records
(class name + state, the source code kept as inert text), TensorFlow networks as `TensorFlowNetwork` records (the
pickled state: build function name and kwargs, components, variables as numpy arrays; the source kept as inert
text), tensors through torch's own rebuild functions with the inner storages read by
`torch.load(weights_only=True)`, numpy arrays and scalars only as plain numbers. Any other global is refused before
anything is called, and nothing from the file is ever compiled or run.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it may try to run code)."""


@dataclass
class PersistentObject:
    """A `torch_utils.persistence` object, not rebuilt: its class name and pickled state."""

    class_name: str
    state: dict[str, Any]
    module_src: str = field(repr=False, default="")

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers under dotted names, as `torch.nn.Module.state_dict()` would list them."""
        out: dict[str, torch.Tensor] = {}
        skip = set(self.state.get("_non_persistent_buffers_set") or ())
        for group in ("_parameters", "_buffers"):
            for name, tensor in (self.state.get(group) or {}).items():
                if tensor is not None and name not in skip:
                    out[prefix + name] = tensor.detach()
        for name, child in (self.state.get("_modules") or {}).items():
            if isinstance(child, PersistentObject):
                out.update(child.state_dict(f"{prefix}{name}."))
            elif child is not None:
                raise pickle.UnpicklingError(f"submodule {prefix}{name} is a {type(child).__name__}, not a network")
        return out


class AttrDict(dict):
    """Stands in for dnnlib.EasyDict: a plain dict."""


class TensorFlowNetwork:
    """Stands in for dnnlib.tflib.network.Network: the state it pickled, as data, never rebuilt.

    `state` holds what tflib's `Network.__getstate__` wrote: version, name, static_kwargs (the build function's
    keyword arguments), components (name -> TensorFlowNetwork), build_module_src (kept as inert text: never
    compiled or run), build_func_name, and variables as (name, numpy array or scalar) pairs.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a TensorFlow network whose state is a {type(state).__name__}, not a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"TensorFlowNetwork({getattr(self, 'state', {}).get('name')!r})"


def _persistent_obj(meta: dict) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("malformed persistent object")
    return PersistentObject(str(meta.get("class_name")), dict(meta.get("state") or {}), str(meta.get("module_src", "")))


def _storage_from_bytes(data: bytes):
    # The inner blob is a legacy torch.save() of one typed storage; weights_only refuses anything else.
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_scalar(dtype: np.dtype, data: bytes | str | None = None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar with an object dtype")
    if isinstance(data, str):  # a Python 2 pickle's bytes, read as latin-1 (see `load`)
        data = data.encode("latin1")
    return np.frombuffer(data or b"", dtype=dtype, count=1)[0]


def _numpy_reconstruct(cls, shape, typecode):
    if cls is not np.ndarray:
        raise UnsafePickleError("numpy array of a subclass")
    return np.ndarray.__new__(np.ndarray, shape, typecode)


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): AttrDict,
    ("dnnlib", "EasyDict"): AttrDict,
    ("dnnlib.tflib.network", "Network"): TensorFlowNetwork,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from `ALLOWED`; it never imports a module named by the stream."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused global {module}.{name}: not part of a network pickle") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id: not part of a network pickle")


def load(f: BinaryIO) -> Any:
    """Unpickle an untrusted network pickle; raises UnsafePickleError on any global outside the allow-list.

    Python 2 byte strings (old numpy array data) are read as latin-1, as numpy asks and as the community's
    loaders do (`pickle.load(f, encoding='latin1')`); Python 3 pickles hold none.
    """
    return RestrictedUnpickler(f, encoding="latin1").load()
