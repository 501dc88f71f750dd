"""`TensorKeyedCache`: operands built from tensors, cached per tensor and freed with it.

The CPU path of `ortho_kernels.dual_stream` keeps its converted operands (torch-op layouts,
CSRs, dense prefill weights) here; `stamp_of` records the tensors an entry was built from.
"""
from __future__ import annotations

import weakref

import torch


class TensorKeyedCache:
    """Cache keyed on a tensor's identity, dropped when that tensor is freed.

    (weakref.WeakKeyDictionary cannot hold tensors: it compares keys with ==.) An entry
    also records a stamp of the other tensors it was built from (identity and in-place
    version), so a module may wrap its buffers in fresh QuantisedBase/OrthoStream objects
    on every call and still hit, while `load_state_dict` or in-place edits invalidate it.
    """

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def get(self, key: torch.Tensor, stamp: tuple, build):
        entry = self._entries.get(id(key))
        if entry is None or entry[0]() is not key or entry[1] != stamp:
            if entry is None or entry[0]() is not key:
                weakref.finalize(key, self._entries.pop, id(key), None)
            entry = (weakref.ref(key), stamp, build())
            self._entries[id(key)] = entry
        return entry[2]

    def clear(self) -> None:
        self._entries.clear()


def _version(t: torch.Tensor) -> int:
    # inference tensors keep no version counter (in-place edits there go unseen)
    return -1 if t.is_inference() else t._version


def stamp_of(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> tuple:
    """Identity and in-place version of two or three tensors: the stamp of an entry built from them."""
    try:  # runs on every call: kept flat
        return (id(a), a._version, id(b), b._version, id(c), c._version if c is not None else 0)
    except RuntimeError:
        return (id(a), _version(a), id(b), _version(b), id(c), _version(c) if c is not None else 0)
