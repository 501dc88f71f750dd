"""Offline RMIA: hand-computed scores, the resolution rule, and a case where the reference helps."""
import math

import pytest
import torch

from ortho_train.metrics.reference_mia import (RMIAConfig, fpr_label, likelihood_ratio, reference_mia_report,
                                               rmia_scores, tie_broken, tpr_resolved)
from ortho_train.settings import SettingError

log = math.log


def test_scores_match_a_hand_computation():
    """a = 0.5: Pr(x) = ½(1.5·p_ref + 0.5). Targets x (0.8 / ref 0.4) and y (0.3 / ref 0.6);
    population z1 (0.2 / 0.2), z2 (0.6 / 0.2), z3 (0.9 / 0.9).
    ratios: x 0.8/0.55 = 1.4545, y 0.3/0.7 = 0.4286, z1 0.2/0.4 = 0.5, z2 0.6/0.4 = 1.5, z3 0.9/0.925 = 0.9730.
    γ = 1: x beats z1, z3 → 2/3; y beats none → 0. γ = 2: x/z1 = 2.909 ≥ 2, x/z3 = 1.495 < 2 → 1/3."""
    target, ref = torch.tensor([log(0.8), log(0.3)]), torch.tensor([log(0.4), log(0.6)])
    pop_t, pop_r = torch.tensor([log(0.2), log(0.6), log(0.9)]), torch.tensor([log(0.2), log(0.2), log(0.9)])
    ratios = likelihood_ratio(torch.cat([target, pop_t]), torch.cat([ref, pop_r]), 0.5)
    assert ratios.tolist() == pytest.approx([0.8 / 0.55, 0.3 / 0.7, 0.5, 1.5, 0.9 / 0.925])
    assert rmia_scores(target, ref, pop_t, pop_r, a=0.5, gamma=1.0).tolist() == pytest.approx([2 / 3, 0.0])
    assert rmia_scores(target, ref, pop_t, pop_r, a=0.5, gamma=2.0).tolist() == pytest.approx([1 / 3, 0.0])
    # a = 1: Pr(x) is the reference probability itself: ratio x = 2, z2 = 3 → x beats z1 (1) and z3 (1)
    assert rmia_scores(target, ref, pop_t, pop_r, a=1.0).tolist() == pytest.approx([2 / 3, 0.0])


def test_reference_calibration_beats_loss_when_difficulty_varies():
    """Non-members and members span the same wide range of reference difficulty; members get a
    small boost over their reference probability. LOSS ranks by difficulty (AUC = P(U + 0.3 > V)
    ≈ 0.6 for U, V ~ U[0, 3]); RMIA divides it out and separates them perfectly."""
    g = torch.Generator().manual_seed(0)
    ref_m, ref_h, ref_z = (torch.rand(n, generator=g) * 3 - 4 for n in (50, 200, 500))  # log p ∈ [−4, −1]
    noise_m, noise_h, noise_z = (torch.rand(n, generator=g) * 0.2 - 0.1 for n in (50, 200, 500))  # ±0.1
    target_m, target_h, target_z = ref_m + 0.3 + noise_m, ref_h + noise_h, ref_z + noise_z
    # a = 1, γ = 1.1: a member's ratio ≥ e^0.2 = 1.22 beats every z (ratio ≤ e^0.1) by ≥ 1.1; a
    # holdout's never beats all of them
    rmia_m = rmia_scores(target_m, ref_m, target_z, ref_z, a=1.0, gamma=1.1)
    rmia_h = rmia_scores(target_h, ref_h, target_z, ref_z, a=1.0, gamma=1.1)
    rmia = reference_mia_report(rmia_m, rmia_h, fprs=(0.01, 0.001))
    loss = reference_mia_report(target_m, target_h, fprs=(0.01,), name="loss")
    assert rmia["mia_auc_rmia"] == pytest.approx(1.0) and loss["mia_auc_loss"] < 0.75
    assert rmia["mia_tpr_at_1pct_fpr_rmia"] == 1.0


def test_ties_at_saturation_are_broken_by_the_ratio():
    """Two targets beat every z (score 1, tied); the one with the larger ratio ranks first, and no
    tie-break crosses a score level: x (0.8 / ref 0.4, a = 1: ratio 2) above y (0.6 / 0.4: 1.5)
    above w (score 1/2)."""
    target, ref = torch.tensor([log(0.8), log(0.6), log(0.5)]), torch.tensor([log(0.4), log(0.4), log(0.5)])
    pop_t, pop_r = torch.tensor([log(0.3), log(0.6)]), torch.tensor([log(0.3), log(0.5)])  # ratios 1, 1.2
    fraction = rmia_scores(target, ref, pop_t, pop_r, a=1.0)
    assert fraction.tolist() == [1.0, 1.0, 0.5]
    broken = tie_broken(fraction, target, ref, 1.0, 2)
    assert broken[0] > broken[1] > broken[2] and broken[1] - 1.0 < 0.25  # < 1/(2|Z|)
    assert broken[0].item() == pytest.approx(1 + (math.atan(math.log(2)) / math.pi + 0.5) / 4)


def test_tpr_unresolved_below_one_false_positive():
    assert tpr_resolved(1000, 0.001) and tpr_resolved(200, 0.01) and not tpr_resolved(999, 0.001)
    assert fpr_label(0.01) == "1pct" and fpr_label(0.001) == "0.1pct"
    members, holdout = torch.tensor([3.0, 2.0, 0.5]), torch.arange(200, dtype=torch.float64) / 200  # [0, 0.995]
    report = reference_mia_report(members, holdout, fprs=(0.01, 0.001))
    assert report["mia_tpr_at_0.1pct_fpr_rmia"] is None and report["mia_holdout_count"] == 200
    # FPR ≤ 1% allows 2 of 200 false positives: threshold above 0.985 → members 3 and 2 pass, 0.5 not
    assert report["mia_tpr_at_1pct_fpr_rmia"] == pytest.approx(2 / 3)
    # AUC: 3 and 2 beat all 200; 0.5 beats 100 of them (0.0 … 0.495) and ties one (½) → 500.5 / 600
    assert report["mia_auc_rmia"] == pytest.approx(500.5 / 600, abs=1e-6)


def test_bad_settings_name_the_setting():
    for bad, name in (({"a": 1.5}, "rmia.a"), ({"gamma": 0.0}, "rmia.gamma"), ({"population": 0}, "rmia.population"),
                      ({"fprs": [0.0]}, "rmia.fprs")):
        with pytest.raises(SettingError, match=name):
            RMIAConfig(**bad)
