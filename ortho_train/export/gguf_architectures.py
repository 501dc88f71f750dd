"""The model families the GGUF exporter writes, as llama.cpp's converter writes them (`convert_hf_to_gguf.py`).

    spec = GGUF_ARCHITECTURES.get(model_config["model_type"])   # "llama", "qwen2", "gemma3_text"
    spec.write_metadata(writer, model_config)                   # `<arch>.*` hyper-parameters
    spec.stored(key, tensor)                                    # Gemma: every `*norm.weight` + 1

Per family (`GGUFArchitecture`): the GGUF architecture, whether llama.cpp's RoPE for it is the
interleaved one (Llama: the converter permutes the rows of attn_q / attn_k per head; Qwen2 and
Gemma3 use the NeoX RoPE, rows as saved), the shift the converter adds to the norm weights, and
the hyper-parameters beyond the common ones (`<arch>.context_length`, `embedding_length`,
`block_count`, `feed_forward_length`, `attention.head_count(_kv)`,
`attention.layer_norm_rms_epsilon`, `rope.freq_base`, `rope.dimension_count`, `vocab_size`).

Gemma 3 (the converter's Gemma3Model; llama.cpp's `gemma3` graph):

- RMSNorm multiplies by (1 + weight) (Gemma3RMSNorm) and llama.cpp by the stored weight, so every
  `*norm.weight` (input, post-attention, pre/post-feed-forward, q/k norms, final) is stored as
  1 + weight, rounded once in float32 — the very factor the toolkit's model multiplies by;
- the embedding is stored unscaled: llama.cpp multiplies it by √hidden_size itself;
- `attention.key_length` / `value_length` = head_dim; `attention.sliding_window`; global layers'
  RoPE base in `rope.freq_base`, sliding layers' in `rope.freq_base_swa` (llama.cpp's default
  10000 otherwise); `attention.sliding_window_pattern` (one bool per layer, true = sliding) only
  where `layer_types` is not llama.cpp's default (every 6th layer global);
- llama.cpp scales queries by 1/√head_dim (1/√(hidden/heads) for the 62-layer 27B), applies
  tanh-GELU and no attention soft-capping: a config that says otherwise is refused by name, as is
  a RoPE scaling (the 4B-27B models' linear scaling of global layers is not exported yet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import torch
from torch import Tensor

from ortho_train.registry import Registry

GEMMA3_SWA_PERIOD = 6  # llama.cpp's default Gemma 3 layer pattern: layer i is global iff (i + 1) % 6 == 0
GEMMA3_27B_LAYERS = 62  # llama.cpp's LLM_TYPE_27B, whose query scale is 1/√(hidden/heads)


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_kind(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default")) or "default"


def rope_theta(config: dict, layer_type: str = "full_attention", default: float = 10000.0) -> float:
    """RoPE base of `layer_type`: transformers ≥ 5 `rope_parameters` (flat, or per layer type), else
    the older `rope_theta` / `rope_local_base_freq`; a RoPE scaling is refused (llama.cpp needs rope_freqs)."""
    params = config.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict):  # Gemma 3: one entry per layer type
        params = params[layer_type]
    scaling = config.get("rope_scaling") or {}
    for kind in (_rope_kind(params), _rope_kind(scaling)):
        if kind != "default":
            raise ValueError(f"model_config.rope_scaling: RoPE scaling {kind!r} is not exported yet "
                             "(llama.cpp needs rope_freqs / scaling keys for it)")
    legacy = config.get("rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta", default)
    return float(params.get("rope_theta", legacy))


def write_common(writer: gguf.GGUFWriter, config: dict) -> None:
    """The hyper-parameters every family shares (module docstring)."""
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config["vocab_size"])


def _write_llama_like(writer: gguf.GGUFWriter, config: dict) -> None:
    write_common(writer, config)
    writer.add_rope_freq_base(rope_theta(config))


def _check_gemma3(config: dict) -> None:
    """Refuse what llama.cpp's gemma3 graph would compute differently (module docstring)."""
    hd = head_dim(config)
    query_scale = config["hidden_size"] // config["num_attention_heads"] \
        if config["num_hidden_layers"] == GEMMA3_27B_LAYERS else hd
    rules = {
        "query_pre_attn_scalar": (config.get("query_pre_attn_scalar", hd), query_scale,
                                  "llama.cpp scales queries by 1/√head_dim"),
        "hidden_activation": (config.get("hidden_activation", "gelu_pytorch_tanh"), "gelu_pytorch_tanh",
                              "llama.cpp's Gemma 3 feed-forward is tanh-GELU"),
        "attn_logit_softcapping": (config.get("attn_logit_softcapping"), None,
                                   "llama.cpp's Gemma 3 has no attention soft-capping"),
    }
    for key, (value, wanted, why) in rules.items():
        if value != wanted:
            raise ValueError(f"model_config.{key}={value!r}: the Gemma 3 GGUF export needs {wanted!r} ({why})")


