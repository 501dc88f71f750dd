"""The sieve on a whole model: offline streams per layer, then a runtime model of `OrthoLinear`.

    hessians = collect_hessians(model, public_batches)
    layers = sieve_model(model, "posthoc", SieveConfig(rho=0.01), hessians)
    dual = build_dual_stream_model(model, layers)         # a copy; HF `generate` works
    set_alpha(dual, 0.0)                                  # the kill switch

Works on any Hugging Face Llama-family model: the linears of the decoder blocks are
swapped (the LM head only with `spec.include_lm_head`; embeddings and norms stay).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ortho_kernels import OrthoStream, QuantisedBase
from ortho_train.models import linear_layers, set_submodule
from ortho_train.ortho_linear import OrthoLinear, ortho_layers
from ortho_train.quantisation import quantise_layers, quantise_true_sequential, quantise_weight
from ortho_train.sieve.core import (
    VARIANTS,
    SievedLayer,
    SieveConfig,
    sieve_delta,
    sieve_isolated,
    sieve_posthoc,
)


def _weight_of(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    key = f"{name}.weight"
    if key not in state:
        raise ValueError(f"the pre-fine-tuning state dict has no {key!r}: is it the same architecture?")
    return state[key]


def _need(table: dict | None, name: str, what: str):
    if table is None or name not in table:
        raise ValueError(f"no {what} for layer {name!r}")
    return table[name]


def _posthoc_true_sequential(model: nn.Module, layers: dict[str, nn.Module], spec: SieveConfig,
                             calibration, report: bool) -> dict[str, SievedLayer]:
    """The post-hoc sieve walked true-sequentially (`quantisation.sequential`): each layer sieved with
    the Hessian of inputs through the sieved layers before it, which hold their α = 1 weight
    dequant(base) + ortho (the model the outlier-aware sweep minimises the error of)."""
    if calibration is None:
        raise ValueError("spec.quant.true_sequential=True: the post-hoc sieve needs calibration batches "
                         "(sieve_model(..., calibration=...)), not Hessians of the float model")
    out: dict[str, SievedLayer] = {}

    def sieve(name: str, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out[name] = sieve_posthoc(w, h, spec, report)
        return out[name].base.dequantise() + out[name].ortho.to_dense()

    quantise_true_sequential(model, calibration, sieve, layers)
    return {name: out[name] for name in layers}


def sieve_model(model: nn.Module, variant: str, spec: SieveConfig,
                hessians: dict[str, torch.Tensor] | None = None,
                pre_state: dict[str, torch.Tensor] | None = None,
                supports: dict[str, torch.Tensor] | None = None,
                bases: dict[str, QuantisedBase] | None = None,
                report: bool = False, calibration=None) -> dict[str, SievedLayer]:
    """Sieve every (non-head) linear of `model`; returns the streams per layer name.

    posthoc: needs `hessians` (of the fine-tuned model), or with `spec.quant.true_sequential`
    `calibration` batches (`{"input_ids", "attention_mask"}` dicts, walked block by block).
    delta: `pre_state` (pre-fine-tuning state dict) and `hessians` (of the pre-fine-tuning model)
    or precomputed `bases` of it. isolated: `supports` (bool masks fixed before fine-tuning) and
    `bases`, or `pre_state` (+ `hessians` for GPTQ) to quantise the pre-fine-tuning weights here.
    True-sequential bases of the pre-fine-tuning model are `quantised_layers(pre_model, spec,
    calibration=...)`, passed as `bases`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if spec.quant.true_sequential and variant != "posthoc" and bases is None:
        raise ValueError(f"spec.quant.true_sequential=True: the {variant} sieve quantises the pre-fine-tuning "
                         "weights, which this model does not run; pass bases=quantised_layers(pre_model, spec, "
                         "calibration=...) built true-sequentially on the pre-fine-tuning model")
    if variant == "isolated" and supports is not None:  # exactly the layers trained in isolation
        layers = {name: model.get_submodule(name) for name in supports}
    else:
        layers = linear_layers(model, include_lm_head=spec.include_lm_head)
    if not layers:
        raise ValueError("the model has no nn.Linear layers to sieve")
    if variant in ("delta", "isolated") and pre_state is None and bases is None:
        raise ValueError(f"the {variant} sieve needs the pre-fine-tuning weights (pre_state) or "
                         f"their quantised bases")
    if variant == "posthoc" and spec.quant.true_sequential:
        return _posthoc_true_sequential(model, layers, spec, calibration, report)
    out: dict[str, SievedLayer] = {}
    for name, linear in layers.items():
        w = linear.weight.detach()
        h = hessians.get(name) if hessians is not None else None
        if variant == "posthoc":
            sieved = sieve_posthoc(w, _need(hessians, name, "calibration Hessian"), spec, report)
        else:
            base = bases.get(name) if bases is not None else None
            if base is None:
                base = quantise_weight(_weight_of(pre_state, name).float(), spec.quant, h)
            if variant == "delta":
                w_pre = _weight_of(pre_state, name) if pre_state is not None else base.dequantise()
                sieved = sieve_delta(w, w_pre, _need(hessians, name, "calibration Hessian"),
                                     spec, base, report)
            else:
                sieved = sieve_isolated(w, base, _need(supports, name, "support mask"), h, spec, report)
        out[name] = sieved
    return out


