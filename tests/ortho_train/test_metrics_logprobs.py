"""Known-answer tests for the shared masked log-prob helpers."""
import math

import pytest
import torch

from ortho_train.metrics.logprobs import (
    sequence_logprob,
    sequence_nll_mean,
    token_distribution_stats,
    token_logprobs,
)

# Row b, position t predicts labels[b, t + 1]; probabilities per position chosen by hand.
PROBS = torch.tensor([
    [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]],
    [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]],
])  # (B=2, T=4, V=3)
LABELS = torch.tensor([
    [-100, 1, 2, 0],      # prompt token first; scored: p=0.25, 0.3, 0.2
    [-100, 0, -100, -100],  # one scored token (p=0.7) then padding
])


def _logits():
    # Softmax is shift-invariant: adding a per-position constant must not change anything.
    return PROBS.log() + torch.arange(8.0).reshape(2, 4, 1)


def test_token_logprobs_shift_and_mask():
    logp, mask = token_logprobs(_logits(), LABELS)
    assert logp.shape == (2, 3) and logp.dtype == torch.float32
    expected_mask = torch.tensor([[True, True, True], [True, False, False]])
    assert torch.equal(mask, expected_mask)
    expected = torch.tensor([[math.log(0.25), math.log(0.3), math.log(0.2)],
                             [math.log(0.7), 0.0, 0.0]])
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=0)


def test_sequence_reductions():
    logits = _logits()
    seq = sequence_logprob(logits, LABELS)
    torch.testing.assert_close(seq, torch.tensor([math.log(0.25 * 0.3 * 0.2), math.log(0.7)]))
    nll = sequence_nll_mean(logits, LABELS)
    torch.testing.assert_close(nll, torch.tensor([-math.log(0.25 * 0.3 * 0.2) / 3, -math.log(0.7)]))
    empty = torch.full_like(LABELS, -100)
    assert sequence_nll_mean(logits, empty).tolist() == [0.0, 0.0]  # no NaN for losses


def test_attention_mask_masks_pads_left_in_labels():
    labels = torch.tensor([[5, 1, 2, 0], [5, 0, 2, 2]])  # labels = input_ids, pads not -100
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, mask = token_logprobs(_logits(), labels, attention_mask=attention)
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_bf16_logits_are_scored_in_float32_and_differentiable():
    logits = _logits().to(torch.bfloat16).requires_grad_()
    logp, _ = token_logprobs(logits, LABELS)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_token_distribution_stats_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11) * 3
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 3:] = -100
    stats = token_distribution_stats(logits, labels)
    log_p = torch.log_softmax(logits[:, :-1].double(), -1)
    p = log_p.exp()
    mu = (p * log_p).sum(-1)
    sigma = ((p * log_p.square()).sum(-1) - mu.square()).sqrt()  # the paper's (uncentred) form
    m = stats.mask
    torch.testing.assert_close(stats.mu[m].double(), mu[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.sigma[m].double(), sigma[m], atol=1e-5, rtol=1e-5)
    picked = log_p.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(stats.logp[m].double(), picked[m], atol=1e-5, rtol=1e-5)
    assert (stats.sigma[~m] == 1).all() and (stats.mu[~m] == 0).all()


def test_token_distribution_stats_degenerate_distributions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = torch.tensor([0.0, -math.inf, -math.inf, 1.0])  # banned tokens: no NaN
    logits[0, 1] = torch.tensor([200.0, 0.0, 0.0, 0.0])  # one-hot: σ clamped, not 0
    labels = torch.tensor([[0, 3, 0]])
    logits.requires_grad_()
    stats = token_distribution_stats(logits, labels, sigma_min=1e-6)
    assert torch.isfinite(stats.mu).all() and torch.isfinite(stats.sigma).all()
    (stats.mu[0, 0] + stats.sigma[0, 0]).backward()
    assert torch.isfinite(logits.grad).all(), logits.grad
    assert stats.sigma[0, 1].item() == pytest.approx(1e-6)
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    assert stats.mu[0, 0].item() == pytest.approx((p * p.log()).sum().item(), abs=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))
