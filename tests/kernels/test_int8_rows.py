"""Per-row absmax INT8 tables: a hand-computed row, the weight bound, the product bound, and
a lookup that widens only the rows it reads."""
import pytest
import torch

from ortho_kernels.int8_rows import (
    dequantise_rows_int8,
    embed_int8,
    int8_rows_product,
    product_error_bound,
    quantise_rows_int8,
    weight_error_bound,
)


def test_a_hand_computed_row():
    # absmax 0.9921875 = 127 · 2⁻⁷: s = 2⁻⁷ exactly; 0.1 / 2⁻⁷ = 12.8 -> 13 -> 0.1015625
    w = torch.tensor([[0.9921875, -0.25, 0.1], [0.0, 0.0, 0.0]])
    q, s = quantise_rows_int8(w)
    assert q.dtype == torch.int8 and q.tolist() == [[127, -32, 13], [0, 0, 0]]
    assert s.tolist() == [2.0 ** -7, 1.0]  # an all-zero row keeps a harmless scale
    assert dequantise_rows_int8(q, s).tolist() == [[0.9921875, -0.25, 0.1015625], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_weight_within_half_a_step(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(300, 70, generator=g) * torch.logspace(-4, 1, 300)[:, None]  # rows of any scale
    q, s = quantise_rows_int8(w)
    error = (w.double() - dequantise_rows_int8(q, s).double()).abs()  # (V, D)
    bound = weight_error_bound(s)[:, None]
    assert (error <= bound).all(), f"exceeds the bound by {(error - bound).max():.3g}"
    assert (error.amax(dim=1) > 0.25 * bound[:, 0]).all()  # the bound is the right size, not loose
    assert torch.allclose(s.double(), w.abs().amax(dim=1).double() / 127, rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 33), (2, 7, 33), (33,)])
def test_product_within_its_bound_in_row_blocks(shape):
    g = torch.Generator().manual_seed(2)
    q, s = quantise_rows_int8(torch.randn(101, 33, generator=g))
    x = torch.randn(*shape, generator=g)
    y = int8_rows_product(x, q, s, scratch_bytes=4 * 33 * 10)  # 11 blocks of 10 rows, a ragged last
    assert y.shape == (*shape[:-1], 101)
    x2d = x.reshape(-1, 33)
    exact = x2d.double() @ dequantise_rows_int8(q, s, torch.float64).T  # (M, V)
    bound = product_error_bound(x2d, q, s)
    assert ((y.reshape(-1, 101).double() - exact).abs() <= bound).all()
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 33\)"):
        int8_rows_product(torch.randn(2, 32), q, s)


def test_lookup_equals_the_dequantised_rows():
    q, s = quantise_rows_int8(torch.randn(50, 16))
    ids = torch.tensor([[3, 49, 3], [0, 7, 8]])
    rows = embed_int8(ids, q, s)
    assert rows.shape == (2, 3, 16) and torch.equal(rows, dequantise_rows_int8(q, s)[ids])
    assert embed_int8(ids, q, s, torch.bfloat16).dtype == torch.bfloat16
