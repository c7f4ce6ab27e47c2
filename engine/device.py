"""How the engine's networks run on a device: numeric precision, compilation of the generator, and how many
optimisations fit in memory at once. Decided once at start-up from `[engine]` in config.toml.

Precision (`[engine] precision`, resolved by `resolve_precision`):
- "fp32": plain float32 everywhere (TF32 off on CUDA).
- "tf32": on CUDA, TF32 matmuls and convolutions and `cudnn.benchmark`; on a CPU the same as fp32.
- "bf16": bf16 autocast around the generator's synthesis and the feature networks (VGG16, CLIP's image encoder)
  only; their outputs are cast back to float32, so that losses and Adam stay in float32. Works on CUDA and CPU.
- "auto": tf32 on CUDA, fp32 on a CPU (the CPU defaults stay as they are).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import platform
import time
from typing import Callable, Sequence

import torch

log = logging.getLogger("stylebot.engine")

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
CPU_MAX_ACTIVE = 8                      # `max_active = "auto"` on a CPU tries pool sizes up to this
MAX_ACTIVE_RANGE = (1, 64)              # `max_active = "auto"` on CUDA is clamped to this


def resolve_precision(device: str | torch.device, precision: str) -> str:
    """The precision that runs on `device`: "auto" -> "tf32" on CUDA, "fp32" elsewhere; "tf32" on a CPU -> "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "tf32" if cuda else "fp32"
    return "fp32" if precision == "tf32" and not cuda else precision


def configure_backends(device: str | torch.device, precision: str) -> None:
    """Process-wide CUDA switches for a resolved `precision`: TF32 and cudnn.benchmark unless "fp32". Nothing on a
    CPU."""
    if torch.device(device).type != "cuda":
        return
    fast = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = fast


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's <malloc.h>
KEEP_FREED_BYTES = 1 << 30             # free memory at the heap's top beyond this goes back to the system


def keep_freed_memory(trim_bytes: int = KEEP_FREED_BYTES) -> bool:
    """On glibc, serve every CPU allocation from the heap and keep freed memory for the next one.

    glibc maps each allocation over its mmap threshold (at most 32 MiB) freshly from the system and unmaps it when
    freed, so every tensor that big faults in all its pages again on every tick: at the ffhq-256 architecture (64
    channels at 256 px: 16 MiB an image) an inversion tick of 2 rows took 2.0x and of 8 rows 3.3x the time per row
    of 1 row on 2 cores (`benchmarks/cpu_memory.py`). With mmap off the pages are reused. The cost: the process
    keeps the memory of its biggest tick, as CUDA's caching allocator does. Returns whether it was applied (False
    off glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_bytes))


def autocast_for(device: str | torch.device, precision: str):
    """A context for the generator and the feature networks: bf16 autocast for "bf16", else nothing."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_compile(device: str | torch.device, compile: str) -> bool:
    """`[engine] compile`: "auto" compiles on CUDA only (on a CPU compiling costs minutes and gains little)."""
    if compile not in ("auto", "off"):
        raise ValueError(f"compile must be \"auto\" or \"off\", got {compile!r}")
    return compile == "auto" and torch.device(device).type == "cuda"


def pool_sizes(max_active: int) -> tuple[int, ...]:
    """The batch sizes a compiled pool runs at: the powers of two below `max_active`, then `max_active` itself. Never
    more rows than `max_active`: the pool's memory was sized for that many (padding 49 rows to 64 would not fit where
    49 fill the card), and a size beyond the largest would compile again on a user's job."""
    sizes = [1]
    while sizes[-1] * 2 < max_active:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes) + ((max_active,) if max_active > 1 else ())


def rows_that_fit(free_bytes: int, row_bytes: int, fraction: float = 0.8) -> int:
    """Pool rows that fit in `fraction` of the free device memory at `row_bytes` each, clamped to MAX_ACTIVE_RANGE."""
    lo, hi = MAX_ACTIVE_RANGE
    return max(lo, min(hi, math.floor(fraction * free_bytes / max(row_bytes, 1))))


class PaddedSynthesis:
    """`synthesis` run only at the batch sizes `sizes`: a batch is padded up to the next size (copies of its last
    row, outside the graph: they get no gradient) and the padding is cut off the images. A compiled generator then
    reuses one graph per size as rows join and leave the pool. Beyond the largest size a batch runs as it is."""

    def __init__(self, synthesis: Callable, sizes: Sequence[int]):
        self.synthesis, self.sizes = synthesis, sorted(sizes)

    def __call__(self, ws: torch.Tensor, **kwargs) -> torch.Tensor:
        n = ws.shape[0]
        size = next((s for s in self.sizes if s >= n), n)
        if size > n:
            ws = torch.cat([ws, ws[-1:].detach().expand(size - n, *ws.shape[1:])])
        torch.compiler.cudagraph_mark_step_begin()  # a new tick: the last one's CUDA graph outputs are done with
        return self.synthesis(ws, **kwargs)[:n]


def compile_synthesis(G, sizes: Sequence[int], precision: str) -> Callable:
    """G.synthesis compiled (torch.compile, CUDA graphs: mode "reduce-overhead") for the pool's batch sizes and
    warmed up on each, forward and backward as a tick runs it, so that no user's job pays for compiling. If compiling
    fails, one warning and G.synthesis as it is."""
    started, device = time.perf_counter(), G.mapping.w_avg.device
    try:
        fn = PaddedSynthesis(torch.compile(G.synthesis, mode="reduce-overhead", dynamic=False), sizes)
        for n in sizes:
            for _ in range(3):  # CUDA graph trees record on a later call than the first
                ws = G.mapping.w_avg.reshape(1, 1, -1).repeat(n, G.num_ws, 1).requires_grad_(True)
                with autocast_for(device, precision):
                    img = fn(ws, noise_mode="const")
                img.float().square().mean().backward()
    except Exception as e:  # noqa: BLE001 - any failure of the compiler: the engine runs uncompiled
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        log.warning("compiling the generator failed (%s); running it uncompiled", why)
        return G.synthesis
    log.info("compiling the generator for pool sizes %s: %.0f s", ", ".join(map(str, sizes)),
             time.perf_counter() - started)
    return fn
