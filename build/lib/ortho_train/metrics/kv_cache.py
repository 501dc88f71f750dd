"""Handing a Hugging Face causal LM its KV cache, whatever the transformers version.

transformers 5.x renamed the forward argument and output field `past_key_values` to `cache`;
the old name still works there, with a deprecation warning on every call (so on every decoding
step). `cache_kwargs(model, cache)` names the argument the model's own `forward` declares, and
`returned_cache(output)` reads the field the output holds, so the metrics run warning-free on
old and new versions alike. A PEFT wrapper is looked through to the model it wraps.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """`{"cache": cache}` or `{"past_key_values": cache}`: what `model.forward` takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache}


def returned_cache(output):
    """The KV cache of a forward output (`output.cache`, or `past_key_values` before 5.x)."""
    found = output.get("cache") if hasattr(output, "get") else None
    return found if found is not None else output.past_key_values
