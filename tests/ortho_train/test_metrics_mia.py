"""Membership-inference scores (known token log-probs) and ROC summaries (known AUC/TPR)."""
import math
import warnings
import zlib

import pytest
import torch
from scipy import stats
from torchmetrics.functional.classification import binary_auroc

from ortho_train.metrics.mia import mia_report, mia_scores, roc_auc, roc_curve, tpr_at_fpr, zlib_bits


def _logits_for(label_probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """V=2 logits whose next-token label (always id 0) has the given probabilities.

    Row b has len(label_probs[b]) scored tokens; the first input token is a prompt token and
    shorter rows are padded with -100.
    """
    width = max(len(p) for p in label_probs) + 1
    logits = torch.zeros(len(label_probs), width, 2, dtype=torch.float64)
    labels = torch.full((len(label_probs), width), -100)
    for b, probs in enumerate(label_probs):
        for t, p in enumerate(probs):
            logits[b, t] = torch.tensor([math.log(p), math.log1p(-p)])
            labels[b, t + 1] = 0
    return logits, labels


def test_loss_and_min_k_on_hand_made_log_probs():
    probs = [[0.9, 0.1, 0.5, 0.8, 0.05, 0.7, 0.6, 0.3, 0.95, 0.4],  # n = 10
             [0.2, 0.9, 0.6, 0.01, 0.7]]  # n = 5, then padding
    logits, labels = _logits_for(probs)
    # An unscored prompt position with a tiny probability must not count.
    logits[1, 6] = torch.tensor([math.log(1e-9), math.log1p(-1e-9)])
    scores = mia_scores(logits, labels, ks=(0.2, 0.4))
    logs = [sorted(math.log(p) for p in row) for row in probs]
    assert scores["loss"].tolist() == pytest.approx([sum(r) / len(r) for r in logs])
    assert scores["mink_20"].tolist() == pytest.approx([sum(logs[0][:2]) / 2, logs[1][0]])
    assert scores["mink_40"].tolist() == pytest.approx([sum(logs[0][:4]) / 4, sum(logs[1][:2]) / 2])
    assert set(scores) == {"loss", "mink_20", "mink_40", "minkpp_20", "minkpp_40"}


def test_min_k_plus_plus_equals_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 17) * 2
    labels = torch.randint(0, 17, (3, 12))
    labels[:, :3] = -100  # prompt
    labels[2, 8:] = -100  # padding
    scores = mia_scores(logits, labels, ks=(0.2, 0.4))
    for b in range(3):
        z = []
        for t in range(11):
            if labels[b, t + 1] == -100:
                continue
            log_p = torch.log_softmax(logits[b, t].double(), -1)
            p = log_p.exp()
            mu = (p * log_p).sum()
            sigma = ((p * log_p**2).sum() - mu**2).sqrt()
            z.append(((log_p[labels[b, t + 1]] - mu) / sigma).item())
        z.sort()
        for k in (0.2, 0.4):
            kk = max(1, int(k * len(z) + 1e-9))
            expected = sum(z[:kk]) / kk
            assert scores[f"minkpp_{round(100 * k)}"][b].item() == pytest.approx(expected, abs=1e-5)


def test_zlib_ratio_value_and_sign():
    logits, labels = _logits_for([[0.5, 0.25, 0.5], [0.5, 0.25, 0.5]])  # same loss twice
    repetitive, varied = "ab" * 60, "The quick brown fox jumps over the lazy dog; 42 zebras!"
    scores = mia_scores(logits, labels, texts=[repetitive, varied.encode()])
    mean_nll = -(2 * math.log(0.5) + math.log(0.25)) / 3
    for i, text in enumerate([repetitive, varied]):
        bits = 8 * len(zlib.compress(text.encode()))
        assert zlib_bits(text) == bits
        assert scores["zlib"][i].item() == pytest.approx(-mean_nll / bits)
    # Same likelihood, but the less compressible text is more surprising to find that likely.
    assert scores["zlib"][1] > scores["zlib"][0]
    with pytest.raises(ValueError):
        mia_scores(logits, labels, texts=["only one"])


