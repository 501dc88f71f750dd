"""Exact NF4/FP4 dequantisation in torch, and a check of what a deployed `Linear4bit` computes.

bitsandbytes quantises a (N, K) weight in blocks of `blocksize` consecutive weights of its
row-major flattening (a block spans two rows when K is not a multiple of the blocksize), packs
two 4-bit codes per byte (the first weight in the high nibble) and keeps one absmax per block:

    ŵ_i = code[q_i] · absmax[⌊i / blocksize⌋],   i = n·K + k

With double quantisation the absmax values are themselves 8-bit codes (blocks of 256) plus an
offset: ``absmax = dequantise_blockwise(absmax_8bit) + offset``.

Why this exists: bitsandbytes 0.50's native CPU `dequantize_4bit` (taken on AVX-512 hosts)
reads the absmax of block ⌊k / blocksize⌋ of *row* n, i.e. it assumes blocks never span rows.
For K not a multiple of the blocksize (the quickstart's 688-wide `down_proj` with blocks of 64)
it multiplies most codes by another block's absmax: on such a host a "NF4" layer computes with
weights up to several times off, and the same copy is right on an AVX2 host. `exact_dequantise_4bit`
evaluates the formula above on every host; `deployed_forward_error` measures how far a deployed
layer's forward is from ``x ŵᵀ + b`` so a copy can refuse a module its host computes wrongly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ortho_kernels.bitsandbytes_offline import import_bitsandbytes


def unpack_4bit_codes(packed: Tensor, numel: int) -> Tensor:
    """The `numel` 4-bit codes (int64, row-major order) of bitsandbytes' packed uint8 bytes."""
    data = packed.reshape(-1).view(torch.uint8)  # (⌈numel / 2⌉,) two codes per byte
    high, low = (data >> 4).long(), (data & 0x0F).long()
    return torch.stack([high, low], dim=1).reshape(-1)[:numel]  # (bytes, 2) -> (numel,)


def block_absmax(state) -> Tensor:
    """The fp32 absmax of every block of a bitsandbytes `QuantState` (double quantisation undone)."""
    if not getattr(state, "nested", False):
        return state.absmax.float()
    import_bitsandbytes()  # lazily: slow import, never from the hub
    import bitsandbytes.functional as bnbf

    # 1-D blockwise 8-bit codes: blocks of 256 consecutive absmax values, no rows to confuse
    return bnbf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset


def exact_dequantise_4bit(packed: Tensor, state) -> Tensor:
    """ŵ = code[q] · absmax[block] (module docstring) as a dense fp32 tensor of `state.shape`."""
    shape = tuple(state.shape)
    numel = math.prod(shape)
    codes = unpack_4bit_codes(packed, numel)  # (numel,)
    values = state.code.float().to(codes.device)[codes]  # (numel,)
    n_blocks = -(-numel // state.blocksize)
    padded = nn.functional.pad(values, (0, n_blocks * state.blocksize - numel))  # (n_blocks · blocksize,)
    scaled = padded.view(n_blocks, state.blocksize) * block_absmax(state).view(-1, 1).to(values.device)
    return scaled.reshape(-1)[:numel].view(shape)  # (n_blocks, blocksize) -> shape


@torch.no_grad()
def deployed_forward_error(layer: nn.Module, weight: Tensor, bias: Tensor | None, rows: int = 4) -> float:
    """‖layer(x) − (x ŵᵀ + b)‖ / ‖x ŵᵀ + b‖ on a fixed random probe x (rows, in_features).

    Run in eval mode, as a deployment runs it (bitsandbytes picks its inference kernels there);
    the layer's training flag is restored.
    """
    generator = torch.Generator().manual_seed(0)
    device = weight.device
    probe = torch.randn(rows, weight.shape[1], generator=generator).to(device)  # (rows, in_features)
    expected = probe @ weight.float().T  # (rows, out_features)
    if bias is not None:
        expected = expected + bias.float()
    was_training = layer.training
    layer.eval()
    try:
        got = layer(probe).float()
    finally:
        layer.train(was_training)
    return float((got - expected).norm() / expected.norm().clamp_min(torch.finfo(torch.float32).tiny))
