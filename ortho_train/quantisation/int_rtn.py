"""INT-k round to nearest (RTN): the group-wise asymmetric grid of `ortho_kernels.packing`.

Per group of `group_size` weights along the input dimension K of a row (the range widened to
contain 0; the fp16 scale rounded up, see `ortho_kernels.packing`):

    scale = (max(0, max w) − min(0, min w)) / (2^k − 1),   z = clamp(round(−min(0, min w)/scale), 0, 2^k − 1)
    q = clamp(round(w / scale) + z, 0, 2^k − 1),           ŵ = (q − z) · scale

Two registry entries share it:
- `rtn` (base quantiser): k ∈ kernels' SUPPORTED_BITS, the packed `ortho_kernels.QuantisedBase`
  the sieve and the `int<k>_rtn` table rows use; no Hessian.
- `int4_rtn` (deployment format, `IntRTNDeployment(4)`): the PTQ copies' INT4 RTN with
  `PTQConfig.group_size` (the name of the INT4 RTN base stream it equals); the bin width of a
  weight is its group's scale.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ortho_kernels import QuantisedBase
from ortho_kernels.packing import SUPPORTED_BITS, effective_bits, group_dequantise, group_quantise
from ortho_train.quantisation.format import WeightFormat

if TYPE_CHECKING:
    from ortho_train.quantisation.spec import PTQConfig, QuantConfig


class RTN(WeightFormat):
    """INT-k RTN base quantiser: q = clamp(round(w/s) + z, 0, 2^k − 1) per group (module docstring)."""

    name = "rtn"
    bits = SUPPORTED_BITS
    base_quantiser = True

    def quantise(self, w: Tensor, spec: "QuantConfig", hessian: Tensor | None = None) -> QuantisedBase:
        return QuantisedBase.from_dense(w.detach().float(), bits=spec.bits, group_size=spec.group_size)


class IntRTNDeployment(WeightFormat):
    """INT-k RTN as a deployment format (`int4_rtn` in the registry): every quantisable linear's
    weight becomes its group-wise round trip, groups of `PTQConfig.group_size`."""

    deployable = True

    def __init__(self, bits: int):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        self.name, self.bits = f"int{bits}_rtn", (bits,)

    @property
    def k(self) -> int:
        return self.bits[0]

    def fake_quantise(self, w: Tensor, settings: "PTQConfig") -> Tensor:
        w = w.detach().float()
        group_size = settings.group_size
        codes, scales, zeros = group_quantise(w, bits=self.k, group_size=group_size)
        return group_dequantise(codes, scales, zeros, group_size).view_as(w)  # (d_out, d_in)

    def bin_width(self, w: Tensor, settings: "PTQConfig") -> Tensor:
        return group_bin_width(w, settings.group_size, self.k)

    def bits_per_weight(self, settings: "PTQConfig") -> float:
        return effective_bits(self.k, settings.group_size)

    def describe(self, settings: "PTQConfig") -> dict:
        return {"format": self.name, "method": "rtn", "group_size": settings.group_size, "symmetric": False,
                "skip_modules": list(settings.skip_modules)}

    def label(self, settings: "PTQConfig") -> str:
        return f"{self.name} group {settings.group_size}"


def group_bin_width(w: Tensor, group_size: int = 128, bits: int = 4) -> Tensor:
    """Per-weight INT-k RTN bin width: the scale of its input-dim group, as `ortho_kernels.packing`
    computes it, ``(max(0, max w) − min(0, min w)) / (2^k − 1)`` (the range always holds 0).

    A ragged last group (d_in not a multiple of group_size) is its own, shorter group.
    """
    if w.ndim != 2:
        raise ValueError(f"group_bin_width expects a (d_out, d_in) weight, got {tuple(w.shape)}")
    d_out, d_in = w.shape
    pad = (-d_in) % group_size
    # zero padding cannot change a range that already contains 0
    padded = torch.nn.functional.pad(w.detach().float(), (0, pad))
    groups = padded.view(d_out, -1, group_size)  # (d_out, n_groups, group_size)
    scale = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / (2**bits - 1)  # (d_out, n_groups)
    return scale.repeat_interleave(group_size, dim=1)[:, :d_in]  # (d_out, d_in)
