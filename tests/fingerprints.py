"""The tiny networks that reference fixtures were computed with: their weights drawn from seeds the fixtures record
(a fixture stores only numbers the reference computed, never weights), and their fingerprints, so that a fixture
can say so when a change of ours makes those networks others; and the recorder of a reference's Adam."""

from __future__ import annotations

import hashlib
import math
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


def seeded_convnet_weights(shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, torch.Tensor]:
    """`seeded_weights` (vectors N(0, 0.25^2)) for a deep convolutional network with batch norms: the face encoders'
    IR-SE backbone, two dozen residual units whose batch norms, in eval mode, use the running statistics drawn here
    rather than the batch's. Each conv kernel [out, in, kh, kw] is divided by sqrt(in kh kw) and each batch norm
    gets a scale of 1 + N(0, 0.25^2) and a running variance of 1 + |N(0, 0.25^2)|, so that a unit keeps about the
    scale of its input: with N(0, 1) kernels a unit multiplies it by ~30, and with variances near 0.5 the units
    amplify rounding until float32 and float64 differ by 1e-4 of the output (with these: 2e-7 to 1.2e-6 of it).
    A batch norm is found by name: the module of a `.weight` that also has a `.running_var`. Dense matrices stay
    N(0, 1) (their layers scale them at run time)."""
    drawn = seeded_weights(shapes, seed, vector_scale=0.25)
    for name, t in drawn.items():
        module = name.rsplit(".", 1)[0]
        if t.ndim == 4:
            t /= math.sqrt(t[0].numel())
        elif name.endswith("running_var"):
            drawn[name] = t.abs() + 1
        elif name.endswith(".weight") and f"{module}.running_var" in shapes:
            drawn[name] = t + 1
    return drawn


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


KINK_NUDGE = 1e-6  # how far a retried step's start moves: a few hundred ulp of the latent, 1 % of the bound
KINK_TRIES = 8


def steps_from_reference(pool, key, start: torch.Tensor, ws: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                         tol: float) -> float:
    """Take each step of a reference optimisation from the reference's own state. The pool holds one row (`key`,
    whose total is the reference's number of steps); before step i its latent and Adam moments are set to the
    reference's after step i - 1 (`start` and zero moments before the first), then one tick must land on the
    reference's latent after step i within `tol`. Each step is thus compared alone: rounding differences between
    two implementations cannot pile up through the steps that follow (where a loop can amplify them: the
    parity tests say by how much). Returns the largest difference.

    A latent can sit on a kink of the loss, where a ReLU, a max-pool or a clamp decides on a few ulp: the gradient
    is one thing on one side and another on the other, and two implementations (two CPUs) may take either side
    (seen on an Intel Xeon: the seed recipe's step 9, where a start moved by 1e-6 gives either gradient, 7.4e-5
    apart, against 1e-8 at every other step). A step that misses is therefore taken again from starts moved by
    `KINK_NUDGE` (seeded); it passes if one of them lands within `tol`, which a real defect (a wrong loss, a wrong
    Adam) does not do, since it is wrong on both sides."""
    worst = 0.0
    prev = (start.reshape(ws.shape[1:]), torch.zeros_like(ws[0]), torch.zeros_like(ws[0]))
    (row,) = pool.rows  # the pool's only row, so Adam's row 0 (the reference has one latent)
    assert row.key == key and row.total == ws.shape[0], (row.key, row.total, ws.shape)
    for i in range(ws.shape[0]):
        err = (_one_step(pool, row, i, prev) - ws[i]).abs().max().item()
        if err > tol:
            nudges = torch.Generator().manual_seed(i)
            for _ in range(KINK_TRIES):
                nudged = prev[0] + KINK_NUDGE * torch.randn(prev[0].shape, generator=nudges)
                err = min(err, (_one_step(pool, row, i, (nudged, prev[1], prev[2])) - ws[i]).abs().max().item())
            print(f"step {i + 1} starts on a kink of the loss: from a start moved by {KINK_NUDGE:g}, {err:.2g}")
        assert err <= tol, f"step {i + 1} from the reference's state: max |ours - reference| = {err:.3g} > {tol}"
        worst = max(worst, err)
        prev = (ws[i], m[i], v[i])
    return worst


def _one_step(pool, row, i: int, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The row's latent after one tick from `state` (latent, Adam moments) at step i (the row put back first if a
    tick finished it)."""
    if not pool.rows:
        pool.adam.add(state[0])
        pool.rows.append(row)
    pool.adam.params[0], pool.adam.exp_avg[0], pool.adam.exp_avg_sq[0] = state
    pool.adam.steps[0] = row.step = i
    report = pool.tick()
    return report.finished[0].ws if report.finished else pool.adam.params[0].clone()
