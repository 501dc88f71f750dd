"""Forward pre-hooks on named layers for the length of a `with` block.

`LayerInputHooks` is what the GPTQ Hessian collector (`ortho_train.curvature`, H = 2/N Σ x xᵀ)
and the DSM activation statistics (`ortho_train.privacy.dsm`, σ(A_j) of the paper's §4.4)
share: a pre-hook on every listed layer that hands the layer's detached input x (..., d_in)
and its name to `observe`, registered on `__enter__` and removed on `__exit__` (also when the
block raises), plus the `token_mask` (B, T) the caller sets per batch for pads to be masked.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn


class LayerInputHooks:
    """Context manager: `observe(name, x)` on each forward of a layer of `modules` inside `with`."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = modules
        self.token_mask: torch.Tensor | None = None  # (B, T): 1/True where a token counts
        self._handles: list = []

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Called with the detached input x (..., d_in) of layer `name`; subclasses accumulate."""
        raise NotImplementedError

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            self.observe(name, args[0].detach())
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
