"""GPTQ checkpoint export: the α = 0 base stream in the format of AutoGPTQ / gptqmodel / transformers.

A Hugging Face model directory (`config.json` with `quantization_config`, `quantize_config.json`
for AutoGPTQ, `model.safetensors`, the tokenizer files). For every sieved linear `<name>`
(out N, in K, groups of g), codes q and zero-points z ∈ [0, 15], scales s:

    <name>.qweight  int32 (K/8, N):  bits [4j, 4j+4) of qweight[i, n] = q[n, 8i + j]    (j = 0..7)
    <name>.qzeros   int32 (G, N/8):  bits [4j, 4j+4) of qzeros[t, c]  = z'[n = 8c + j, group t]
    <name>.scales   fp16  (G, N):    scales[t, n] = s[n, t]
    <name>.g_idx    int32 (K,):      g_idx[k] = k // g   (no act-order permutation: desc_act false;
                                     G = ceil(K / g): a ragged last group is its own, as in the base)
    <name>.bias     fp16  (N,)       where the layer has one

    w[n, k] = (q[n, k] − z[n, g_idx[k]]) · s[n, g_idx[k]]

The stored zero z' depends on `checkpoint_format`:
- `"gptq"` (AutoGPTQ's v1, the default; read by AutoGPTQ, transformers + optimum, vLLM, …):
  z' = z − 1, and loaders add the 1 back ("zeros minus one", a historic AutoGPTQ quirk). A group
  with z = 0 cannot be stored (z' = −1 wraps to 15 in 4 bits): such a model is refused with a
  pointer to `gptq_v2`.
- `"gptq_v2"` (gptqmodel's): z' = z, every zero-point representable.

Exactness: codes, zero-points and the fp16 scales are the base stream's own, so the dequantised
weight equals `ortho_kernels.group_dequantise` of the base bit for bit when formed in float32
(max difference 0: the scales are stored fp16 already, nothing is re-rounded). A kernel that forms
(q − z) · s in fp16 rounds each product once: |error| ≤ 2⁻¹¹ · |w| (at most 2⁻¹¹ · 15 · s).

Only 4-bit bases with one group size for every sieved linear are exported, and every linear inside
the transformer blocks must be sieved (the GPTQ loaders replace all of them). Other tensors
(embeddings, norms, a dense head) are written as saved; a tied head is left to the embedding.
α = 1 is refused: merging the ortho stream leaves the INT4 grid (use gguf-q8_0 / gguf-f16).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ortho_train.artifacts import atomic_directory
from ortho_train.export.report import ExportReport
from ortho_train.export.source import SievedSource
from ortho_train.tokenization import TOKENIZER_FILES

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PACK = 8  # 4-bit values per int32
EXTRA_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja")


def pack_int32(values: Tensor) -> Tensor:
    """Pack 4-bit values (R, C) along dim 0: (R/8, C) int32, value j of a word in bits [4j, 4j+4)."""
    r, c = values.shape
    grouped = values.to(torch.int64).reshape(r // PACK, PACK, c)  # (R, C) → (R/8, 8, C)
    shifts = (4 * torch.arange(PACK, dtype=torch.int64)).view(1, PACK, 1)  # (1, 8, 1)
    words = ((grouped & 0xF) << shifts).sum(dim=1)  # (R/8, C), in [0, 2³²)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # two's complement


def gptq_tensors(base, checkpoint_format: str) -> dict[str, Tensor]:
    """qweight, qzeros, scales, g_idx of one base stream (module docstring)."""
    n, k = base.shape
    if base.bits != 4:
        raise ValueError(f"GPTQ export writes 4-bit bases; this one has {base.bits} bits")
    if n % PACK or k % PACK:
        raise ValueError(f"GPTQ packing needs out and in features divisible by {PACK}; got {tuple(base.shape)}")
    zeros = base.zeros.to(torch.int64)  # (N, G) integers in [0, 15]
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise ValueError("a group has zero-point 0, which the v1 'gptq' format cannot store (zeros minus one): "
                             "export with --checkpoint-format gptq_v2")
        zeros = zeros - 1
    return {
        "qweight": pack_int32(base.codes().T.contiguous()),  # codes (N, K) → (K, N) → (K/8, N)
        "qzeros": pack_int32(zeros).T.contiguous(),  # (N, G) packed along N → (N/8, G) → (G, N/8)
        "scales": base.scales.T.contiguous(),  # (N, G) → (G, N) fp16
        "g_idx": torch.arange(k, dtype=torch.int32) // base.group_size,
    }


def quantization_config(group_size: int, checkpoint_format: str) -> dict:
    """The `quantization_config` transformers / optimum / gptqmodel read (also AutoGPTQ's file)."""
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
            "checkpoint_format": checkpoint_format, "model_file_base_name": "model"}


def _check_source(source: SievedSource) -> int:
    """The one group size of the sieved linears; refuses what the GPTQ loaders cannot read."""
    sizes = {base.group_size for base in source.bases.values()}
    if len(sizes) != 1:
        raise ValueError(f"GPTQ export needs one group size for every sieved linear, got {sorted(sizes)}")
    dense = [k for k, t in source.tensors.items() if k.startswith("model.layers.") and t.dim() == 2]
    if dense:
        raise ValueError(f"GPTQ loaders quantise every linear of the blocks, but {dense[:3]} were not sieved")
    return sizes.pop()


def _copy_tokenizer(source: SievedSource, directory: Path) -> None:
    for name in (*TOKENIZER_FILES, *EXTRA_TOKENIZER_FILES):
        if (source.directory / name).is_file():
            shutil.copyfile(source.directory / name, directory / name)


def write_gptq(source: SievedSource, out: Path, checkpoint_format: str = "gptq") -> ExportReport:
    """Write the α = 0 model as a GPTQ checkpoint directory at `out` (atomically)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if source.alpha != 0:
        raise ValueError("a GPTQ checkpoint holds the α = 0 base stream only (α = 1: use gguf-q8_0 or gguf-f16)")
    group_size = _check_source(source)
    report = ExportReport(Path(out), f"gptq ({checkpoint_format})", source.alpha)
    state = {k: v.contiguous() for k, v in source.tensors.items() if not (source.tied and k == "lm_head.weight")}
    for name, base in source.bases.items():
        state |= {f"{name}.{key}": t for key, t in gptq_tensors(base, checkpoint_format).items()}
        if name in source.biases:
            state[f"{name}.bias"] = source.biases[name].to(torch.float16)
        report.add(name, "gptq int4", True, 0.0)
    config = dict(source.model_config) | {"quantization_config": quantization_config(group_size, checkpoint_format)}
    if not config.get("architectures"):  # from_config models record none; loaders want one
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    with atomic_directory(Path(out)) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "quantize_config.json").write_text(
            json.dumps(quantization_config(group_size, checkpoint_format), indent=2) + "\n", encoding="utf-8")
        _copy_tokenizer(source, tmp)
    return report


@dataclass(frozen=True)
class GPTQExporter:
    """The GPTQ checkpoint target (module docstring)."""

    alphas: tuple[float, ...] = (0.0,)

    def run(self, source: SievedSource, out: Path, format_name: str, checkpoint_format: str = "gptq",
            **_options) -> ExportReport:
        return write_gptq(source, out, checkpoint_format)
