"""Every weight format of the project, behind one registry (no Lightning in this package).

    spec = QuantConfig(method="gptq", bits=4, group_size=128)     # a base stream (sieve, isolation)
    base = quantise_weight(w, spec, hessian)        # an ortho_kernels.QuantisedBase (packed codes)
    w_hat = base.dequantise()

    copy = quantised_copy(model, "nf4", PTQConfig())         # a deployed copy (PTQ gap, tables)

Who owns what:
- `format.py`: `WeightFormat`, the interface (base quantiser and/or deployment format).
- `registry.py`: `FORMATS`, name → format, one line each; lookups by role.
- `int_rtn.py`: INT-k round to nearest (`rtn` base quantiser, `int4_rtn` deployment, group bin widths).
- `gptq.py`: GPTQ (`gptq` base quantiser, outlier-aware sweep for the post-hoc sieve).
- `bnb4.py`: bitsandbytes NF4/FP4 (`nf4`, `fp4`: fake quantisation, `Linear4bit` modules with
  the CPU-kernel choice, code books, block bin widths, bits per weight).
- `sequential.py`: whole-model bases (`quantise_layers`), true-sequential GPTQ (each Hessian after the
  layers before it are quantised) or from the float model's Hessians.
- `spec.py`: `QuantConfig` (base stream settings), `quantise_weight`, `PTQConfig` (copies).
- `copies.py`: `quantised_copy` and the one rule for which linears a copy quantises (LM head
  included), `effective_linear_weights`, `fake_quantise` / `bin_width` by format name.
- `bins.py`: code-book rounding intervals and the bin-crossing counts.

INT-k storage (pack/unpack, dequantise, bits per weight) is `ortho_kernels.packing`'s: a base
built here runs in `ortho_kernels.dual_stream_linear` unchanged.
"""
from __future__ import annotations

from ortho_train.quantisation.bnb4 import (
    QUANT_TYPES,
    bnb_bits_per_weight,
    bnb_dequantise_4bit,
    bnb_fake_quantise,
    bnb_quantise_4bit,
)
from ortho_train.quantisation.copies import (
    bin_width,
    effective_linear_weights,
    exact_fallback_layers,
    fake_quantise,
    quantisable_linears,
    quantise_linears_,
    quantised_copy,
)
from ortho_train.quantisation.format import WeightFormat, base_from_codes
from ortho_train.quantisation.gptq import GPTQResult, gptq_quantise, run_gptq
from ortho_train.quantisation.registry import (
    FORMATS,
    RENAMED,
    base_quantiser,
    base_quantisers,
    canonical_format,
    deployment_format,
    deployment_formats,
    int_formats,
)
from ortho_train.quantisation.sequential import quantise_layers, quantise_true_sequential
from ortho_train.quantisation.spec import PTQConfig, QuantConfig, quantise_weight

__all__ = [
    "FORMATS", "GPTQResult", "RENAMED", "canonical_format", "int_formats", "QUANT_TYPES", "PTQConfig", "QuantConfig", "WeightFormat",
    "base_from_codes", "base_quantiser", "base_quantisers", "bin_width", "bnb_bits_per_weight",
    "bnb_dequantise_4bit", "bnb_fake_quantise", "bnb_quantise_4bit", "deployment_format",
    "deployment_formats", "effective_linear_weights", "exact_fallback_layers", "fake_quantise", "gptq_quantise",
    "quantisable_linears", "quantise_layers", "quantise_linears_", "quantise_true_sequential", "quantise_weight", "quantised_copy", "run_gptq",
]
