"""The tiny networks that reference fixtures were computed with: their weights drawn from seeds the fixtures record
(a fixture stores only numbers the reference computed, never weights), and their fingerprints, so that a fixture
can say so when a change of ours makes those networks others; and the recorder of a reference's Adam."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (constant noise maps included, which the state dict leaves out),
    by name. torch's CPU generator draws the same numbers on every machine, so a seeded build gives the same one."""
    h = hashlib.sha256()
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def seeded_weights(shapes: Mapping[str, Sequence[int]], seed: int,
                   vector_scale: float = 0.5) -> dict[str, torch.Tensor]:
    """The random weights of a tiny network that a reference fixture was computed with, drawn rather than stored
    (the fixture keeps the seed): one generator seeded once, one tensor per name in sorted order, so that the draw
    does not depend on the order in which either implementation declares its layers; N(0, 1) for matrices and
    kernels, N(0, vector_scale^2) for vectors and scalars (biases, strengths, averages), so that a dozen layers of
    them neither vanish nor blow up."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(list(shapes[name]), generator=gen) * (vector_scale if len(shapes[name]) <= 1 else 1.0)
            for name in sorted(shapes)}


def seeded_in_order(shapes: Sequence[Sequence[int]], seed: int) -> list[torch.Tensor]:
    """`seeded_weights` for tensors known by their place rather than a name (noise maps, layer by layer)."""
    drawn = seeded_weights({f"{i:02d}": shape for i, shape in enumerate(shapes)}, seed)
    return [drawn[f"{i:02d}"] for i in range(len(shapes))]


def with_noise_strengths(G: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Give a tiny generator's noise layers (StyleGAN2's `noise_strength`, StyleGAN1's `noise.weight`) strengths
    drawn from `seed`, N(0, scale^2): they are zero as built, like a fresh StyleGAN's, so that without them the noise
    would not be part of what a parity fixture compares. Returns G."""
    shapes = {k: v.shape for k, v in G.state_dict().items() if k.endswith(("noise_strength", "noise.weight"))}
    G.load_state_dict(seeded_weights(shapes, seed, vector_scale=scale), strict=False)
    return G


def source_commit(clone) -> str:
    """The commit a reference clone is at (recorded in the fixtures its code computed)."""
    import subprocess

    return subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def write_fixture(out, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Save a reference fixture (safetensors, contiguous tensors, string metadata) and say where and how big."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=meta)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


class RecordingAdam(torch.optim.Adam):
    """torch's Adam that keeps, after every step, its (single) parameter and its moments: the reference's whole
    optimiser state, so that a test can take one step from exactly where the reference stood."""

    trail: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def step(self, closure=None):
        out = super().step(closure)
        p = self.param_groups[0]["params"][0]
        state = self.state[p]
        RecordingAdam.trail.append((p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()))
        return out

    @classmethod
    def stacked(cls) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(params, exp_avg, exp_avg_sq), each [steps, *shape]."""
        return tuple(torch.stack(x) for x in zip(*cls.trail))


def steps_from_reference(pool, key, start: torch.Tensor, ws: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                         tol: float) -> float:
    """Take each step of a reference optimisation from the reference's own state. The pool holds one row (`key`,
    whose total is the reference's number of steps); before step i its latent and Adam moments are set to the
    reference's after step i - 1 (`start` and zero moments before the first), then one tick must land on the
    reference's latent after step i within `tol`. Each step is thus compared alone: rounding differences between
    two implementations cannot pile up through the steps that follow (where a loop can amplify them: the
    parity tests say by how much). Returns the largest difference."""
    worst = 0.0
    prev = (start.reshape(ws.shape[1:]), torch.zeros_like(ws[0]), torch.zeros_like(ws[0]))
    (row,) = pool.rows  # the pool's only row, so Adam's row 0 (the reference has one latent)
    assert row.key == key and row.total == ws.shape[0], (row.key, row.total, ws.shape)
    for i in range(ws.shape[0]):
        pool.adam.params[0], pool.adam.exp_avg[0], pool.adam.exp_avg_sq[0] = prev
        pool.adam.steps[0] = row.step = i
        report = pool.tick()
        got = report.finished[0].ws if report.finished else pool.adam.params[0]
        err = (got - ws[i]).abs().max().item()
        assert err <= tol, f"step {i + 1} from the reference's state: max |ours - reference| = {err:.3g} > {tol}"
        worst = max(worst, err)
        prev = (ws[i], m[i], v[i])
    return worst
