"""Fast CPU decoding of a sieved model: a `generate`-like loop whose per-token step is one
`torch.compile`d graph over a preallocated KV cache (`ortho_train.sieve.decode_step`).

    model = load_sieved(directory)                      # α as saved (set_alpha before this)
    decoder = FastDecoder(model, FastDecodeConfig(max_len=256))
    ids = decoder.generate(prompt_ids, max_new_tokens=64)                  # greedy
    ids = decoder.generate(prompt_ids, 64, do_sample=True, temperature=0.8)

Hugging Face `generate` dispatches a few hundred torch operators per token from Python, each
through the dual-stream op's own Python dispatch; here the step's norms, RoPE, attention and
residuals are fused by inductor and each projection is one call of the registered GEMV op
(`torch.ops.ortho_kernels.int4_gemv`). The prompt runs through the Hugging Face model itself
(its prefill path, `ortho_kernels.blocked_prefill` for long prompts), and its keys and values
are copied into the static cache. With `activations="int16"` (the default) every projection
is the very GEMV `generate` runs, so the tokens are `generate`'s; "int8" rounds the
activations to int8 per 64 elements as llama.cpp's Q8 blocks (faster, within the error bound
`ortho_kernels.error_bounds` "gemv_int8", not bit for bit). α and the ortho stream are read
when the decoder is built: after `set_alpha`, build a new one. Batch size 1 only.

Sampling as `generate(do_sample=True, temperature=T, top_k=k, top_p=1.0)`: logits / T, the
k largest kept (0: all), softmax, one `torch.multinomial` draw from the global generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ortho_kernels import cpu_gemv
from ortho_train.settings import check_choices, check_settings
from ortho_train.sieve.decode_step import DecodeStep

Activations = Literal["int16", "int8"]
Int8Dot = Literal["avx2", "vnni"]


@dataclass
class FastDecodeConfig:
    """Settings of `FastDecoder`.

    Args:
        max_len: prompt plus generated tokens the static KV cache holds.
        activations: the GEMV's rounding of X: "int16" (as `generate`) or "int8" (Q8 blocks).
        compile: run the step through `torch.compile` (inductor); False runs it eagerly.
        int8_dot: the instructions of the int8 dot: "avx2" (vpmaddubsw, the default: on the
            2-core Xeon of docs/results.md the VNNI loop measured 1.6x slower per GEMV) or
            "vnni" (AVX-512 VNNI vpdpbusd, where the CPU has it); both give the same bits.
    """

    max_len: int = 512
    activations: Activations = "int16"
    compile: bool = True
    int8_dot: Int8Dot = "avx2"

    def __post_init__(self) -> None:
        check_choices("fast_decode", activations=(self.activations, Activations),
                      int8_dot=(self.int8_dot, Int8Dot))
        check_settings("fast_decode", [("max_len", self.max_len, self.max_len >= 2, "must be ≥ 2"),
                                       ("compile", self.compile, isinstance(self.compile, bool),
                                        "must be true or false")])


class FastDecoder:
    """Prefill with the Hugging Face model, then one compiled step per new token."""

    def __init__(self, model: nn.Module, config: FastDecodeConfig | None = None):
        self.config = config or FastDecodeConfig()
        reason = cpu_gemv.library()
        if isinstance(reason, str):
            raise RuntimeError(f"fast decoding needs the CPU GEMV: {reason}")
        if not hasattr(model, "model") or not hasattr(model.model, "layers"):
            raise ValueError(f"fast decoding takes a Hugging Face Llama-family causal LM, got {type(model).__name__}")
        self.model = model.eval()
        if self.config.int8_dot == "vnni" and cpu_gemv.int8_isa() != "vnni":
            raise ValueError("fast_decode.int8_dot='vnni': this CPU lacks avx512_vnni/bw/vl (or "
                             "ATEN_CPU_CAPABILITY asks for <= AVX2); use 'avx2'")
        mode = cpu_gemv.gemv_mode(self.config.activations, self.config.int8_dot)
        self.step = DecodeStep(model, self.config.max_len, mode)
        self._run = (torch.compile(self.step, fullgraph=True, dynamic=False) if self.config.compile
                     else self.step)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Runs the prompt (1, T) through the Hugging Face model, fills cache slots [0, T);
        returns the last position's logits (1, V)."""
        out = self.model(input_ids=input_ids, use_cache=True)
        cache = out["cache"] if "cache" in out else out.past_key_values  # transformers >= 5.x: "cache"
        for i, layer in enumerate(cache.layers):
            self.step.fill(i, layer.keys, layer.values)
        return out.logits[:, -1].float()  # (1, T, V) -> (1, V)

    def _check(self, input_ids: torch.Tensor, max_new_tokens: int) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be (1, T): batch size 1 only, got {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        if input_ids.shape[1] + max_new_tokens > self.config.max_len:
            raise ValueError(f"prompt {input_ids.shape[1]} + max_new_tokens {max_new_tokens} tokens exceed "
                             f"fast_decode.max_len={self.config.max_len}")

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, eos_token_id: int | None = None) -> torch.Tensor:
        """(1, T) -> (1, T + n) token ids, n ≤ max_new_tokens (fewer when `eos_token_id` comes)."""
        self._check(input_ids, max_new_tokens)
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        logits = self.prefill(input_ids)
        tokens = [int(t) for t in input_ids[0]]
        pos = torch.tensor([len(tokens)])
        token = torch.empty(1, dtype=torch.long)
        for n in range(max_new_tokens):
            token.fill_(next_token(logits, do_sample, temperature, top_k))
            tokens.append(int(token))
            if n + 1 == max_new_tokens or tokens[-1] == eos_token_id:
                break
            logits = self._run(token, pos)  # (1, V)
            pos += 1
        return torch.tensor([tokens])


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int) -> int:
    """Greedy argmax, or one draw from softmax(logits / T) over the k largest (k = 0: all)."""
    if not do_sample:
        return int(logits.argmax(-1))
    scores = logits / temperature
    if top_k:
        cut = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]  # (1, 1)
        scores = scores.masked_fill(scores < cut, float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1))
