"""`OrthoLinear`: a linear layer stored as a packed INT-k base stream plus a sparse ortho stream.

    y = x · dequant(W_base)ᵀ + α · x · W_orthoᵀ + b            (docs/methods.md §5, §6)

Buffers (the gpt-fast pattern: their shapes are the packed shapes, so a module built from a
`StreamLayout` takes `load_state_dict(..., assign=True)` as is):
    qweight        uint8 (N, ceil(K·bits/8))   packed codes (`ortho_kernels.pack_bits`)
    scales, zeros  fp16  (N, G)                G = ceil(K / group_size)
    ortho_indices  int32 (nnz,)                sorted row-major flat positions i·K + j
    ortho_values   fp16  (nnz,)
    bias           as the source layer (or absent)
The base buffers and the ortho buffers are separate tensors: `split_state_dict` splits a
model's state dict along that line, and a module built with nnz = 0 is the complete α = 0
model.

`alpha` is a plain Python float per layer (`set_alpha` sets a whole model). α = 0 is decided
on the host: the ortho buffers are then not read at all (not even wrapped), so the output is
bit for bit the base-only output whatever they hold, NaN included.

`backend` is passed to `ortho_kernels.dual_stream_linear`. The default "auto" is the deployed op:
the Triton kernel on CUDA; on CPU the path `ortho_kernels.dual_stream.cpu_path` picks by the
number M of rows of x: M ≤ 8 (decoding) ortho-train's own fused INT4 + sparse GEMV
(`ortho_kernels.cpu_gemv`), 9 ≤ M ≤ 32 torch's INT4 op (`_weight_int4pack_mm_for_cpu`, bf16
activations) plus a CSR product for the ortho stream, M ≥ 33 (prefill, evaluation batches)
an fp32 matmul with dense dequant(W_base) (+ α·W_ortho): by default rebuilt per call in blocks
of rows through a few-MiB scratch buffer (`ortho_kernels.blocked_prefill`: no per-layer copy,
within the reference's error bound); with `weight_cache=True` (`set_weight_cache`) built once
and kept, 4 bytes per weight (8 at α ≠ 0), bit for bit the reference.
Where the GEMV cannot be built, small M take torch's op too; a base that op cannot take
(bits ≠ 4, a group size it lacks) runs the reference. "reference" dequantises to fp32 and
runs one matmul on every call (exact, slow), kept for tests. Whatever the backend, α = 0 and
the base-only model run the same path, so α = 0 equals the quantised public model of the same
backend bit for bit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ortho_kernels import OrthoStream, QuantisedBase, dual_stream_linear, effective_weight
from ortho_kernels.packing import packed_width
from ortho_train.models import set_submodule

BASE_KEYS = ("qweight", "scales", "zeros", "bias")
ORTHO_KEYS = ("ortho_indices", "ortho_values")


@dataclass
class StreamLayout:
    """Shapes a layer's buffers need: enough to build an empty `OrthoLinear` to load into."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    nnz: int
    bias: bool

    def to_dict(self) -> dict:
        return asdict(self)


