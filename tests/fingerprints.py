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
