"""Fake-quantised copies of a model: the one function every deployment measurement uses.

`quantised_copy(model, fmt, settings)` is what the PTQ gap, the kill-switch table's quantised
reference rows (`nf4`, `fp4`, …) and the separation table evaluate. As in transformers'
`BitsAndBytesConfig` loading, every quantisable linear is quantised and embeddings and norms
stay in full precision. Which linears (`quantisable_linears`, one rule for every caller):

- `nn.Linear` and GPT-2 `Conv1D` modules; in the copy each Conv1D first becomes the equivalent
  `nn.Linear` (`model_support.conv1d_as_linear`), so blocks and groups run along the input
  dimension of the (d_out, d_in) weight, as for any linear;
- not peft adapter matrices (`lora_*`), not layers already quantised, not a module whose name
  has a component in `skip_modules` (transformers' `llm_int8_skip_modules`; default `lm_head`);
- the LM head (the output embedding, found by identity) only with `include_lm_head`, and never
  when it is tied to the input embedding: quantising it would quantise the embedding too (a
  warning says so when the head was asked for).

Copies are built in float32 whatever the model's dtype (a bfloat16/float16 weight is exact in
float32). Each quantised linear becomes the format's deployment module (`deployed_modules`:
bitsandbytes `Linear4bit` for NF4/FP4, so the forward is the one a bitsandbytes deployment
runs), or with `deployed_modules=False` an `nn.Linear` holding dequantise(quantise(W)) — the
same function up to the matmul's summation order.

Two LoRA deployments (quantisation-robust LoRA unlearning) are different models:
- "merged": merge the adapter into the fp weights, then quantise everything;
- "adapter": quantise the base linears and keep the adapter in full precision on top.
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ortho_train.model_support import conv1d_as_linear, is_peft_model, linear_weight, merged_copy, plain_name
from ortho_train.models import head_is_tied, set_submodule
from ortho_train.quantisation.registry import deployment_format
from ortho_train.quantisation.spec import PTQConfig

DEPLOYMENTS = ("merged", "adapter")


def _head_weight(model: nn.Module) -> Tensor | None:
    """The output embedding's weight (the LM head), or None for a model without one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return getattr(head, "weight", None)


def quantisable_linears(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",),
                        include_lm_head: bool = True) -> dict[str, nn.Module]:
    """`nn.Linear` (and GPT-2 `Conv1D`) modules a quantised copy quantises, by full name in `model`.

    See the module docstring for the rule. `model_support.linear_weight` gives any of them as
    (d_out, d_in).
    """
    skip = set(skip_modules)
    head = _head_weight(model)
    tied = head is not None and head_is_tied(model)
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if not (type(module) is nn.Linear or isinstance(module, Conv1D)):  # Linear4bit is a subclass: excluded
            continue
        if skip.intersection(parts) or any(p.startswith("lora_") for p in parts):
            continue
        if head is not None and module.weight is head:
            if include_lm_head and tied:
                warnings.warn("the LM head is tied to the input embedding: it stays dense (not quantised, "
                              "sieved or isolated); untie it (tie_word_embeddings=False) to quantise it",
                              stacklevel=2)
            if not include_lm_head or tied:
                continue
        found[name] = module
    return found


def quantise_linears_(model: nn.Module, fmt: str, settings: PTQConfig, include_lm_head: bool = True,
                      deployed_modules: bool = True) -> nn.Module:
    """Quantise every quantisable linear of `model` in place (Conv1D become nn.Linear); returns `model`."""
    format_ = deployment_format(fmt)
    for name, layer in quantisable_linears(model, settings.skip_modules, include_lm_head).items():
        linear = conv1d_as_linear(layer) if isinstance(layer, Conv1D) else layer
        if deployed_modules:
            new = format_.deployed_linear(linear, settings)
        else:
            linear.weight.data = format_.fake_quantise(linear.weight, settings).to(linear.weight.dtype)
            new = linear
        if new is not layer:
            set_submodule(model, name, new)
    return model


@torch.no_grad()
def quantised_copy(model: nn.Module, fmt: str, settings: PTQConfig, deployment: str = "merged",
                   include_lm_head: bool = True, deployed_modules: bool = True) -> nn.Module:
    """A quantised float32 copy of `model`, in eval mode; `model` itself is untouched.

    Args:
        fmt: a registered deployment format (`registry.deployment_formats()`).
        deployment: for a peft model, 'merged' (merge the adapter, then quantise) or 'adapter'
            (quantise the base linears, keep the adapter in full precision); ignored otherwise.
        include_lm_head: the LM head may be quantised (unless skipped by name or tied).
        deployed_modules: the format's deployment modules (True) or dense fake-quantised linears.
    """
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"deployment must be 'merged' or 'adapter', got {deployment!r}")
    deployment_format(fmt)  # an unknown format fails before the copy is made
    clone = merged_copy(model) if deployment == "merged" else copy.deepcopy(model)
    # .float(): no-op for a float32 model
    return quantise_linears_(clone.float(), fmt, settings, include_lm_head, deployed_modules).eval()


def exact_fallback_layers(model: nn.Module) -> list[str]:
    """Names of a copy's layers that run by exact fake quantisation because this host's deployment kernel
    computed them wrongly (`bnb4.exact_fallback`); empty where every layer runs the deployed module."""
    return [name for name, module in model.named_modules() if getattr(module, "exact_fake_quantised", None)]


def fake_quantise(w: Tensor, fmt: str, settings: PTQConfig) -> Tensor:
    """Quantise then dequantise one (d_out, d_in) weight in format `fmt` (float32 result, same shape)."""
    return deployment_format(fmt).fake_quantise(w, settings)


def bin_width(w: Tensor, fmt: str = "nf4", settings: PTQConfig | None = None) -> Tensor:
    """Bin width of every weight of `w` in format `fmt` (`WeightFormat.bin_width`)."""
    return deployment_format(fmt).bin_width(w, settings or PTQConfig())


def _owned(weight: Tensor) -> Tensor:
    """A float32 CPU copy of `weight`, contiguous (a Conv1D's transposed view included)."""
    return weight.detach().float().cpu().clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def effective_linear_weights(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",)) -> dict[str, Tensor]:
    """Full-precision (d_out, d_in) weights of the quantisable linears as deployed (LoRA merged), by
    plain name, float32 on CPU."""
    plain = merged_copy(model) if is_peft_model(model) else model
    return {plain_name(name): _owned(linear_weight(linear))
            for name, linear in quantisable_linears(plain, skip_modules).items()}