class OrthoLinear(nn.Module):
    """Dual-stream linear layer; see the module docstring. Streams are frozen buffers."""

    def __init__(self, layout: StreamLayout, alpha: float = 1.0, backend: str = "auto",
                 device=None, weight_cache: bool = False):
        super().__init__()
        n, k = layout.out_features, layout.in_features
        self.in_features, self.out_features = k, n
        self.bits, self.group_size = layout.bits, layout.group_size
        groups = -(-k // layout.group_size)
        self.register_buffer("qweight", torch.zeros(n, packed_width(k, layout.bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(n, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(n, groups, dtype=torch.float16, device=device))
        self.register_buffer("ortho_indices", torch.zeros(layout.nnz, dtype=torch.int32, device=device))
        self.register_buffer("ortho_values", torch.zeros(layout.nnz, dtype=torch.float16, device=device))
        if layout.bias:
            self.register_buffer("bias", torch.zeros(n, device=device))
        else:
            self.bias = None
        self.alpha = float(alpha)
        self.backend = backend
        self.weight_cache = bool(weight_cache)

    @classmethod
    def from_streams(cls, base: QuantisedBase, ortho: OrthoStream | None,
                     bias: torch.Tensor | None = None, alpha: float = 1.0,
                     backend: str = "auto") -> "OrthoLinear":
        n, k = base.shape
        nnz = 0 if ortho is None else ortho.nnz
        layout = StreamLayout(k, n, base.bits, base.group_size, nnz, bias is not None)
        module = cls(layout, alpha, backend, device=base.device)
        state = {"qweight": base.qweight, "scales": base.scales, "zeros": base.zeros}
        if ortho is not None:
            if ortho.shape != base.shape:
                raise ValueError(f"ortho stream {ortho.shape} does not match base {base.shape}")
            state |= {"ortho_indices": ortho.indices, "ortho_values": ortho.values}
        if bias is not None:
            state["bias"] = bias.detach().float()
        module.load_state_dict(state, strict=False, assign=True)
        return module

    # ------------------------------------------------------------------ streams
    @property
    def layout(self) -> StreamLayout:
        return StreamLayout(self.in_features, self.out_features, self.bits, self.group_size,
                            self.nnz, self.bias is not None)

    @property
    def nnz(self) -> int:
        return self.ortho_indices.numel()

    def base(self) -> QuantisedBase:
        return QuantisedBase(self.qweight, self.scales, self.zeros,
                             (self.out_features, self.in_features), self.group_size, self.bits)

    def ortho(self, check: bool = False) -> OrthoStream:
        return OrthoStream(self.ortho_indices, self.ortho_values,
                           (self.out_features, self.in_features), check=check)

    def effective_weight(self, alpha: float | None = None) -> torch.Tensor:
        """Dense fp32 dequant(W_base) + α·W_ortho (N, K) (`ortho_kernels.effective_weight`)."""
        alpha = self.alpha if alpha is None else float(alpha)
        ortho = self.ortho() if (alpha != 0 and self.nnz) else None  # α=0: never touched
        return effective_weight(self.base(), ortho, alpha)

    def stored_bits(self, with_ortho: bool = True) -> tuple[int, int]:
        """(bits stored, weights represented): packed codes + fp16 scales/zeros (+ COO entries)."""
        bits = self.base().effective_bits(self.ortho() if (self.nnz and with_ortho) else None)
        return round(bits * self.in_features * self.out_features), self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ortho = self.ortho() if (self.alpha != 0 and self.nnz) else None  # α=0: never touched
        return dual_stream_linear(x, self.base(), ortho, self.alpha, self.bias, self.backend,
                                  weight_cache=self.weight_cache)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, nnz={self.nnz}, "
                f"alpha={self.alpha}, backend={self.backend!r}, weight_cache={self.weight_cache}")


# ---------------------------------------------------------------------- model level
def ortho_layers(model: nn.Module) -> dict[str, OrthoLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, OrthoLinear)}


def set_alpha(model: nn.Module, alpha: float) -> int:
    """Set α on every `OrthoLinear` of `model`; returns how many layers were set."""
    layers = ortho_layers(model)
    if not layers:
        raise ValueError("the model has no OrthoLinear layers (was it sieved?)")
    for layer in layers.values():
        layer.alpha = float(alpha)
    return len(layers)


def set_backend(model: nn.Module, backend: str) -> None:
    """Set the `dual_stream_linear` backend of every `OrthoLinear` ("auto", "reference", …)."""
    for layer in ortho_layers(model).values():
        layer.backend = backend


def set_weight_cache(model: nn.Module, enabled: bool) -> int:
    """Keep (True) or rebuild per call (False, the default) the dense fp32 prefill weight of
    every `OrthoLinear`; returns how many layers were set. Turning it off frees nothing already
    cached: `ortho_kernels.dual_stream.clear_cpu_caches()` does."""
    layers = ortho_layers(model)
    for layer in layers.values():
        layer.weight_cache = bool(enabled)
    return len(layers)


def swap_in_ortho_layers(model: nn.Module, layouts: dict[str, StreamLayout], alpha: float = 1.0,
                         backend: str = "auto") -> nn.Module:
    """Replace the named `nn.Linear` layers by empty `OrthoLinear` of the given layouts (in place).

    The result takes a sieved state dict with `load_state_dict(sd, assign=True)`.
    """
    for name, layout in layouts.items():
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, OrthoLinear)):
            raise ValueError(f"{name} is a {type(old).__name__}, not a linear layer")
        if (old.in_features, old.out_features) != (layout.in_features, layout.out_features):
            raise ValueError(f"{name}: layout {layout.in_features}→{layout.out_features} does not "
                             f"match the layer {old.in_features}→{old.out_features}")
        device = next(iter(old.buffers() if isinstance(old, OrthoLinear) else old.parameters())).device
        set_submodule(model, name, OrthoLinear(layout, alpha, backend, device=device))
    return model


def split_state_dict(state: dict[str, torch.Tensor], layer_names) -> tuple[dict, dict]:
    """(base part, ortho part) of a sieved model's state dict: ortho = the ortho_* buffers."""
    prefixes = tuple(f"{name}." for name in layer_names)
    ortho = {k: v for k, v in state.items()
             if k.startswith(prefixes) and k.rsplit(".", 1)[1] in ORTHO_KEYS}
    base = {k: v for k, v in state.items() if k not in ortho}
    return base, ortho