def quantised_layers(model: nn.Module, spec: SieveConfig,
                     hessians: dict[str, torch.Tensor] | None = None, calibration=None) -> dict[str, SievedLayer]:
    """The plain INT-k model as streams with empty ortho parts (ρ = 0): from `hessians`, or with
    `spec.quant.true_sequential` walked over `calibration` (`quantisation.quantise_layers`)."""
    modules = linear_layers(model, include_lm_head=spec.include_lm_head)
    bases = quantise_layers(model, modules, spec.quant, calibration if spec.quant.true_sequential else None,
                            hessians)
    return {name: SievedLayer(base, OrthoStream.empty(base.shape, base.device), {"density": 0.0, "nnz": 0})
            for name, base in bases.items()}


def build_dual_stream_model(model: nn.Module, layers: dict[str, SievedLayer], alpha: float = 1.0,
                            backend: str = "auto", inplace: bool = False) -> nn.Module:
    """A copy of `model` (or the model itself) whose sieved linears are `OrthoLinear`.

    backend "auto" runs the deployed op (CPU fast path / Triton); "reference" the dense
    dequantise-and-matmul on every call.
    """
    target = model if inplace else copy.deepcopy(model)
    for name, sieved in layers.items():
        old = target.get_submodule(name)
        bias = old.bias if isinstance(old, nn.Linear) else None
        set_submodule(target, name, OrthoLinear.from_streams(sieved.base, sieved.ortho, bias, alpha, backend))
    return target


def stream_stats(model: nn.Module) -> dict[str, float]:
    """Bits per weight and ortho density over the `OrthoLinear` layers of a model.

    bits_per_weight = stored bits (packed codes + fp16 scales/zeros + 48-bit COO entries)
    / weights represented; base_bits_per_weight the same without the ortho stream (what the
    base file alone, the α = 0 model, stores). Embeddings, norms and dense linears are not
    counted.
    """
    layers = ortho_layers(model)
    if not layers:
        raise ValueError("the model has no OrthoLinear layers")
    bits = base_bits = weights = nnz = 0
    for layer in layers.values():
        b, n = layer.stored_bits()
        b0, _ = layer.stored_bits(with_ortho=False)
        bits, base_bits, weights, nnz = bits + b, base_bits + b0, weights + n, nnz + layer.nnz
    return {"bits_per_weight": bits / weights, "base_bits_per_weight": base_bits / weights,
            "ortho_density": nnz / weights}
