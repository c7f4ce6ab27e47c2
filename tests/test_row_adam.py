"""RowAdam: rows of a pool that join and leave at any step are each optimised exactly as torch's Adam would."""

from __future__ import annotations

import torch

from engine.row_adam import RowAdam


def _loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A per-row loss with a non-trivial gradient (each row's own target)."""
    return ((x - target).square() * (1 + x.sin().square())).flatten(1).sum(1)


def _torch_adam(start: torch.Tensor, target: torch.Tensor, lrs: list[float]) -> torch.Tensor:
    w = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], betas=(0.9, 0.999), eps=1e-8)
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        _loss(w[None], target[None]).sum().backward()
        opt.step()
    return w.detach()


def test_rows_that_join_and_leave_equal_their_own_torch_adam_bit_for_bit():
    """Row b joins at step 3 and leaves at step 9 while a runs on and c joins at 6: each ends exactly (torch.equal)
    where torch.optim.Adam takes it alone. The gradient of a row depends on that row only, and the update is
    the same float operations in the same order, so no tolerance is needed."""
    g = torch.Generator().manual_seed(0)
    starts = {k: torch.randn(4, 6, generator=g) for k in "abc"}
    targets = {k: torch.randn(4, 6, generator=g) for k in "abc"}
    schedule = {k: [0.05 * (1 + i % 3) for i in range(12)] for k in "abc"}  # per-row, changing learning rates
    joins, leaves = {"a": 0, "b": 3, "c": 6}, {"a": 12, "b": 9, "c": 12}
    pool, rows, done, taken = RowAdam((4, 6)), [], {}, {k: 0 for k in "abc"}
    for step in range(12):
        for k in "abc":
            if joins[k] == step:
                pool.add(starts[k])
                rows.append(k)
        x = pool.params.clone().requires_grad_(True)
        _loss(x, torch.stack([targets[k] for k in rows])).sum().backward()
        pool.step(x.grad, [schedule[k][taken[k]] for k in rows])
        for k in rows:
            taken[k] += 1
        for k in [k for k in rows if leaves[k] == step + 1]:
            done[k] = pool.remove(rows.index(k))
            rows.remove(k)
    for k in "abc":
        alone = _torch_adam(starts[k], targets[k], schedule[k][:taken[k]])
        assert taken[k] == leaves[k] - joins[k]
        assert torch.equal(done[k], alone), (k, (done[k] - alone).abs().max())
    assert len(pool) == 0


def test_reset_is_a_fresh_optimiser_for_that_row_only():
    """A recipe's second stage (W to W+) starts a new Adam for its row; the other rows keep their moments."""
    pool = RowAdam((3,))
    pool.add(torch.ones(3))
    pool.add(torch.zeros(3))
    pool.step(torch.ones(2, 3), [0.1, 0.1])
    before = pool.exp_avg[1].clone()
    pool.reset(0)
    assert pool.steps.tolist() == [0, 1] and pool.exp_avg[0].abs().sum() == 0
    assert torch.equal(pool.exp_avg[1], before)
