"""The one-run audit ("Privacy Auditing with One (1) Training Run"): hand values, separability."""
import math

import pytest
import torch

from ortho_train.privacy.audit import AuditConfig, audit_guesses, audit_p_value, epsilon_lower_bound, one_run_audit
from ortho_train.settings import SettingError


def test_p_value_matches_a_hand_computation():
    """m = 10, r = 2, v = 2, ε = ln 3 (q = 3/4), δ = 0.01: β = q² = 0.5625; α = max(P[B=1]/1,
    (P[B=1] + P[B=0])/2) = max(0.375, 0.21875) = 0.375; p = 0.5625 + 2·10·0.01·0.375 = 0.6375."""
    assert audit_p_value(10, 2, 2, math.log(3), 0.01) == pytest.approx(0.6375)
    assert audit_p_value(10, 2, 2, math.log(3), 0.0) == pytest.approx(0.5625)


def test_bound_of_all_correct_guesses_without_delta_is_closed_form():
    """v = r = m = 10, δ = 0: p(ε) = q^10 < 0.05 ⇔ q < 0.05^(1/10) ⇒ ε = log(q / (1 − q))."""
    q = 0.05 ** 0.1
    assert epsilon_lower_bound(10, 10, 10, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert epsilon_lower_bound(10, 4, 4, 0.0, 0.95) == 0.0  # 0.5⁴ = 0.0625 ≥ 0.05: ε = 0 not rejected
    # δ only adds to the p-value: the bound can only shrink
    assert epsilon_lower_bound(10, 10, 10, 1e-3) <= epsilon_lower_bound(10, 10, 10, 0.0)


def test_guess_counts_on_a_small_case():
    """3 members (5, 4, 3) and 3 non-members (2, 1, 0), guessing on a third: k = 1 each side;
    the top score (5) is a member, the bottom (0) a non-member → r = 2, v = 2, m = 6."""
    counts = audit_guesses(torch.tensor([5.0, 4.0, 3.0]), torch.tensor([2.0, 1.0, 0.0]), 1 / 3,
                           torch.Generator().manual_seed(0))
    assert counts == {"m": 6, "r": 2, "v": 2, "k_plus": 1, "k_minus": 1}
    swapped = audit_guesses(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([5.0, 4.0, 3.0]), 1.0,
                            torch.Generator().manual_seed(0))
    assert swapped["v"] == 0 and swapped["r"] == 6


def test_bound_grows_with_separability():
    """Perfectly separated scores give a larger bound than random ones (same counts, same seed)."""
    g = torch.Generator().manual_seed(1)
    config = AuditConfig(guess_fraction=1.0, delta=1e-5)
    separated = one_run_audit(torch.rand(100, generator=g) + 1, torch.rand(1000, generator=g), config)
    random = one_run_audit(torch.rand(100, generator=g), torch.rand(1000, generator=g), config)
    assert separated["audit_canaries"] == 200 and separated["audit_correct"] == 200
    assert separated["audit_epsilon_lb"] > 3.0 > random["audit_epsilon_lb"]
    assert random["audit_epsilon_lb"] < 0.5


def test_bad_settings_name_the_setting():
    for bad, name in (({"guess_fraction": 0.0}, "audit.guess_fraction"), ({"confidence": 1.0}, "audit.confidence"),
                      ({"score": "vibes"}, "audit.score")):
        with pytest.raises(SettingError, match=name):
            AuditConfig(**bad)
