"""Fingerprints of the tiny networks that reference fixtures were computed with, so that a fixture which stores
only numbers (not the networks) can say so when a change of ours makes those networks others."""

from __future__ import annotations

import hashlib

import torch


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (constant noise maps included, which the state dict leaves out),
    by name. torch's CPU generator draws the same numbers on every machine, so a seeded build gives the same one."""
    h = hashlib.sha256()
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
