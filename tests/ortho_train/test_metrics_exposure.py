"""Exposure (Carlini et al. 2019): secret log-perplexity, rank and skew-normal estimates."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ortho_train.metrics.exposure import (
    _shared_head_length,
    exposure_from_rank,
    exposure_from_skewnorm,
    fit_skewnorm,
    secret_log_perplexity,
    skewnorm_logcdf,
)
from tests.ortho_train.metric_helpers import one_thread, tiny_llama as _tiny_llama  # noqa: F401


@torch.no_grad()
def _brute_force_log2_ppl(model, prefix, candidates):
    """Full prefix+secret forward per candidate, float64 log-softmax, secret tokens only."""
    out = []
    for secret in candidates:
        ids = torch.cat([prefix, secret]).unsqueeze(0)
        log_p = torch.log_softmax(model(ids, use_cache=False).logits[0].double(), -1)
        positions = torch.arange(len(prefix) - 1, ids.shape[1] - 1)  # predict the secret only
        out.append(-log_p[positions, secret].sum().item() / math.log(2))
    return torch.tensor(out, dtype=torch.float64)


def test_secret_log_perplexity_matches_brute_force_and_batching():
    model = _tiny_llama()
    torch.manual_seed(5)
    prefix = torch.randint(0, 64, (9,))
    candidates = torch.randint(0, 64, (7, 5))
    expected = _brute_force_log2_ppl(model, prefix, candidates)
    for batch_size in (1, 3, 7):
        got = secret_log_perplexity(model, prefix, candidates, batch_size=batch_size)
        assert got.dtype == torch.float64 and got.shape == (7,)
        err = (got - expected).abs().max().item()
        assert err < 1e-4, f"batch_size={batch_size}: max |Δ| = {err:.2e} bits"
    rerun = secret_log_perplexity(model, prefix.unsqueeze(0), candidates, batch_size=4,
                                  reuse_prefix_cache=False)
    assert (rerun - expected).abs().max().item() < 1e-4
    # S = 1: only the prefix run is needed.
    single = secret_log_perplexity(model, prefix, candidates[:, :1])
    assert (single - _brute_force_log2_ppl(model, prefix, candidates[:, :1])).abs().max() < 1e-4


def test_secret_log_perplexity_with_shared_heads_and_duplicates():
    # A 2-symbol alphabet: many candidates share their leading tokens, so the shared-head
    # path is taken; duplicates and the original order must come back intact.
    model = _tiny_llama(2)
    gen = torch.Generator().manual_seed(7)
    candidates = torch.tensor([11, 42])[torch.randint(0, 2, (24, 6), generator=gen)]
    candidates[5] = candidates[17]
    rows = torch.unique(candidates, dim=0)
    assert _shared_head_length(rows) > 0
    prefix = torch.tensor([3, 9, 27, 17])
    expected = _brute_force_log2_ppl(model, prefix, candidates)
    for batch_size in (5, 64):
        got = secret_log_perplexity(model, prefix, candidates, batch_size=batch_size)
        err = (got - expected).abs().max().item()
        assert err < 1e-4, f"batch_size={batch_size}: max |Δ| = {err:.2e} bits"
    assert got[5] == got[17]


def test_shared_head_length_cost_model():
    # All rows identical: feed everything once as one head (h = S-1).
    assert _shared_head_length(torch.zeros(8, 4, dtype=torch.long)) == 3
    # All first tokens distinct: sharing cannot help.
    assert _shared_head_length(torch.arange(8).unsqueeze(1).repeat(1, 4)) == 0


def test_secret_log_perplexity_leaves_prefix_cache_reusable():
    # The cached pass appends to the cache; a second batch must not see the first's tokens.
    model = _tiny_llama(1)
    prefix = torch.tensor([1, 2, 3])
    candidates = torch.tensor([[4, 5, 6]] * 4)
    got = secret_log_perplexity(model, prefix, candidates, batch_size=1)
    assert torch.allclose(got, got[0].expand(4), atol=1e-9, rtol=0)


def test_exposure_from_rank_known_values():
    reference = torch.arange(1.0, 1025.0)  # |R_ref| = 1024
    canaries = torch.tensor([0.5, 1.0, 512.5, 2000.0])
    got = exposure_from_rank(canaries, reference)
    assert got[0].item() == 10.0  # most likely secret: exactly log2 |R_ref|
    assert got[1].item() == 10.0  # a tie with the best reference counts in its favour
    assert got[2].item() == pytest.approx(10 - math.log2(513))  # median reference: ≈ 1
    assert abs(got[2].item() - 1.0) < 0.01
    assert got[3].item() == pytest.approx(10 - math.log2(1025))  # worst: ≈ 0


@pytest.fixture(scope="module")
def skewed_references():
    return stats.skewnorm.rvs(4.0, loc=100.0, scale=15.0, size=10_000, random_state=0)


def test_skewnorm_fit_recovers_known_distribution(skewed_references):
    a, loc, scale = fit_skewnorm(skewed_references)
    assert a == pytest.approx(4.0, rel=0.15)
    assert loc == pytest.approx(100.0, abs=1.0)
    assert scale == pytest.approx(15.0, rel=0.05)
    canaries = np.array([95.0, 100.0, 110.0])
    got = exposure_from_skewnorm(canaries, skewed_references).numpy()
    analytic = -stats.skewnorm.logcdf(canaries, 4.0, 100.0, 15.0) / math.log(2)
    np.testing.assert_allclose(got, analytic, rtol=0.05)


def test_skewnorm_exposure_is_finite_far_in_the_tail(skewed_references):
    params = fit_skewnorm(skewed_references)
    a, loc, scale = params
    x = loc - 50 * scale  # CDF ≈ e^-21000: log(cdf) would be -inf
    with np.errstate(divide="ignore"):
        assert np.isneginf(np.log(stats.skewnorm.cdf(x, a, loc, scale)))
    got = exposure_from_skewnorm([x], skewed_references, params=params).item()
    z = -50.0  # leading-order tail of the skew-normal CDF for a > 0
    asymptotic = (-math.log(math.pi * a) - 2 * math.log(-z) - math.log1p(a * a)
                  - (1 + a * a) * z * z / 2)
    assert math.isfinite(got) and got > 1e4
    assert got == pytest.approx(-asymptotic / math.log(2), rel=1e-6)


def test_skewnorm_logcdf_continuous_across_the_quadrature_switch():
    # Both sides of the e^-20 switch agree with scipy's log(cdf) where that is still accurate.
    for a in (-2.0, 0.0, 1.5, 5.0):
        z = np.linspace(-6.0, 0.0, 13)
        np.testing.assert_allclose(skewnorm_logcdf(z, a, 0.0, 1.0), stats.skewnorm.logcdf(z, a),
                                   rtol=1e-6)


def test_bounded_skewnorm_exposure_caps_at_the_randomness_space(skewed_references):
    from ortho_train.metrics import bounded_skewnorm_exposure

    far, near = skewed_references.min() - 200.0, 110.0  # far below every reference; inside them
    raw = exposure_from_skewnorm([far, near], skewed_references).numpy()
    max_bits = math.log2(10**10)  # a 10-digit secret carries 33.2 bits
    assert raw[0] > max_bits  # the unbounded tail claims more than the secret holds
    got = bounded_skewnorm_exposure([far, near], skewed_references, max_bits).numpy()
    assert got[0] == max_bits and got[1] == pytest.approx(raw[1])


def test_bounded_skewnorm_exposure_refuses_too_few_references_and_failed_fits(skewed_references):
    from ortho_train.metrics import ExposureEstimateError, bounded_skewnorm_exposure

    with pytest.raises(ExposureEstimateError, match="≥ 100 references, got 16"):
        bounded_skewnorm_exposure([90.0], skewed_references[:16], 33.2)
    with pytest.raises(ExposureEstimateError, match="refused"):
        bounded_skewnorm_exposure([90.0], np.full(500, 7.0), 33.2)  # no spread: no fit


def test_candidate_batches_shrink_to_the_logit_budget_for_a_large_vocabulary():
    from ortho_train.metrics import LOGIT_BUDGET_BYTES, batch_within_logit_budget

    assert batch_within_logit_budget(1024, 6, 259) == 1024  # the byte model: no cap
    gemma = batch_within_logit_budget(1024, 6, 262_144)
    assert gemma * 6 * 262_144 * 8 <= LOGIT_BUDGET_BYTES < (gemma + 1) * 6 * 262_144 * 8
    assert batch_within_logit_budget(1024, 6, None) == 1024
    assert batch_within_logit_budget(1024, 10_000, 10**7) == 1  # never zero
