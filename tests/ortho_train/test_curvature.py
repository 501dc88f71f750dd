"""Curvature: the GPTQ Hessian H = 2/N Σ x xᵀ over unmasked tokens, hooks and standalone."""
import pytest
import torch

from ortho_train.curvature import (
    HessianAccumulator,
    HessianCollector,
    collect_hessians,
    inverse_cholesky_upper,
    prepare_hessian,
)
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers


def _direct(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].double()  # (N, d)
    return 2.0 * rows.T @ rows / rows.shape[0]


def test_running_mean_over_tokens_ignores_batching_and_pads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 8, generator=g)
    mask = torch.rand(6, 10, generator=g) > 0.3
    padded = x.masked_fill(~mask[..., None], 1e6)  # pads hold garbage: must not count
    expected = _direct(x, mask)
    for splits in ([6], [1, 2, 3], [4, 2]):
        acc = HessianAccumulator(8, dtype=torch.float64)
        for chunk_x, chunk_m in zip(padded.split(splits), mask.split(splits)):
            acc.add(chunk_x, chunk_m)
        assert acc.tokens == int(mask.sum())
        diff = (acc.hessian - expected).abs().max().item()
        assert diff < 1e-10, f"batching {splits}: max |ΔH| = {diff}"


def test_mask_shape_mismatch_is_a_clear_error():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="token mask"):
        acc.add(torch.randn(2, 3, 4), torch.ones(3, 2))


def test_prepare_hessian_dead_columns_and_damping():
    x = torch.randn(50, 5, dtype=torch.float64)
    x[:, 2] = 0  # a feature that never fires
    h = 2 * x.T @ x / 50
    prepared, dead = prepare_hessian(h, damp=0.1)
    assert dead.tolist() == [False, False, True, False, False]
    diag = torch.diagonal(h).clone()
    diag[2] = 1.0
    assert torch.allclose(torch.diagonal(prepared), diag + 0.1 * diag.mean())
    u = inverse_cholesky_upper(prepared)
    assert torch.allclose(u.T @ u, torch.linalg.inv(prepared), atol=1e-10)


def test_hooks_on_a_tiny_llama_match_captured_inputs():
    torch.manual_seed(0)
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    ids = torch.randint(2, 40, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[2, 5:] = 0
    layer = model.model.layers[1].mlp.down_proj
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    hessians = collect_hessians(model, [{"input_ids": ids, "attention_mask": mask}])
    handle.remove()
    assert set(hessians) == set(linear_layers(model)) and "lm_head" not in hessians
    expected = _direct(captured[0], mask)
    got = hessians["model.layers.1.mlp.down_proj"].double()
    assert (got - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_no_calibration_data_is_a_clear_error():
    model = build_tiny_llama(TinyLlamaConfig(32, 1, 2, 64), 40, 0, 1)
    with pytest.raises(ValueError, match="calibration DataLoader is empty"):
        collect_hessians(model, [])
    ids = torch.randint(2, 40, (2, 6))
    with pytest.raises(ValueError, match="no calibration tokens"):
        collect_hessians(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
    with pytest.raises(ValueError, match="no nn.Linear"):
        HessianCollector(torch.nn.Sequential(torch.nn.ReLU()))
