"""Post-training quantisation of a (possibly LoRA-adapted) model for the PTQ-gap check.

Formats (docs/methods.md §4): NF4 and FP4 with bitsandbytes (block of 64, fp32 absmax per block,
optional double quantisation of the absmax, a compute dtype), and INT4 RTN with the project's
group quantiser (`ortho_kernels.packing`). As in transformers' `BitsAndBytesConfig` loading, every
`nn.Linear` is quantised except `skip_modules` (default: the LM head); embeddings and norms
stay in full precision. GPT-2-style `Conv1D` projections are quantised too: in the copy each
becomes the equivalent `nn.Linear` first (`ortho_train.model_support.conv1d_as_linear`), so
blocks and groups run along the input dimension of the (d_out, d_in) weight, as for any linear.
Copies are built in float32 whatever the model's dtype (a bfloat16/float16 weight is exact in
float32); the matmul then runs in `compute_dtype`.

NF4/FP4 copies are built with real `bitsandbytes.nn.Linear4bit` modules (moving them to the
CPU triggers the quantisation), so the forward pass is the one a bitsandbytes deployment runs.
`fake_quantise` gives the same quantise→dequantise round trip on a bare tensor for the
bin-crossing and "did the quantised weight change" diagnostics.

Two LoRA deployments (quantisation-robust LoRA unlearning) are different models and are measured separately:
- "merged": merge the adapter into the fp weights, then quantise everything;
- "adapter": quantise the base linears and keep the adapter in full precision on top.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ortho_train.model_support import conv1d_as_linear, linear_weight

FORMATS = ("nf4", "fp4", "int4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KERNELS = ("portable", "native")
# bitsandbytes' AVX512-BF16 CPU kernel repacks weights in tiles of 32 output rows
# (`_convert_weight_packed_for_cpu(block_n=32)`) and asserts on any other width.
BNB_REPACK_BLOCK_N = 32
log = logging.getLogger(__name__)


@dataclass
class QuantSettings:
    """How a model is quantised.

    Args:
        blocksize: NF4/FP4 block size (bitsandbytes: 64).
        double_quant: quantise the per-block absmax too (bitsandbytes `compress_statistics`,
            transformers `bnb_4bit_use_double_quant`).
        compute_dtype: dtype of the dequantised matmul ('float32', 'bfloat16', 'float16').
        int4_group_size: INT4 RTN group size along the input dimension.
        skip_modules: names of linears kept in full precision (any dotted name component).
        cpu_kernel: which bitsandbytes CPU kernel the NF4/FP4 copies run. 'portable' (default):
            the generic path (dequantise to fp32, matmul in `compute_dtype`) on every CPU, so a
            PTQ gap measured on one machine holds on any other. 'native': on CPUs with
            AVX512-BF16 let bitsandbytes repack the weights for its fused kernel on the first
            inference call (bf16 activations and bf16 block absmax: what a deployment on such a
            CPU computes); layers it cannot repack (out_features not a multiple of 32) stay on
            the portable path, each logged with the reason. Elsewhere 'native' is 'portable'.
    """

    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: str = "float32"
    int4_group_size: int = 128
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    cpu_kernel: str = "portable"

    def __post_init__(self) -> None:
        if self.cpu_kernel not in CPU_KERNELS:
            raise ValueError(f"cpu_kernel must be one of {CPU_KERNELS}, got {self.cpu_kernel!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"bitsandbytes 4-bit blocksize must be a power of two in [64, 4096], got {self.blocksize}")

    def describe(self, fmt: str) -> dict:
        if fmt == "int4":
            return {"format": "int4", "method": "rtn", "group_size": self.int4_group_size, "symmetric": False,
                    "skip_modules": list(self.skip_modules)}
        return {"format": fmt, "library": "bitsandbytes", "blocksize": self.blocksize,
                "double_quant": self.double_quant, "compute_dtype": self.compute_dtype,
                "skip_modules": list(self.skip_modules), "cpu_kernel": self.cpu_kernel}


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def plain_name(name: str) -> str:
    """Module name in the unwrapped Hugging Face model (peft prefixes and `.base_layer` removed)."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer", "")


def quantisable_linears(model: nn.Module, skip_modules=("lm_head",)) -> dict[str, nn.Module]:
    """`nn.Linear` (and GPT-2 `Conv1D`) modules a 4-bit deployment quantises, by full name in `model`.

    Excludes the skipped names, peft adapter matrices (`lora_*`) and already quantised layers.
    `ortho_train.model_support.linear_weight` gives any of them as (d_out, d_in).
    """
    import bitsandbytes as bnb

    skip = set(skip_modules)
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if ((type(module) is nn.Linear or isinstance(module, Conv1D)) and not isinstance(module, bnb.nn.Linear4bit)
                and not skip.intersection(parts) and not any(p.startswith("lora_") for p in parts)):
            found[name] = module
    return found


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _int4_round_trip(w: Tensor, group_size: int) -> Tensor:
    from ortho_kernels.packing import group_dequantise, group_quantise

    codes, scales, zeros = group_quantise(w.float(), bits=4, group_size=group_size)
    return group_dequantise(codes, scales, zeros, group_size).to(w.dtype).view_as(w)