def gemma3_sliding_layers(config: dict) -> list[bool]:
    """Per layer, whether it attends within the sliding window (`layer_types`, else every 6th global)."""
    n = config["num_hidden_layers"]
    types = config.get("layer_types") or ["full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0
                                          else "sliding_attention" for i in range(n)]
    return [kind == "sliding_attention" for kind in types]


def _write_gemma3(writer: gguf.GGUFWriter, config: dict) -> None:
    """Gemma 3's hyper-parameters (module docstring)."""
    _check_gemma3(config)
    write_common(writer, config)
    if head_dim(config) == config["hidden_size"] // config["num_attention_heads"]:  # else write_common did
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_rope_freq_base(rope_theta(config, "full_attention", 1_000_000.0))
    sliding = gemma3_sliding_layers(config)
    if any(sliding):
        writer.add_sliding_window(config["sliding_window"])
        writer.add_rope_freq_base_swa(rope_theta(config, "sliding_attention", 10000.0))
        default = [(i + 1) % GEMMA3_SWA_PERIOD != 0 for i in range(len(sliding))]
        if sliding != default:
            writer.add_sliding_window_pattern(sliding)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


@dataclass(frozen=True)
class GGUFArchitecture:
    """One model family in llama.cpp's layout (module docstring).

    Attributes:
        arch: the GGUF architecture (`general.architecture` and the tensor-name map).
        permute_qk: rows of attn_q / attn_k permuted per head for llama.cpp's interleaved RoPE.
        norm_shift: added to every tensor whose name ends in `norm.weight` (Gemma: 1.0).
        write_metadata: writes `<arch>.*` from the Hugging Face config dict (refusing what it cannot).
    """

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    norm_shift: float
    write_metadata: Callable[[gguf.GGUFWriter, dict], None]

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def stored(self, key: str, tensor: Tensor) -> Tensor:
        """A 1-D float32 tensor as the converter stores it (`norm_shift` added to norm weights)."""
        if self.norm_shift and key.endswith("norm.weight"):
            return tensor + torch.tensor(self.norm_shift, dtype=tensor.dtype)  # rounded once, as the model's 1 + w
        return tensor


GGUF_ARCHITECTURES: Registry[GGUFArchitecture] = Registry("GGUF architecture", setting="model_config.model_type")
GGUF_ARCHITECTURES.add("llama", GGUFArchitecture(gguf.MODEL_ARCH.LLAMA, True, 0.0, _write_llama_like))
GGUF_ARCHITECTURES.add("qwen2", GGUFArchitecture(gguf.MODEL_ARCH.QWEN2, False, 0.0, _write_llama_like))
GGUF_ARCHITECTURES.add("gemma3_text", GGUFArchitecture(gguf.MODEL_ARCH.GEMMA3, False, 1.0, _write_gemma3))
