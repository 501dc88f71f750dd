"""Handing a Hugging Face causal LM its KV cache, whatever the transformers version.

transformers 5.x renamed the forward argument and output field `past_key_values` to `cache`;
the old name still works there, with a deprecation warning on every call (so on every decoding
step). `cache_kwargs(model, cache)` names the argument the model's own `forward` declares, and
`returned_cache(output)` reads the field the output holds, so the metrics run warning-free on
old and new versions alike. A PEFT wrapper is looked through to the model it wraps.
`last_position_kwargs(model)` asks for the logits of the last position only where `forward`
takes `logits_to_keep` (transformers ≥ 4.50; `num_logits_to_keep` before), so a greedy step
projects one position onto the vocabulary, not the whole prompt.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@functools.lru_cache(maxsize=None)
def _keep_argument(forward_owner: type) -> str | None:
    params = inspect.signature(forward_owner.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_position_kwargs(model: nn.Module) -> dict:
    """`{"logits_to_keep": 1}` (or its older name) where `model.forward` takes it, else `{}`:
    the forward's logits are then (B, 1, V), those of the last position."""
    name = _keep_argument(type(_base(model)))
    return {name: 1} if name else {}


def cache_kwargs(model: nn.Module, cache) -> dict:
    """`{"cache": cache}` or `{"past_key_values": cache}`: what `model.forward` takes."""
    return {_cache_argument(type(_base(model))): cache}


def returned_cache(output):
    """The KV cache of a forward output (`output.cache`, or `past_key_values` before 5.x)."""
    found = output.get("cache") if hasattr(output, "get") else None
    return found if found is not None else output.past_key_values
