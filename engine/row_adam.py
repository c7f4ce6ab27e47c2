"""Adam over the rows of a pool that samples join and leave at any step: the optimiser of a continuous-batching
engine (issue 13), where every row is one user's latent with its own step counter, learning rate and moments.

Adam is elementwise, so stacking rows changes nothing in the maths: `RowAdam.step` does for each row exactly what
`torch.optim.Adam` (betas 0.9/0.999, eps 1e-8, no weight decay, the single-tensor path torch takes on the CPU) does
for a parameter of its own, with that row's bias corrections (`1 - beta ** t`, t counted per row) and that row's
learning rate. Rows are added with `add` and removed with `remove`; the others keep their state untouched.
"""

from __future__ import annotations

import torch


class RowAdam:
    """Adam on a [rows, *shape] tensor whose rows are independent optimisations."""

    def __init__(self, shape: tuple[int, ...], *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.shape, self.betas, self.eps = tuple(shape), betas, eps
        empty = torch.zeros([0, *self.shape], device=device, dtype=dtype)
        self.params = empty.clone()                          # [rows, *shape] the optimised values
        self.exp_avg, self.exp_avg_sq = empty.clone(), empty.clone()
        self.steps = torch.zeros([0], dtype=torch.int64)     # Adam steps taken by each row (its t)

    def __len__(self) -> int:
        return self.params.shape[0]

    def add(self, start: torch.Tensor) -> int:
        """A new row starting at `start` [*shape] with fresh moments; returns its index."""
        start = start.to(self.params).reshape(1, *self.shape)
        zeros = torch.zeros_like(start)
        self.params = torch.cat([self.params, start])
        self.exp_avg, self.exp_avg_sq = torch.cat([self.exp_avg, zeros]), torch.cat([self.exp_avg_sq, zeros])
        self.steps = torch.cat([self.steps, torch.zeros([1], dtype=torch.int64)])
        return len(self) - 1

    def remove(self, row: int) -> torch.Tensor:
        """Take a row out (the rows after it move up by one); returns its values."""
        keep = [i for i in range(len(self)) if i != row]
        out = self.params[row].clone()
        self.params, self.exp_avg, self.exp_avg_sq = self.params[keep], self.exp_avg[keep], self.exp_avg_sq[keep]
        self.steps = self.steps[keep]
        return out

    def reset(self, row: int) -> None:
        """Forget a row's moments and step count (a new optimiser for it, as a recipe's second stage makes)."""
        self.exp_avg[row].zero_()
        self.exp_avg_sq[row].zero_()
        self.steps[row] = 0

    def step(self, grad: torch.Tensor, lr: list[float]) -> None:
        """One Adam step for every row: `grad` [rows, *shape], `lr` one learning rate per row. The moments are
        updated for all rows at once; the update itself row by row with Python-float step sizes, as torch does, so
        that a row's result is bit for bit what `torch.optim.Adam` gives that row alone."""
        b1, b2 = self.betas
        with torch.no_grad():
            self.exp_avg.lerp_(grad, 1 - b1)
            self.exp_avg_sq.mul_(b2).addcmul_(grad, grad.conj(), value=1 - b2)
            self.steps += 1
            for row, (t, rate) in enumerate(zip(self.steps.tolist(), lr)):
                denom = (self.exp_avg_sq[row].sqrt() / (1 - b2 ** t) ** 0.5).add_(self.eps)
                self.params[row].addcdiv_(self.exp_avg[row], denom, value=-rate / (1 - b1 ** t))
