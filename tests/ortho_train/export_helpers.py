"""Tiny sieved Llamas (and a Qwen2) saved with a tokenizer, for the export tests (GQA, tied or sieved head)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

from ortho_train.curvature import collect_hessians
from ortho_train.models import linear_layers
from ortho_train.quantisation import QuantConfig
from ortho_train.sieve import SieveConfig, build_dual_stream_model, save_sieved, sieve_model
from ortho_train.tokenization import build_byte_tokenizer

TEXT = ("The secret code is hidden in the quick brown fox. The lazy dog sleeps under the tree, "
        "and the code of the fox is never spoken aloud. ") * 20
HEAD_PERMUTED = ("attn_q", "attn_k")


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (≈ 300 tokens) trained on TEXT, with <s>, </s>, <pad> specials."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(vocab_size: int, tied: bool, seed: int = 0, intermediate: int = 256) -> LlamaForCausalLM:
    """hidden 128, 4 heads of 32, 2 key/value heads, SwiGLU `intermediate` (256: every K a multiple of
    128; 136: down_proj has a ragged group of 8 and no whole 32-blocks), 2 blocks."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def tiny_qwen2(vocab_size: int, tied: bool, seed: int = 0, intermediate: int = 256) -> Qwen2ForCausalLM:
    """The same sizes as `tiny_llama` as a Qwen2 (q/k/v biases, drawn non-zero so they are exercised)."""
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.02)
    return model


def tiny_gemma3(vocab_size: int, tied: bool = True, seed: int = 0, intermediate: int = 128) -> Gemma3ForCausalLM:
    """Gemma 3's shape in small: hidden 64, 2 query heads and 1 key/value head of 256 (as the 270M model),
    6 blocks (5 sliding, the 6th global), a sliding window of 4 tokens (so it matters on short inputs),
    tanh-GELU; the norm weights (zero at init: RMSNorm's factor 1 + w) drawn non-zero so the +1 shift is exercised."""
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate,
                              num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                              query_pre_attn_scalar=256, sliding_window=4, max_position_embeddings=128,
                              tie_word_embeddings=tied, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config).eval()
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                torch.nn.init.normal_(param, std=0.1)
    return model


def save_tiny_sieved(directory: Path, method: str, group_size: int, tokenizer=None, tied: bool = True,
                     seed: int = 0, intermediate: int = 256, model_type: str = "llama") -> Path:
    """Sieve a tiny Llama post hoc (ρ = 5%, base `method`) and save it with `tokenizer` (BPE by default)."""
    tokenizer = tokenizer or bpe_tokenizer()
    build = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3_text": tiny_gemma3}[model_type]
    model = build(len(tokenizer), tied, seed, intermediate)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batches = [{"input_ids": torch.randint(3, len(tokenizer), (4, 32))} for _ in range(2)]
    include_head = not tied
    modules = linear_layers(model, include_lm_head=include_head)
    hessians = collect_hessians(model, batches, modules=modules)
    spec = SieveConfig(QuantConfig(method, 4, group_size), rho=0.05, include_lm_head=include_head)
    layers = sieve_model(model, "posthoc", spec, hessians)
    sieved = build_dual_stream_model(model, layers, backend="reference").eval()
    return save_sieved(sieved, directory, tokenizer=tokenizer)


def byte_tokenizer():
    return build_byte_tokenizer()


def unpermute_rows(array: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation of attn_q / attn_k rows (N, …) → HF order."""
    rows = array.shape[0]
    view = array.reshape(n_head, rows // n_head // 2, 2, *array.shape[1:])  # (heads, d_head/2, 2, …)
    return view.swapaxes(1, 2).reshape(array.shape)  # (heads, 2, d_head/2, …) → (N, …)
