"""A content hash of what a model computes, so evaluations of identical models are reused.

Two models with the same fingerprint have bit-identical parameters and buffers on every path
their forward reads, the same α per `OrthoLinear` and the same backends: their metrics are
the same, so a table measures them once. At α = 0 an `OrthoLinear` never reads its ortho
buffers (the switch is decided on the host), so they are left out of the hash: the isolated
model at α = 0 and the quantised public model share one fingerprint, as they share outputs.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ortho_train.ortho_linear import ortho_layers

ORTHO_BUFFERS = ("ortho_indices", "ortho_values")


def _unread_keys(model: nn.Module) -> set[str]:
    return {f"{name}.{buffer}" for name, layer in ortho_layers(model).items() if layer.alpha == 0
            for buffer in ORTHO_BUFFERS}


def model_fingerprint(model: nn.Module) -> str:
    """Hex digest over class, every state tensor (name, dtype, shape, bytes) and the switches."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model).__qualname__.encode())
    skip = _unread_keys(model)
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1)  # (numel,)
        digest.update(f"{key}|{data.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    for name, layer in ortho_layers(model).items():
        digest.update(f"{name}|alpha={layer.alpha!r}|backend={layer.backend}".encode())
    return digest.hexdigest()
