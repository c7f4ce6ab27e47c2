"""Continuous batching for the latent optimisations: a pool of inversions and edits that share one synthesis
forward and one backward per tick, where every row is one job with its own target, step counter, learning-rate
schedule and Adam moments (`engine.row_adam.RowAdam`), and rows join and leave at any tick.

`OptimisationPool` is pure (no I/O, no queue): the engine's loop admits jobs with `add_inversion` / `add_edit`, calls
`tick()` in a thread, and stores what `tick` reports finished. A row alone follows exactly the steps of `invert()`
or `edit()` (same losses, same schedules, same Adam); in a pool its latent differs from its lone run only by the
rounding of sums taken over another batch size.

`precision` ("bf16": the generator and the feature networks under autocast, losses and Adam in float32) and
`synthesis` (a compiled generator, padded to a few batch sizes: `engine.device`) are set once at start-up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from engine.device import CPU_MAX_ACTIVE, autocast_for, pool_sizes, rows_that_fit
from engine.edit import DEFAULT_EDIT_RECIPE, EDIT_RECIPES, ClipScorer, EditLoss, check_prompt
from engine.edit import learning_rate as edit_learning_rate
from engine.images import from_uint8, to_uint8
from engine.invert import DEFAULT_RECIPE, RECIPES, InversionLoss, learning_rate, psnr
from engine.row_adam import RowAdam

log = logging.getLogger("stylebot.engine")


@dataclass
class Row:
    """One optimisation in the pool."""

    key: Any                            # the caller's handle (the engine's job)
    kind: str                           # "invert" | "edit"
    total: int                          # steps to run
    step: int = 0                       # steps done
    losses: list[float] = field(default_factory=list)
    target: torch.Tensor | None = None  # invert: [1, 3, R, R] in [-1, 1]
    prepared: list[torch.Tensor] = field(default_factory=list)  # invert: the target's side of the loss
    w0: torch.Tensor | None = None      # edit: [1, num_ws, w_dim], the L2 anchor
    text: torch.Tensor | None = None    # edit: [1, D] normalised CLIP text embedding
    prompt: str = ""


@dataclass
class Finished:
    """A row that left the pool: its latent and rendering, or the reason it failed."""

    key: Any
    kind: str
    steps: int
    ws: torch.Tensor | None = None      # [num_ws, w_dim] on the CPU
    image: np.ndarray | None = None     # uint8 [R, R, 3]
    losses: np.ndarray | None = None    # [steps]
    psnr: float | None = None           # invert: reconstruction vs target
    similarity: float | None = None     # edit: CLIP cosine similarity image <-> prompt
    w0: torch.Tensor | None = None      # edit: the start latent, [num_ws, w_dim] on the CPU
    error: str | None = None


@dataclass
class TickReport:
    progress: list[tuple[Any, int, int, float]] = field(default_factory=list)       # (key, step, total, loss)
    previews: list[tuple[Any, int, int, np.ndarray]] = field(default_factory=list)  # (key, step, total, uint8 image)
    finished: list[Finished] = field(default_factory=list)


class OptimisationPool:
    """Inversions (W+ recipe `invert_recipe`) and StyleCLIP edits (`edit_recipe`) in one continuous batch."""

    def __init__(self, G, *, vgg=None, clip: ClipScorer | None = None, invert_recipe: str = DEFAULT_RECIPE,
                 edit_recipe: str = DEFAULT_EDIT_RECIPE, preview_every: int = 100, precision: str = "fp32",
                 synthesis: Callable | None = None):
        self.G, self.vgg = G, vgg
        self.precision = precision                  # "fp32" | "tf32" | "bf16" (engine.device)
        self.synthesis = synthesis or G.synthesis   # the ticks' generator: G.synthesis, or compiled and padded
        self.recipe, self.edit_recipe = RECIPES[invert_recipe], EDIT_RECIPES[edit_recipe]
        if self.recipe.w_only_fraction or self.recipe.loss == "projector":
            raise ValueError(f"the pool optimises W+ rows; recipe {invert_recipe!r} (W stage, noise maps) runs with "
                             "invert()")
        self.preview_every = preview_every
        self.device = G.mapping.w_avg.device
        self.adam = RowAdam((G.num_ws, G.w_dim), device=self.device)
        self.rows: list[Row] = []
        self.invert_loss = InversionLoss(self.recipe, vgg.to(self.device), G.img_resolution, precision) if vgg else None
        self.clip = clip

    @property
    def clip(self) -> ClipScorer | None:
        return self._clip

    @clip.setter
    def clip(self, clip: ClipScorer | None) -> None:
        """The CLIP of the edit rows; the engine sets it when the first edit arrives (it loads CLIP lazily)."""
        loss = EditLoss(self.edit_recipe, clip, self.G.img_resolution, self.precision) if clip else None  # may refuse
        self._clip, self.edit_loss = clip, loss

    def __len__(self) -> int:
        return len(self.rows)

    def add_inversion(self, key: Any, target: np.ndarray, *, steps: int | None = None,
                      init_ws: torch.Tensor | None = None) -> None:
        """Join an inversion of `target` (uint8 [R, R, 3], aligned at the model's resolution)."""
        t = from_uint8(target, self.device)
        if t.shape[-1] != self.G.img_resolution or t.shape[0] != 1:
            raise ValueError(f"an inversion target is one {self.G.img_resolution} px image, got {tuple(t.shape)}")
        prepared = self.invert_loss.prepare(t)
        if init_ws is None:
            init_ws = self.invert_loss.start(self.G, 1)
        self._join(Row(key, "invert", steps or self.recipe.steps_on(self.device), target=t, prepared=prepared),
                   init_ws)

    def add_edit(self, key: Any, w0: torch.Tensor, prompt: str, *, steps: int | None = None,
                 init_ws: torch.Tensor | None = None, clip: ClipScorer | None = None) -> None:
        """Join an edit of `w0` ([num_ws, w_dim]) toward `prompt`; `init_ws` to go on from an earlier edit; `clip`:
        the edit rows' CLIP, set here by the first edit (the engine loads CLIP lazily)."""
        if clip is not None and clip is not self.clip:
            self.clip = clip
        w0 = w0.to(self.device, torch.float32).reshape(1, self.G.num_ws, self.G.w_dim)
        text = self.clip.encode_text([check_prompt(prompt)])
        row = Row(key, "edit", steps or self.edit_recipe.steps, w0=w0, text=text, prompt=prompt)
        self._join(row, w0[0] if init_ws is None else init_ws)

    def _join(self, row: Row, start: torch.Tensor) -> None:
        self.adam.add(start.to(self.device, torch.float32).reshape(self.G.num_ws, self.G.w_dim))
        self.rows.append(row)

    def drop(self, key: Any) -> bool:
        """Take a row out without finishing it (its job was cancelled); True if it was there."""
        for i, row in enumerate(self.rows):
            if row.key is key:
                self.adam.remove(i)
                del self.rows[i]
                return True
        return False

    def _lr(self, row: Row) -> float:
        if row.kind == "invert":
            return learning_rate(row.step, row.total, self.recipe)
        return edit_learning_rate(row.step, row.total, self.edit_recipe)

    def tick(self) -> TickReport:
        """One step for every row: one synthesis forward, each row's own loss, one backward, one Adam update per
        row. Rows that have done their steps (or whose loss is not finite) leave the pool, rendered."""
        report = TickReport()
        if not self.rows:
            return report
        ws = self.adam.params.clone().requires_grad_(True)
        with autocast_for(self.device, self.precision):
            img = self.synthesis(ws, noise_mode="const")
        img = img.float()
        per_row = self._losses(ws, img)
        per_row.sum().backward()
        grad = torch.nan_to_num(ws.grad, nan=0.0, posinf=0.0, neginf=0.0)  # a broken row must not spoil others
        self.adam.step(grad, [self._lr(row) for row in self.rows])
        losses = per_row.detach().cpu().tolist()
        done: list[int] = []
        for i, (row, loss) in enumerate(zip(self.rows, losses)):
            row.step += 1
            row.losses.append(loss)
            report.progress.append((row.key, row.step, row.total, loss))
            if row.step % self.preview_every == 0 and row.step < row.total:
                report.previews.append((row.key, row.step, row.total, to_uint8(img[i:i + 1].detach())[0]))
            if row.step >= row.total or not np.isfinite(loss):
                done.append(i)
        for i in reversed(done):
            report.finished.append(self._finish(i))
        report.finished.reverse()
        return report

    def _losses(self, ws: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """[rows] each row's own loss: the recipe's pixel + VGG loss for inversions, CLIP + L2 for edits."""
        parts, where = [], []
        inv = [i for i, row in enumerate(self.rows) if row.kind == "invert"]
        if inv:
            rows = [self.rows[i] for i in inv]
            prepared = [torch.cat(part) for part in zip(*(r.prepared for r in rows))]
            parts.append(self.invert_loss(img[inv], prepared))
            where += inv
        ed = [i for i, row in enumerate(self.rows) if row.kind == "edit"]
        if ed:
            rows = [self.rows[i] for i in ed]
            text, w0 = torch.cat([r.text for r in rows]), torch.cat([r.w0 for r in rows])
            parts.append(self.edit_loss(img[ed], ws[ed], w0, text))
            where += ed
        order = torch.tensor(where, device=img.device)
        return torch.empty(len(self.rows), device=img.device).index_copy(0, order, torch.cat(parts))

    def _finish(self, i: int) -> Finished:
        row = self.rows.pop(i)
        ws = self.adam.remove(i)[None]
        out = Finished(row.key, row.kind, row.step, losses=np.asarray(row.losses, dtype=np.float32))
        if not torch.isfinite(ws).all() or not np.isfinite(row.losses[-1]):
            out.error = "the optimisation went wrong on this one (its numbers blew up); please send it again"
            return out
        with torch.no_grad():
            img = self.G.synthesis(ws, noise_mode="const")
            out.ws, out.image = ws[0].cpu(), to_uint8(img)[0]
            if row.kind == "invert":
                out.psnr = psnr(out.image, to_uint8(row.target)[0])
            else:
                out.similarity = self.edit_loss.similarity(img, row.text, "fp32").item()
                out.w0 = row.w0[0].cpu()
        return out


def _best_cpu_pool(pool: "OptimisationPool", target, rounds: int = 3) -> int:
    """On a CPU a bigger pool is not always faster per face: an inversion tick of the ffhq-256 architecture costs
    about the same per row at 1 to 8 rows on 2 cores, while the tiny model's costs 1.5x less at 8. So time ticks at
    1, 2, 4, ... rows (up to CPU_MAX_ACTIVE) and keep the size that `cpu_pool_size` picks. The sizes are timed in
    turn, `rounds` times over, after one warm-up tick each: a one-time cost (allocations, oneDNN's choice of kernels)
    or another process busy for a moment lands on one reading of one size, not on whichever size came first (one
    reading per size chose 1, 2, 4 or 8 for the same model in consecutive starts). Logged."""
    sizes = pool_sizes(CPU_MAX_ACTIVE)

    def resize(n: int) -> None:
        while len(pool) < n:  # rows that never finish while measured
            pool.add_inversion(("probe", len(pool)), target, steps=10**6)
        while len(pool) > n:
            pool.drop(pool.rows[-1].key)

    for n in sizes:
        resize(n)
        pool.tick()  # warm-up at this size
    ticks: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            resize(n)
            started = time.perf_counter()
            pool.tick()
            ticks[n].append(time.perf_counter() - started)
    resize(0)
    rows, per_row = cpu_pool_size(ticks)
    log.info("max_active auto: %d on a CPU (ms per row and step at pool sizes: %s; the fastest of %d ticks each)",
             rows, ", ".join(f"{n}: {t * 1000:.1f}" for n, t in per_row.items()), rounds)
    return rows


def cpu_pool_size(ticks: dict[int, list[float]]) -> tuple[int, dict[int, float]]:
    """The pool size with the least time per row, from the seconds of ticks timed at each size, and the time per row
    it judged by. A size's tick is its fastest reading (what it costs when nothing else is busy), and never less than
    a smaller size's (a tick of more rows does all the work of fewer: a cheaper reading is noise, not a saving).
    Within 5 % of the least, the larger size: newcomers join at once."""
    per_row, floor = {}, 0.0
    for n in sorted(ticks):
        floor = max(floor, min(ticks[n]))
        per_row[n] = floor / n
    best = min(per_row.values())
    return max(n for n, t in per_row.items() if t <= 1.05 * best), per_row


def auto_max_active(G, vgg, *, precision: str = "fp32") -> int:
    """`[engine] max_active = "auto"`: on CUDA, the rows that fit in 0.8 of the free memory at what one inversion
    row's step (forward and backward) measured at start-up; on a CPU, the pool size with the least time per row
    (`_best_cpu_pool`). Logged."""
    device = G.mapping.w_avg.device
    pool = OptimisationPool(G, vgg=vgg, precision=precision)
    with torch.no_grad():
        target = to_uint8(G.synthesis(G.mapping.w_avg.reshape(1, 1, -1).repeat(1, G.num_ws, 1)))[0]
    if device.type != "cuda":
        return _best_cpu_pool(pool, target)
    pool.add_inversion("probe", target, steps=2)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    pool.tick()
    row = torch.cuda.max_memory_allocated(device) - before
    pool.drop("probe")
    free, _ = torch.cuda.mem_get_info(device)
    rows = rows_that_fit(free, row)
    log.info("max_active auto: %d (one row's step takes %.0f MiB, %.0f MiB free)", rows, row / 2**20, free / 2**20)
    return rows
