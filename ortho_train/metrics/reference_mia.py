"""Membership inference with a reference model: offline RMIA with one reference model.

Zarifzadeh, Liu, Cheng, Shokri 2024, "Low-Cost High-Power Membership Inference Attacks" (RMIA),
in its offline form (the reference model never trained on the targets) with one reference model θ_ref:

    Pr(x)          = ½ · ((1 + a) · Pr(x | θ_ref) + (1 − a))        (offline approximation of the
                                                                    IN/OUT mixture, a ∈ [0, 1])
    LR_θ(x, z)     = (Pr(x | θ) / Pr(x)) / (Pr(z | θ) / Pr(z))
    Score_MIA(x)   = (1/|Z|) · Σ_{z ∈ Z} 1[LR_θ(x, z) ≥ γ]

with Z population samples (drawn like the targets, none of them a target). A higher score means
"more likely a member"; the score is a fraction in [0, 1].

How it departs from the paper's image classifiers: Pr(x | θ) of a sequence is the geometric mean
of its scored tokens' probabilities, ``exp((1/n) Σ_t log p_t)`` (the exponential of the LOSS score
of `ortho_train.metrics.mia`): a product over 10 tokens is ~1e-10 and the offline term (1 − a)
would swamp it, while the per-token mean lies in (0, 1] like a class probability. The paper tunes
``a`` with a second reference model (simulating the attack on it); with one reference model
``a`` is a setting (default 0.3, the value open implementations of the paper ship).

The ROC summaries (on the scores with ties broken by the ratio, `tie_broken`) reuse `ortho_train.metrics.mia` (rank-based AUC, DeLong standard error, TPR at
a fixed FPR). A TPR at FPR f is reported only when the non-member count n resolves it: n·f ≥ 1
(at least one false positive is possible at f); otherwise it is *unresolved* and returned as None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ortho_train.metrics.mia import roc_auc, roc_auc_standard_error, tpr_at_fpr
from ortho_train.settings import check_settings


@dataclass
class RMIAConfig:
    """Offline RMIA settings (see the module docstring).

    Args:
        a: offline mixing weight in [0, 1]: Pr(x) = ½((1 + a)·Pr(x|θ_ref) + (1 − a)); a = 1 uses
            the reference model's probability alone.
        gamma: likelihood-ratio threshold γ > 0 of the pairwise test LR(x, z) ≥ γ.
        population: population samples z (reference secrets in holdout canaries' prefixes).
        population_prefixes: distinct holdout prefixes the population is spread over.
        fprs: FPR levels of the reported TPRs, each in (0, 1).
    """

    a: float = 0.3
    gamma: float = 1.0
    population: int = 1000
    population_prefixes: int = 20
    fprs: tuple[float, ...] = (0.01, 0.001)

    def __post_init__(self) -> None:
        self.fprs = tuple(float(f) for f in self.fprs)
        check_settings("rmia", [
            ("a", self.a, 0.0 <= self.a <= 1.0, "the offline mixing weight must lie in [0, 1]"),
            ("gamma", self.gamma, math.isfinite(self.gamma) and self.gamma > 0, "must be a finite number > 0"),
            ("population", self.population, self.population >= 1, "must be ≥ 1"),
            ("population_prefixes", self.population_prefixes, self.population_prefixes >= 1, "must be ≥ 1"),
            ("fprs", list(self.fprs), bool(self.fprs) and all(0.0 < f < 1.0 for f in self.fprs),
             "must be a non-empty list of rates in (0, 1)"),
        ])


def offline_prior(reference_logp: Tensor, a: float) -> Tensor:
    """Pr(x) = ½((1 + a)·exp(log Pr(x|θ_ref)) + (1 − a)), float64."""
    return 0.5 * ((1.0 + a) * reference_logp.double().exp() + (1.0 - a))


def likelihood_ratio(target_logp: Tensor, reference_logp: Tensor, a: float) -> Tensor:
    """Pr(x|θ) / Pr(x) per sample (float64), from log-probabilities of the target and reference model."""
    return target_logp.double().exp() / offline_prior(reference_logp, a)


def rmia_scores(target_logp: Tensor, reference_logp: Tensor, population_target_logp: Tensor,
                population_reference_logp: Tensor, a: float = 0.3, gamma: float = 1.0) -> Tensor:
    """Score_MIA(x) = mean_z 1[ratio(x) / ratio(z) ≥ γ] for each target x (float64 in [0, 1]).

    Args:
        target_logp / reference_logp: (N,) log Pr(x|θ) and log Pr(x|θ_ref) of the targets.
        population_target_logp / population_reference_logp: (Z,) the same for the population.
    """
    if target_logp.shape != reference_logp.shape or population_target_logp.shape != population_reference_logp.shape:
        raise ValueError("rmia_scores: target and reference log-probabilities must have the same shape")
    if population_target_logp.numel() == 0:
        raise ValueError("rmia_scores: needs at least one population sample")
    ratio_x = likelihood_ratio(target_logp, reference_logp, a).reshape(-1, 1)  # (N, 1)
    ratio_z = likelihood_ratio(population_target_logp, population_reference_logp, a).reshape(1, -1)  # (1, Z)
    return (ratio_x / ratio_z >= gamma).double().mean(dim=1)  # (N,)


def tie_broken(scores: Tensor, target_logp: Tensor, reference_logp: Tensor, a: float, population: int) -> Tensor:
    """`scores` (fractions of |Z| = `population`, spaced ≥ 1/|Z|) plus less than 1/(2|Z|) that
    orders equal scores by the likelihood ratio Pr(x|θ)/Pr(x) itself:
    ``s + (atan(log ratio)/π + ½) / (2|Z|)``.

    Why: the score saturates at 1 for every x that beats all of Z. With |Z| = 1,000 and 2,000
    non-members about two of them do so by chance and tie with the members there, so no threshold
    reaches an FPR of 0.1% (measured on the quickstart: TPR 0.0 at AUC 0.999). For a fixed γ the
    score is a non-decreasing function of the ratio, so the ratio's order is the order a larger
    population would give; ``floor(s·|Z|)/|Z|`` recovers the fraction.
    """
    log_ratio = likelihood_ratio(target_logp, reference_logp, a).log()
    return scores.double() + (torch.atan(log_ratio) / math.pi + 0.5) / (2 * population)


def tpr_resolved(n_nonmember: int, fpr: float) -> bool:
    """An empirical TPR at FPR f is resolved when n·f ≥ 1: at least one false positive is allowed."""
    return n_nonmember * fpr >= 1.0 - 1e-9


def fpr_label(fpr: float) -> str:
    """`0.01` → `1pct`, `0.001` → `0.1pct` (the spelling of the `mia_tpr_at_<label>_fpr_*` keys)."""
    return f"{100 * fpr:g}pct"


def reference_mia_report(member_scores: Tensor, nonmember_scores: Tensor, fprs=(0.01, 0.001),
                         name: str = "rmia") -> dict[str, float | None]:
    """`mia_auc_<name>`, `mia_auc_<name>_se` (DeLong) and `mia_tpr_at_<f>_fpr_<name>` for each f
    (None where unresolved: n·f < 1), plus `mia_holdout_count` = n."""
    n = int(torch.as_tensor(nonmember_scores).numel())
    out: dict[str, float | None] = {
        f"mia_auc_{name}": roc_auc(member_scores, nonmember_scores),
        f"mia_auc_{name}_se": roc_auc_standard_error(member_scores, nonmember_scores),
    }
    for fpr in fprs:
        resolved = tpr_resolved(n, fpr)
        out[f"mia_tpr_at_{fpr_label(fpr)}_fpr_{name}"] = tpr_at_fpr(member_scores, nonmember_scores, fpr) \
            if resolved else None
    out["mia_holdout_count"] = n
    return out
