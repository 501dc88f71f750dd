"""A content hash of what a model computes, so evaluations of identical models are reused.

Two models with the same fingerprint have bit-identical parameters and buffers on every path
their forward reads, the same α per `OrthoLinear` and the same backends: their metrics are
the same, so a table measures them once. At α = 0, or with an empty ortho stream, an
`OrthoLinear` never reads its ortho buffers and its α does not matter (the switch is decided
on the host), so the layer is hashed as "switched off": the isolated and delta models at α = 0
and the quantised public model (an empty stream) share one fingerprint, as they share outputs.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ortho_train.ortho_linear import ortho_layers

ORTHO_BUFFERS = ("ortho_indices", "ortho_values")


def _switched_off(layer) -> bool:
    """The layer computes its base stream alone (mirrors `OrthoLinear.forward`)."""
    return layer.alpha == 0 or layer.nnz == 0


def _unread_keys(model: nn.Module) -> set[str]:
    return {f"{name}.{buffer}" for name, layer in ortho_layers(model).items() if _switched_off(layer)
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
        alpha = "off" if _switched_off(layer) else repr(layer.alpha)
        digest.update(f"{name}|alpha={alpha}|backend={layer.backend}".encode())
    return digest.hexdigest()
