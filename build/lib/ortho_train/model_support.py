"""What a mode needs of a Hugging Face model's layers and dtype, checked at start-up.

ortho-train sieves, isolates, projects (OGD/K-FAC), attributes and quantises `nn.Linear`
layers, whose weight is (d_out, d_in). GPT-2-style models use
`transformers.pytorch_utils.Conv1D` instead: the same affine map y = x W + b with the weight
stored transposed, (d_in, d_out). Per mode:

- PTQ copies (`ortho_train.quantisation.copies`) support it: each Conv1D of the *copy* becomes the
  equivalent `nn.Linear` (`conv1d_as_linear`, weight transposed) before it is quantised, so NF4,
  FP4 and INT4 see the (d_out, d_in) layout a deployment quantises; the model itself, and what
  `save_pretrained` writes, keep their Conv1D layers. LoRA (peft adapts Conv1D) and full
  unlearning therefore run on GPT-2 with their PTQ gap.
- Everything that selects the linears of the model itself (the sieve and its table, isolation,
  OGD/K-FAC, DP on the support, the separation split, MANSU's row masks) refuses such a model
  by name (`require_linear_only`): skipping the Conv1D layers silently would leave every
  projection of a GPT-2 block outside the base/ortho split.

dtype: isolation and DP-SGD on the support hold the weights off S at exact dequantised INT4
values and compare them bit for bit, OGD keeps W = W_pub + ΔW_priv as exact parts, the
displacement tracker splits every AdamW step exactly, and MANSU's bin floor is checked on the
stored weights; they need float32 weights (`require_float32`). Tables and PTQ copies cast their copies to float32
instead, and every metric computes its log-probabilities in float32. float16 weights that AdamW
trains directly (dense SFT, full unlearning) are refused (`refuse_float16_training`): without
loss scaling AdamW's ε = 1e-8 is 0 in float16, a weight whose gradient is 0 gets 0/0, and the
first step is NaN (measured on a tiny Phi); LoRA trains float32 adapters on a float16 base.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SHOWN = 4  # Conv1D names quoted in an error (the rest are counted)


class UnsupportedLayerError(ValueError):
    """The model has layers a mode cannot handle (raised at start-up, naming them)."""


def conv1d_modules(model: nn.Module) -> dict[str, Conv1D]:
    """GPT-2-style `Conv1D` modules of `model`, by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Conv1D)}


def require_linear_only(model: nn.Module, setting: str) -> None:
    """Raise `UnsupportedLayerError` when `model` has Conv1D layers that `setting` would skip."""
    found = list(conv1d_modules(model))
    if not found:
        return
    shown = ", ".join(found[:SHOWN]) + (f" and {len(found) - SHOWN} more" if len(found) > SHOWN else "")
    raise UnsupportedLayerError(
        f"{setting}: the model has {len(found)} GPT-2-style Conv1D projection(s) ({shown}) that the "
        "sieve, isolation, OGD/K-FAC, DP on the support and MANSU do not handle (they select nn.Linear "
        "layers only, and would leave these out of the base/ortho split). Use a model with nn.Linear "
        "projections (Llama, Qwen2, Mistral, Phi, ...), or for GPT-2 dense canary SFT, LoRA or full "
        "unlearning with the PTQ gap, which handle Conv1D.")


def require_float32(model: nn.Module, setting: str) -> None:
    """Raise `ValueError` when `model` holds floating-point parameters other than float32."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                     if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:
        raise ValueError(f"{setting} needs float32 weights (it keeps exact weight values: dequantised INT4 "
                         f"bases, public/private splits, bin floors), but the model has {', '.join(dtypes)} "
                         "parameters: "
                         "set model.dtype: float32 (or train with LoRA unlearning / dense SFT, which take "
                         "bfloat16 and float16)")


def refuse_float16_training(dtype: torch.dtype, setting: str) -> None:
    """Raise `ValueError` when float16 weights would be trained by AdamW (see the module docstring)."""
    if dtype == torch.float16:
        raise ValueError(f"{setting}: model.dtype=float16 weights trained by AdamW turn NaN at the first step "
                         "(no loss scaling; AdamW's eps 1e-8 is 0 in float16): use model.dtype: bfloat16, or "
                         "float32 with trainer.precision: 16-mixed; float16 suits LoRA unlearning, whose "
                         "adapters stay float32")


@torch.no_grad()
def conv1d_as_linear(layer: Conv1D) -> nn.Linear:
    """The `nn.Linear` computing what `layer` computes: weight (d_in, d_out) → (d_out, d_in)."""
    d_in, d_out = layer.weight.shape
    linear = nn.Linear(d_in, d_out, bias=layer.bias is not None, device=layer.weight.device,
                       dtype=layer.weight.dtype)
    linear.weight.copy_(layer.weight.T)  # (d_out, d_in)
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear.requires_grad_(layer.weight.requires_grad)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` as (d_out, d_in) (a transposed view for Conv1D)."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def is_peft_model(model: nn.Module) -> bool:
    """A peft-wrapped model (an adapter that `merge_and_unload` can fold into the weights)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def plain_name(name: str) -> str:
    """Module name in the unwrapped Hugging Face model (peft prefixes and `.base_layer` removed)."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer", "")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (unwrapped) copy of `model` with any LoRA adapter merged into its weights."""
    clone = copy.deepcopy(model)
    return clone.merge_and_unload() if is_peft_model(clone) else clone
