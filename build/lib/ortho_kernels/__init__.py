"""Dual-stream kernels: packed INT-k base + sparse fp16 ortho stream, and the op running them.

    from ortho_kernels import QuantisedBase, OrthoStream, dual_stream_linear
    base = QuantisedBase.from_dense(w)                  # INT4, group 128, RTN
    ortho = OrthoStream.top_fraction(w - base.dequantise(), 0.01)
    y = dual_stream_linear(x, base, ortho, alpha=1.0)   # alpha=0: the kill switch

No Lightning here; Triton is imported lazily, only when its backend runs.
"""
from ortho_kernels.dual_stream import (
    DualStreamFunction,
    cpu_fast_path_unsupported,
    dual_stream_linear,
    dual_stream_linear_ref,
    effective_weight,
    prepare_cpu,
)
from ortho_kernels.packing import (
    effective_bits,
    group_dequantise,
    group_quantise,
    pack_bits,
    pack_int4,
    to_int4pack_cpu_layout,
    unpack_bits,
    unpack_int4,
)
from ortho_kernels.streams import CSR, ELL, OrthoStream, QuantisedBase

__all__ = [
    "CSR", "ELL", "DualStreamFunction", "OrthoStream", "QuantisedBase",
    "cpu_fast_path_unsupported", "dual_stream_linear", "dual_stream_linear_ref",
    "effective_bits", "effective_weight", "group_dequantise", "group_quantise", "pack_bits",
    "pack_int4", "prepare_cpu", "to_int4pack_cpu_layout", "unpack_bits", "unpack_int4",
]
