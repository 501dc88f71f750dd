"""Tiny random causal LMs of several architectures, saved with the byte tokenizer (one per session).

Built from each architecture's transformers config (2 blocks, width 64: the PTQ tests' NF4
blocks of 64 fit every projection), so every mode can be run on the layouts users bring:
Llama, Qwen2 (grouped KV heads, q/k/v biases, tied embeddings), Mistral (grouped KV heads,
sliding window), Phi (biases everywhere, `dense`/`fc1`/`fc2` names, partial rotary,
LayerNorm) and GPT-2 (`Conv1D` projections, learnt positions).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PhiConfig, Qwen2Config

from ortho_train.tokenization import build_byte_tokenizer

ARCHITECTURES = ("llama", "qwen2", "mistral", "phi")  # nn.Linear projections: every mode
CONV1D_ARCHITECTURE = "gpt2"
# The projections every architecture's peft `all-linear` adapts (output layer excluded), per block.
PROJECTIONS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc", "c_proj"),  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
}
WIDTH, BLOCKS, HEADS, POSITIONS = 64, 2, 2, 128


def _config(arch: str):
    tokenizer = build_byte_tokenizer()
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    sizes = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=BLOCKS,
                 num_attention_heads=HEADS, max_position_embeddings=POSITIONS)
    configs = {
        "llama": lambda: LlamaConfig(**sizes, **ids, num_key_value_heads=HEADS, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**sizes, **ids, num_key_value_heads=1, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**sizes, **ids, num_key_value_heads=1, sliding_window=POSITIONS // 2,
                                         tie_word_embeddings=False),
        "phi": lambda: PhiConfig(**sizes, **ids, tie_word_embeddings=False),
        "gpt2": lambda: GPT2Config(n_embd=WIDTH, n_layer=BLOCKS, n_head=HEADS, n_positions=POSITIONS, **ids),
    }
    return configs[arch]()


def save_tiny_model(arch: str, out_dir: Path) -> Path:
    """A randomly initialised `arch` model (seed 0) and the byte tokenizer, saved to `out_dir`."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch))
    model.save_pretrained(out_dir)
    build_byte_tokenizer().save_pretrained(out_dir)
    return out_dir


_CACHE: dict[str, Path] = {}


def cached_tiny_model(arch: str, tmp_path_factory) -> Path:
    """One saved tiny `arch` model per test session (pass pytest's `tmp_path_factory`)."""
    if arch not in _CACHE:
        _CACHE[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"tiny_{arch}"))
    return _CACHE[arch]
