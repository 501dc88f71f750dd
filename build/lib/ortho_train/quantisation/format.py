"""What a weight format is: the interface every entry of the registry (`registry.FORMATS`) implements.

A format plays one or both of two roles:

- *base quantiser* (`base_quantiser = True`; `QuantConfig.method`): turns a weight (N, K) into a
  packed group-wise INT-k `ortho_kernels.QuantisedBase` — the base stream of the sieve, of isolation
  and of the tables' `int<k>_<method>` rows. It implements `quantise`; `needs_hessian` says
  whether it needs a calibration Hessian (GPTQ) and `outlier_aware` whether it can hold
  high-impact weights out of quantisation itself (`quantise_with_outliers`, GPTQ's
  error-compensated sweep; the post-hoc sieve otherwise selects them from the residual).
- *deployment format* (`deployable = True`; the PTQ gap's `formats`, the kill-switch table's
  references, the separation table, MANSU's floor grid): what a deployed model computes with.
  It implements `fake_quantise` (dequantise(quantise(W)) of one (d_out, d_in) weight) and
  `bin_width` (the rounding interval at each weight); `deployed_linear` gives the module a
  deployment runs (default: the linear holding the fake-quantised weight), `bits_per_weight`,
  `describe` and `label` what the JSON and the tables report.

Adding a format: one file with a `WeightFormat` subclass, one line in `registry.FORMATS`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ortho_kernels import QuantisedBase, pack_bits

if TYPE_CHECKING:  # annotations only: the settings import the registry, which imports the formats
    from ortho_train.quantisation.gptq import GPTQResult
    from ortho_train.quantisation.spec import PTQConfig, QuantConfig


class WeightFormat:
    """One weight format; subclasses override what their role needs (see the module docstring).

    Attributes:
        name: registry key (the spelling configs, JSON keys and table rows use).
        bits: code widths the format stores (NF4: (4,); INT-k RTN: kernels' SUPPORTED_BITS).
        needs_hessian: `quantise` needs a calibration Hessian of the layer.
        outlier_aware: `quantise_with_outliers` exists (the post-hoc sieve uses it).
        base_quantiser: `quantise` fills a `ortho_kernels.QuantisedBase` (usable as `QuantConfig.method`).
        deployable: `fake_quantise` / `bin_width` exist (usable as a PTQ / reference format).
        blockwise: quantises blocks of `PTQConfig.blocksize` consecutive weights of a row
            (a layer narrower than one block is refused at start-up).
    """

    name: str = ""
    bits: tuple[int, ...] = ()
    needs_hessian: bool = False
    outlier_aware: bool = False
    base_quantiser: bool = False
    deployable: bool = False
    blockwise: bool = False

    # ------------------------------------------------------------ base quantiser
    def quantise(self, w: Tensor, spec: "QuantConfig", hessian: Tensor | None = None) -> QuantisedBase:
        """The packed INT-k base stream of a weight (N, K) under `spec`."""
        raise NotImplementedError(f"{self.name} is not a base quantiser (no packed INT-k base stream)")

    def quantise_with_outliers(self, w: Tensor, hessian: Tensor, spec: "QuantConfig",
                               outlier_threshold) -> "GPTQResult":
        """Quantise, keeping weights whose impact exceeds `outlier_threshold` exact (unpacked codes)."""
        raise NotImplementedError(f"{self.name} cannot hold outliers out of quantisation")

    # --------------------------------------------------------- deployment format
    def fake_quantise(self, w: Tensor, settings: "PTQConfig") -> Tensor:
        """dequantise(quantise(w)) of one (d_out, d_in) weight: float32, same shape."""
        raise NotImplementedError(f"{self.name} is not a deployment format")

    def bin_width(self, w: Tensor, settings: "PTQConfig") -> Tensor:
        """Width of the rounding interval at every weight of `w` (float32, same shape)."""
        raise NotImplementedError(f"{self.name} is not a deployment format")

    def deployed_linear(self, linear: nn.Linear, settings: "PTQConfig") -> nn.Module:
        """The module a deployment runs for `linear` (a copy's own float32 `nn.Linear`).

        Default: `linear` itself, its weight replaced by the fake-quantised one.
        """
        linear.weight.data = self.fake_quantise(linear.weight, settings).to(linear.weight.dtype)
        return linear

    def bits_per_weight(self, settings: "PTQConfig") -> float:
        """Stored bits per quantised weight (codes plus per-block/group statistics)."""
        raise NotImplementedError(f"{self.name} does not report its bits per weight")

    def describe(self, settings: "PTQConfig") -> dict:
        """The settings of this format as recorded in `ptq_gap.json` / the metrics card."""
        return {"format": self.name, "skip_modules": list(settings.skip_modules)}

    def label(self, settings: "PTQConfig") -> str:
        """One line naming the format and its settings (the tables' `base` column)."""
        return self.name


def base_from_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bits: int, group_size: int) -> QuantisedBase:
    """Pack unpacked INT-k codes (N, K) into a `ortho_kernels.QuantisedBase`."""
    return QuantisedBase(pack_bits(codes, bits), scales, zeros, tuple(codes.shape), group_size, bits)
