"""DSM: Hutchinson's trace against the exact Hessian of a quadratic, the score formula, model use."""
import math

import pytest
import torch
from torch import nn

from ortho_train.metrics.logprobs import token_logprobs
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers
from ortho_train.sieve.dsm import (
    ActivationStats,
    DSMConfig,
    dsm_column_scores,
    dsm_scores,
    dsm_support,
    hutchinson_diagonal,
)


def test_hutchinson_column_traces_match_the_exact_hessian_of_a_quadratic():
    n, k, probes = 3, 4, 1000
    g = torch.Generator().manual_seed(0)
    root = torch.randn(n * k, n * k, generator=g, dtype=torch.float64)
    a = root @ root.T / (n * k) + torch.eye(n * k, dtype=torch.float64)  # (NK, NK) SPD Hessian
    x = torch.randn(n, k, dtype=torch.float64, generator=g, requires_grad=True)

    def loss():
        v = x.reshape(-1)  # (NK,) row-major, as W_ij -> i*K + j
        return 0.5 * v @ a @ v

    diag = hutchinson_diagonal(loss, {"x": x}, probes, torch.Generator().manual_seed(1))["x"]
    estimate = diag.double().sum(dim=0)  # (K,) per-column traces
    for j in range(k):
        block = torch.zeros(n * k, dtype=torch.bool)
        block[torch.arange(n) * k + j] = True
        exact = float(a.diagonal()[block].sum())
        m = torch.zeros_like(a)
        m[block] = a[block]  # z^T M z is one probe's estimate of the column trace
        var = 0.5 * float(((m + m.T) ** 2).sum() - (2 * m.diagonal()) .square().sum())
        assert abs(float(estimate[j]) - exact) < 4 * math.sqrt(var / probes), (j, float(estimate[j]), exact)


def test_dsm_column_formula():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    score = dsm_column_scores(w, torch.tensor([1.0, -0.01]), torch.tensor([0.5, 2.0]),
                              DSMConfig(a1=2.0, a2=0.5, a3=3.0))
    expected = torch.tensor([math.log(3.0) + 2.5 + 1.5, 0.0 + 0.5 + 6.0])  # negative trace clamped
    assert torch.allclose(score, expected), f"{score} vs {expected}"


def test_activation_std_masks_pads():
    layer = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))  # (B, T, K)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with ActivationStats({"l": layer}) as stats:
        stats.token_mask = mask
        layer(x)
    kept = x.reshape(-1, 6)[mask.reshape(-1).bool()]  # (8, K)
    assert torch.allclose(stats.std()["l"], kept.std(dim=0, unbiased=False), atol=1e-6)


def test_dsm_scores_on_a_tiny_llama_leave_the_model_unchanged():
    model = build_tiny_llama(TinyLlamaConfig(hidden_size=32, num_layers=1, num_heads=2,
                                             intermediate_size=64), 40, 0, 1)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ids = torch.randint(2, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def nll(m, b):
        logp, mask = token_logprobs(m(input_ids=b["input_ids"]).logits, b["labels"])
        return -(logp * mask).sum() / mask.sum()

    modules = linear_layers(model)
    scores = dsm_scores(model, modules, [batch], nll, DSMConfig(probes=4))
    assert set(scores) == set(modules)
    for name, s in scores.items():
        assert s.shape == (modules[name].in_features,) and bool(torch.isfinite(s).all())
    assert model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    masks = dsm_support(scores, {n: tuple(m.weight.shape) for n, m in modules.items()}, 0.1)
    for name, mask in masks.items():
        assert int(mask.sum()) == math.ceil(0.1 * mask.numel())


def test_bad_dsm_settings_fail_naming_the_setting():
    with pytest.raises(ValueError, match="probes"):
        DSMConfig(probes=0)
    with pytest.raises(ValueError, match="a1"):
        DSMConfig(a1=-1.0)
