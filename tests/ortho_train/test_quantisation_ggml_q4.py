"""The `q4_0` / `q4_1` base quantisers: llama.cpp's block grids, no clipping, exact GGUF blocks."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import quants

from ortho_train.export.gguf_blocks import exact_blocks
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.quantisation import FORMATS, QuantConfig, quantise_weight
from ortho_train.quantisation.ggml_q4 import q4_0_quantise, q4_1_quantise
from ortho_train.sieve import SieveConfig, sieve_posthoc
from ortho_train.sieve.isolation import IsolationConfig, build_isolation


def _weight(seed=0, n=16, k=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = w[0, :32].abs()  # a block with no negative weight (q4_1: z = 0)
    w[1, :32] = -w[1, :32].abs()  # and one with no positive weight
    w[2, 32:64] = 0.0  # an all-zero block
    w[3, :32] *= 1e4  # a wide one
    return w


def _block_scale(d, k):
    return d.float().repeat_interleave(32, dim=1)[:, :k]  # (N, G) → (N, K)


def test_q4_0_is_symmetric_with_positive_scales_and_never_clips():
    w = _weight()
    codes, d, z = q4_0_quantise(w)
    assert bool((z == 8).all()) and bool((d > 0).all()) and d.dtype == torch.float16
    deq = (codes.float() - 8) * _block_scale(d, w.shape[1])
    assert bool(((deq - w).abs() <= _block_scale(d, w.shape[1]) / 2).all())  # rounding only
    assert bool((deq[2, 32:64] == 0).all())


def test_q4_1_offsets_are_fp16_numbers_and_never_clip():
    w = _weight(1)
    codes, d, z = q4_1_quantise(w)
    assert bool((z == torch.round(z)).all()) and int(z.min()) == 0 and int(z.max()) == 15
    offset = -(z.float() * d.float())
    assert torch.equal(offset.to(torch.float16).float(), offset)  # m = −z·d exact in fp16
    deq = (codes.float() - z.float().repeat_interleave(32, dim=1)) * _block_scale(d, w.shape[1])
    assert bool(((deq - w).abs() <= _block_scale(d, w.shape[1]) / 2).all())
    blocks = w.view(16, -1, 32)  # (N, K) → (N, K/32, 32)
    span = (blocks.amax(-1).clamp(min=0) - blocks.amin(-1).clamp(max=0)) / 15  # (N, K/32)
    coarser = d.float() <= span * (1 + 2.0**-6) + 2.0**-24  # at most 16 fp16 ulps above the span
    assert bool(torch.where(span > 0, coarser, d == 1).all())  # an all-zero block: d = 1


@pytest.mark.parametrize(("method", "qtype"), [("q4_0", QType.Q4_0), ("q4_1", QType.Q4_1), ("q4_0", QType.Q4_1)])
def test_gguf_blocks_dequantise_to_the_base_exactly(method, qtype):
    base = quantise_weight(_weight(2), QuantConfig(method, 4, 32))
    blocks = exact_blocks(base, qtype)
    assert blocks is not None
    assert np.array_equal(quants.dequantize(blocks, qtype), base.dequantise().numpy())


def test_registered_as_base_quantisers_usable_by_the_sieve():
    assert FORMATS["q4_0"].base_quantiser and not FORMATS["q4_1"].needs_hessian
    w = _weight(3)
    h = torch.eye(w.shape[1])
    layer = sieve_posthoc(w, h, SieveConfig(QuantConfig("q4_0", 4, 32), rho=0.05))
    assert layer.base.group_size == 32 and bool((layer.base.zeros == 8).all())
    assert layer.ortho.nnz > 0
    with pytest.raises(ValueError, match="blocks of 32 weights: set group_size: 32"):
        quantise_weight(w, QuantConfig("q4_1"))
    with pytest.raises(ValueError, match="not a multiple"):
        quantise_weight(torch.randn(4, 40), QuantConfig("q4_0", 4, 32))
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantConfig("q4_0", 8, 32)


@pytest.mark.parametrize("method", ["q4_0", "q4_1"])
def test_isolation_builds_its_bases_on_the_ggml_grid(method):
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    batch = {"input_ids": torch.randint(2, 40, (2, 16))}
    batch |= {"attention_mask": torch.ones_like(batch["input_ids"]), "labels": batch["input_ids"]}
    config = IsolationConfig(support="impact", rho=0.05, quant=QuantConfig(method, 4, 32), calibration_batches=1)
    iso = build_isolation(model, config, lambda: [batch], lambda: [], lambda m, b: m(**b).loss)
    for name, base in iso.bases.items():
        assert base.group_size == 32
        w = model.get_submodule(name).weight.detach()
        codes, scales, zeros = (q4_0_quantise if method == "q4_0" else q4_1_quantise)(w)
        assert torch.equal(base.codes(), codes) and torch.equal(base.scales, scales), name
