"""Tiny GGUF files written with the `gguf` package, in the layout llama.cpp's converter writes a
Llama: a SentencePiece-style vocabulary (3 specials, 256 byte tokens, a few pieces with scores) and
float32 tensors under GGUF names (`token_embd`, `blk.N.attn_q`, …, `output` when the head is untied)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "▁the", "▁a", "th", "he", "▁code"]


def write_tiny_llama_gguf(path: Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                          ffn: int = 64, tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the file; returns its tensors by GGUF name (float32, numpy row-major shapes)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * 259 + [-1.0 - i for i in range(len(TOKENS) - 259)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(TOKENS) - 259))  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    kv_width = kv_heads * (hidden // heads)
    shapes = {"token_embd.weight": (len(TOKENS), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                   f"blk.{i}.attn_k.weight": (kv_width, hidden), f"blk.{i}.attn_v.weight": (kv_width, hidden),
                   f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    if not tied:
        shapes["output.weight"] = (len(TOKENS), hidden)
    tensors = {name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.05 * rng.standard_normal(shape))
               .astype(np.float32) for name, shape in shapes.items()}
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