def test_sequence_without_scored_tokens_is_nan_and_refused_by_roc():
    logits, labels = _logits_for([[0.5, 0.5], [0.5]])
    labels[1] = -100
    scores = mia_scores(logits, labels)
    assert math.isnan(scores["loss"][1]) and math.isnan(scores["mink_20"][1])
    with pytest.raises(ValueError):
        roc_auc(scores["loss"], torch.zeros(3))


def test_perfect_separation():
    members = torch.linspace(5.0, 6.0, 50)
    nonmembers = torch.linspace(0.0, 1.0, 200)
    assert roc_auc(members, nonmembers) == 1.0
    assert tpr_at_fpr(members, nonmembers, fpr=0.01) == 1.0
    assert roc_auc(nonmembers, members) == 0.0


def test_identical_distributions_give_half():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, generator=gen), torch.randn(4000, generator=gen)
    assert abs(roc_auc(a, b) - 0.5) < 0.05
    assert roc_auc(torch.full((10,), 3.0), torch.full((20,), 3.0)) == 0.5  # all tied


def test_large_magnitude_scores_are_not_squashed_by_a_sigmoid():
    gen = torch.Generator().manual_seed(1)
    members = -1e3 - 9e3 * torch.rand(300, generator=gen) ** 2  # in [-1e4, -1e3], skewed high
    nonmembers = -1e3 - 9e3 * torch.rand(300, generator=gen)
    u = stats.mannwhitneyu(members.numpy(), nonmembers.numpy()).statistic
    expected = u / (300 * 300)
    assert expected > 0.6  # a real, non-trivial separation
    assert roc_auc(members, nonmembers) == pytest.approx(expected, abs=1e-6)
    # The trap: torchmetrics on raw scores sigmoids them all to 0 and reports a tie.
    target = torch.cat([torch.ones(300), torch.zeros(300)]).long()
    assert float(binary_auroc(torch.cat([members, nonmembers]), target)) == pytest.approx(0.5)


def test_ties_count_half():
    # Pairs (m, n): (1,2)=0 (1,0)=1 (2,2)=½ (2,0)=1 (2,2)=½ (2,0)=1 → 4/6.
    assert roc_auc(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 0.0])) == pytest.approx(4 / 6)


def test_tpr_at_fpr_known_value():
    nonmembers = torch.arange(100.0)  # FPR 1% allows exactly one non-member (99) above threshold
    members = torch.cat([torch.full((30,), 99.5), torch.full((20,), 98.5), torch.full((50,), 0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 100 non-members resolve 1%: no warning
        assert tpr_at_fpr(members, nonmembers, fpr=0.01) == pytest.approx(0.5)
    assert tpr_at_fpr(members, nonmembers, fpr=0.02) == pytest.approx(0.5)
    assert tpr_at_fpr(members, nonmembers, fpr=0.03) == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="1/FPR"):
        tpr_at_fpr(members, nonmembers[:50], fpr=0.01)


def test_mia_report_keys_and_values():
    members = {"loss": torch.linspace(1, 2, 20), "mink_20": torch.zeros(20),
               "only_here": torch.ones(20)}
    nonmembers = {"loss": torch.linspace(-2, -1, 200), "mink_20": torch.zeros(200)}
    report = mia_report(members, nonmembers)
    assert report == {"auc_loss": 1.0, "tpr@1%fpr_loss": 1.0,
                      "auc_mink_20": 0.5, "tpr@1%fpr_mink_20": pytest.approx(0.0)}


def test_roc_curve_points_integrate_to_the_auc():
    nonmembers = torch.arange(100.0)
    members = torch.cat([torch.full((30,), 99.5), torch.full((20,), 98.5), torch.full((50,), 0.5)])
    fpr, tpr = roc_curve(members, nonmembers)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert all(a <= b for a, b in zip(fpr, fpr[1:])) and all(a <= b for a, b in zip(tpr, tpr[1:]))
    trapezoid = sum((f1 - f0) * (t0 + t1) / 2 for f0, f1, t0, t1 in zip(fpr, fpr[1:], tpr, tpr[1:]))
    assert trapezoid == pytest.approx(roc_auc(members, nonmembers), abs=1e-6)  # torchmetrics: float32
    assert max(t for f, t in zip(fpr, tpr) if f <= 0.01) == pytest.approx(tpr_at_fpr(members, nonmembers, 0.01))
