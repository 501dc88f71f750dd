"""One decoding step of a (sieved) Hugging Face Llama with a preallocated KV cache, written so
that `torch.compile` turns it into one graph (`ortho_train.sieve.fast_decode` drives it).

Per token, with h the residual stream (Llama: "LLaMA: Open and Efficient Foundation Language
Models", §2; RoPE: "RoFormer: Enhanced Transformer with Rotary Position Embedding", §3.4.2):

    x = RMSNorm(h);  q, k, v = x·W_qᵀ, x·W_kᵀ, x·W_vᵀ;  q, k = RoPE(q, pos), RoPE(k, pos)
    K[:, pos], V[:, pos] = k, v;  h += softmax(q·K[:, ≤pos]ᵀ / √d_h)·V[:, ≤pos] · W_oᵀ
    x = RMSNorm(h);  h += (silu(x·W_gateᵀ) ⊙ x·W_upᵀ)·W_downᵀ;  logits = RMSNorm(h)·W_headᵀ

the same arithmetic as transformers' `LlamaForCausalLM` at batch 1 (its RMSNorm, rotate-half
RoPE from the model's own cos/sin tables, grouped-query attention). Each `OrthoLinear` becomes a
`GemvLinear`: one call of the registered op `torch.ops.ortho_kernels.int4_gemv` (the fused INT4
+ sparse ortho GEMV, α and the CSR fixed when the step is built), which the compiler keeps as
an opaque node; dense `nn.Linear` layers (the head) stay `F.linear`. The cache is one
(kv_heads, max_len, head_dim) buffer per layer for K and one for V (separate tensors, not slices
of one: a slice's offset is a constant in inductor's generated C++, so every layer's kernels were
distinct code, each compiled separately), written in place at `pos`; attention runs
over all max_len slots with the slots after `pos` masked out, so every step has the same
shapes and the compiled graph is reused for every position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ortho_kernels import gemv_op
from ortho_kernels.gemv_args import check_gemv_base
from ortho_train.ortho_linear import OrthoLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GemvLinear(nn.Module):
    """An `OrthoLinear` frozen for decoding: its base buffers (shared, not copied), the CSR of
    its ortho stream when α ≠ 0, α and the GEMV's activation mode (`cpu_gemv.gemv_mode`)."""

    def __init__(self, layer: OrthoLinear, mode: int):
        super().__init__()
        check_gemv_base(layer.qweight, layer.scales, layer.zeros, layer.in_features, layer.group_size)
        self.k, self.group_size, self.alpha, self.mode = (layer.in_features, layer.group_size,
                                                          float(layer.alpha), mode)
        for name in ("qweight", "scales", "zeros"):
            self.register_buffer(name, getattr(layer, name), persistent=False)
        self.has_ortho = layer.alpha != 0 and layer.nnz > 0  # α = 0: the ortho stream is never read
        crow, col, values, _ = layer.ortho().to_csr() if self.has_ortho else (None,) * 4
        self.register_buffer("crow", None if crow is None else crow.contiguous(), persistent=False)
        self.register_buffer("col", None if col is None else col.contiguous(), persistent=False)
        self.register_buffer("values", None if values is None else values.contiguous(), persistent=False)
        self.register_buffer("bias", layer.bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv_op.int4_gemv(x, self.qweight, self.scales, self.zeros, self.crow, self.col,
                              self.values, self.k, self.group_size, self.alpha, self.mode)
        return y if self.bias is None else y + self.bias


def frozen_linear(module: nn.Module, mode: int) -> nn.Module:
    """`GemvLinear` for an `OrthoLinear`, the module itself for an `nn.Linear`."""
    if isinstance(module, OrthoLinear):
        if module.bits != 4 or module.group_size % 64:
            raise ValueError(f"fast decoding needs INT4 bases with group_size a multiple of 64, got "
                             f"bits={module.bits}, group_size={module.group_size}")
        return GemvLinear(module, mode)
    if isinstance(module, nn.Linear):
        return module
    raise ValueError(f"fast decoding takes OrthoLinear or nn.Linear projections, got {type(module).__name__}")


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm in fp32: w · h / √(mean(h²) + ε)."""
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LayerCache(nn.Module):
    """One layer's keys and values, each (kv_heads, max_len, head_dim) fp32."""

    def __init__(self, n_kv: int, max_len: int, head_dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(n_kv, max_len, head_dim), persistent=False)
        self.register_buffer("values", torch.zeros(n_kv, max_len, head_dim), persistent=False)


class DecodeStep(nn.Module):
    """logits (1, V) of the next token from one token id and its position (both (1,) int64).

    Reads the Hugging Face model's embeddings, norms and rotary tables (shared, not copied) and
    owns the static cache `caches` (a `LayerCache` per layer)."""

    def __init__(self, model: nn.Module, max_len: int, mode: int):
        super().__init__()
        config, inner = model.config, model.model
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.eps, self.scaling = config.rms_norm_eps, inner.layers[0].self_attn.scaling
        self.embed, self.final_norm = inner.embed_tokens, inner.norm.weight
        self.head = frozen_linear(model.lm_head, mode)
        self.norms = nn.ParameterList()
        self.blocks = nn.ModuleList()
        for layer in inner.layers:
            self.norms.extend([layer.input_layernorm.weight, layer.post_attention_layernorm.weight])
            parts = {**{p: getattr(layer.self_attn, p) for p in PROJECTIONS[:4]},
                     **{p: getattr(layer.mlp, p) for p in PROJECTIONS[4:]}}
            self.blocks.append(nn.ModuleDict({p: frozen_linear(m, mode) for p, m in parts.items()}))
        positions = torch.arange(max_len).unsqueeze(0)  # (1, max_len)
        cos, sin = inner.rotary_emb(self.final_norm.new_zeros(1), positions)  # (1, max_len, head_dim)
        self.register_buffer("cos", cos[0].float(), persistent=False)  # (max_len, head_dim)
        self.register_buffer("sin", sin[0].float(), persistent=False)
        self.caches = nn.ModuleList(LayerCache(self.n_kv, max_len, self.head_dim) for _ in inner.layers)
        self.register_buffer("slots", torch.arange(max_len), persistent=False)

    @property
    def max_len(self) -> int:
        return self.cos.shape[0]

    def fill(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy a prefill's (1, kv_heads, T, head_dim) keys and values into slots [0, T)."""
        t = keys.shape[2]
        self.caches[layer].keys[:, :t].copy_(keys[0])
        self.caches[layer].values[:, :t].copy_(values[0])

    def _attention(self, cache: LayerCache, block: nn.ModuleDict, x: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
        q = block["q_proj"](x).view(self.n_heads, 1, self.head_dim)  # (1, H·d) -> (H, 1, d)
        k = block["k_proj"](x).view(self.n_kv, 1, self.head_dim)  # (1, KV·d) -> (KV, 1, d)
        v = block["v_proj"](x).view(self.n_kv, 1, self.head_dim)
        cos, sin = self.cos[pos], self.sin[pos]  # (1, d)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        cache.keys.index_copy_(1, pos, k)  # (KV, max_len, d) at slot pos
        cache.values.index_copy_(1, pos, v)
        mask = (self.slots <= pos).view(1, 1, 1, -1)  # (max_len,) -> (1, 1, 1, max_len)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), cache.keys.unsqueeze(0), cache.values.unsqueeze(0),  # (1, ·, ·, d)
            attn_mask=mask, scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
        return block["o_proj"](out.reshape(1, self.n_heads * self.head_dim))  # (1, H, 1, d) -> (1, H·d)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.embed(token)  # (1, D)
        for i, (block, cache) in enumerate(zip(self.blocks, self.caches)):
            h = h + self._attention(cache, block, rms_norm(h, self.norms[2 * i], self.eps), pos)
            x = rms_norm(h, self.norms[2 * i + 1], self.eps)
            h = h + block["down_proj"](F.silu(block["gate_proj"](x)) * block["up_proj"](x))
        return self.head(rms_norm(h, self.final_norm, self.eps))  # (1, V)
