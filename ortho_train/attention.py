"""Eager attention for the duration of a block, for transforms SDPA does not support.

Hugging Face's SDPA path fails two things this package needs: `torch.func.vmap` (the mask
builder branches on tensor values, "is the padding mask all ones?") and double backward (the
CPU flash-attention backward has no derivative). Eager attention computes the same function
with plain ops; `eager_attention(model)` switches a Hugging Face model to it and back.
Other modules are left as they are.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Inside: `model` (a Hugging Face `PreTrainedModel`) runs eager attention; after: as before."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = hasattr(model, "set_attn_implementation") and previous not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)