def fake_quantise(w: Tensor, fmt: str, settings: QuantSettings) -> Tensor:
    """Quantise then dequantise one weight tensor (float32 result, same shape)."""
    if fmt == "int4":
        return _int4_round_trip(w.detach().float(), settings.int4_group_size)
    if fmt not in ("nf4", "fp4"):
        raise ValueError(f"unknown quantisation format {fmt!r}: expected one of {FORMATS}")
    import bitsandbytes.functional as bnb_functional

    data = w.detach().float().contiguous().cpu()
    packed, state = bnb_functional.quantize_4bit(data, blocksize=settings.blocksize, quant_type=fmt,
                                                 compress_statistics=settings.double_quant)
    return bnb_functional.dequantize_4bit(packed, state).float().view(w.shape)  # (d_out, d_in)


def _to_linear4bit(linear: nn.Linear, fmt: str, settings: QuantSettings) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    dtype = DTYPES[settings.compute_dtype]
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=settings.double_quant, quant_type=fmt)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu().clone(), requires_grad=False,
                                     blocksize=settings.blocksize, compress_statistics=settings.double_quant,
                                     quant_type=fmt)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.support_avx512bf16_for_cpu = use_native_cpu_kernel(layer, settings)
    return layer.to(device)  # the move quantises the weight (bitsandbytes `Params4bit.to`)


def use_native_cpu_kernel(layer: nn.Module, settings: QuantSettings) -> bool:
    """Whether a `Linear4bit` may take bitsandbytes' AVX512-BF16 repacked CPU kernel.

    bitsandbytes sets `support_avx512bf16_for_cpu` from the CPU it runs on and repacks on the
    first inference call, so without this choice the same PTQ copy computes differently on
    different CPUs (and crashes on widths the repacking cannot tile).
    """
    if settings.cpu_kernel == "portable" or not getattr(layer, "support_avx512bf16_for_cpu", False):
        return False
    if layer.out_features % BNB_REPACK_BLOCK_N or layer.in_features % 2:
        log.info("bitsandbytes AVX512-BF16 kernel skipped for a %dx%d layer: it repacks tiles of %d output "
                 "rows and an even input width; this layer runs the portable CPU path",
                 layer.out_features, layer.in_features, BNB_REPACK_BLOCK_N)
        return False
    return True


def quantise_linears_(model: nn.Module, fmt: str, settings: QuantSettings) -> nn.Module:
    """Quantise every quantisable linear of `model` in place (Conv1D become nn.Linear); returns `model`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantisation format {fmt!r}: expected one of {FORMATS}")
    for name, layer in quantisable_linears(model, settings.skip_modules).items():
        linear = conv1d_as_linear(layer) if isinstance(layer, Conv1D) else layer
        if fmt == "int4":
            linear.weight.data = fake_quantise(linear.weight, "int4", settings).to(linear.weight.dtype)
            if linear is not layer:
                _set_module(model, name, linear)
        else:
            _set_module(model, name, _to_linear4bit(linear, fmt, settings))
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (unwrapped) copy of `model` with any LoRA adapter merged into its weights."""
    clone = copy.deepcopy(model)
    return clone.merge_and_unload() if is_peft_model(clone) else clone


@torch.no_grad()
def quantised_copy(model: nn.Module, fmt: str, settings: QuantSettings, deployment: str = "merged") -> nn.Module:
    """A quantised float32 copy of `model`, in eval mode; `model` itself is untouched.

    Args:
        deployment: for a peft model, 'merged' (merge the adapter, then quantise) or 'adapter'
            (quantise the base linears, keep the adapter in full precision); ignored otherwise.
    """
    if deployment not in ("merged", "adapter"):
        raise ValueError(f"deployment must be 'merged' or 'adapter', got {deployment!r}")
    clone = merged_copy(model) if deployment == "merged" else copy.deepcopy(model)
    return quantise_linears_(clone.float(), fmt, settings).eval()  # .float(): no-op for a float32 model


def _owned(weight: Tensor) -> Tensor:
    """A float32 CPU copy of `weight`, contiguous (a Conv1D's transposed view included)."""
    return weight.detach().float().cpu().clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def effective_linear_weights(model: nn.Module, skip_modules=("lm_head",)) -> dict[str, Tensor]:
    """Full-precision (d_out, d_in) weights of the quantisable linears as deployed (LoRA merged), by
    plain name, float32 on CPU."""
    plain = merged_copy(model) if is_peft_model(model) else model
    return {plain_name(name): _owned(linear_weight(linear))
            for name, linear in quantisable_linears(plain, skip_modules).items()}
