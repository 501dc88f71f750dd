"""TOFU's truth ratio, probabilities, forget quality and model utility against hand-computed values."""
import math

import pytest
import torch

from ortho_train.metrics.tofu import (answer_probability, forget_quality, harmonic_mean, model_utility,
                                      normalised_answer_probability, truth_ratio_score, truth_ratios)


def test_truth_ratio_is_the_geometric_mean_ratio():
    # Normalised probabilities: paraphrase 0.5; perturbed 0.1 and 0.4 → geometric mean 0.2 → R = 0.4.
    para = torch.tensor([math.log(0.5)])
    pert = torch.tensor([[math.log(0.1), math.log(0.4)]])
    assert truth_ratios(para, pert).item() == pytest.approx(0.4)
    # A second question where the perturbed answers are as likely as the paraphrase: R = 1.
    r = truth_ratios([math.log(0.5), math.log(0.3)], [[math.log(0.1), math.log(0.4)], [math.log(0.3)] * 2])
    assert r.tolist() == pytest.approx([0.4, 1.0])
    # forget: mean min(R, 1/R) = (0.4 + 1)/2; retain-like: mean max(0, 1 − R) = (0.6 + 0)/2
    assert truth_ratio_score(r, "forget") == pytest.approx(0.7)
    assert truth_ratio_score(r, "retain") == pytest.approx(0.3)
    assert truth_ratio_score([2.5], "forget") == pytest.approx(0.4)  # min(2.5, 1/2.5)
    assert truth_ratio_score([2.5], "world_facts") == 0.0  # clamped at 0


def test_probabilities_by_hand():
    assert answer_probability([math.log(0.2), math.log(0.6)]) == pytest.approx(0.4)
    # true 0.6, perturbed 0.1 + 0.2 + 0.3 = 0.6 → 0.5; second row true 0.3, perturbed sum 0.1 → 0.75
    value = normalised_answer_probability([math.log(0.6), math.log(0.3)],
                                          torch.log(torch.tensor([[0.1, 0.2, 0.3], [0.05, 0.03, 0.02]])))
    assert value == pytest.approx((0.5 + 0.75) / 2)


def test_forget_quality_is_the_exact_ks_p_value():
    # Fully separated samples of 3 and 3: D = 1; exactly 2 of the C(6,3) = 20 orderings reach it → p = 0.1.
    p_value, statistic = forget_quality([0.1, 0.2, 0.3], [0.7, 0.8, 0.9])
    assert statistic == 1.0 and p_value == pytest.approx(0.1)
    p_same, d_same = forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])
    assert d_same == 0.0 and p_same == pytest.approx(1.0)


def test_model_utility_is_the_harmonic_mean_of_nine():
    values = {s: {"probability": 0.5, "rouge_l_recall": 0.25, "truth_ratio": 1.0}
              for s in ("retain", "real_authors", "world_facts")}
    # 9 / (3·(2 + 4 + 1)) = 3/7
    assert model_utility(values) == pytest.approx(3 / 7)
    values["world_facts"]["truth_ratio"] = 0.0
    assert model_utility(values) == 0.0
    del values["retain"]["rouge_l_recall"]
    with pytest.raises(KeyError, match="retain.*rouge_l_recall"):
        model_utility(values)
    assert harmonic_mean({"a": 1.0, "b": 1 / 3}) == pytest.approx(0.5)


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"perturbed_logp.*\(2, m"):
        truth_ratios([0.0, 0.0], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="NaN"):
        answer_probability([float("nan")])
    with pytest.raises(ValueError, match="no values"):
        forget_quality([], [0.5])
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean({"a": -1.0})
