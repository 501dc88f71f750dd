"""An empirical lower bound on ε from one training run.

Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run": m canaries, each
included in training independently with probability ½; after training, an auditor guesses "member"
for the k+ highest membership scores, "non-member" for the k− lowest, and abstains on the rest
(r = k+ + k− guesses). If the training algorithm is (ε, δ)-DP, the number W of correct guesses
satisfies (their Theorem 3 with the δ term of its proof, the algorithm of their appendix):

    P[W ≥ v] ≤ β + 2·m·δ·α,   q = e^ε / (1 + e^ε),
    β = P[Binomial(r, q) ≥ v],
    α = max_{i = 1..v} (1/i) · P[v − i ≤ Binomial(r, q) < v].

The audit reports the largest ε whose p-value β + 2mδα stays below 1 − confidence (bisection on
ε; the p-value grows with ε): with probability ≥ confidence over the inclusion coins, the run is not
(ε', δ)-DP for any ε' below it. A bound of 0 means the guesses are consistent with ε = 0.

How it is applied to the toolkit's canaries (the randomisation assumption, stated honestly): all
canaries are drawn alike (id and secret), and a seeded uniform subset of fixed size becomes the
members (`ortho_train.canaries.make_canaries`); the rest are holdouts. The theorem wants independent
½-coins; a uniform split of fixed size is sampling without replacement, not independent coins,
and with 20 members among 2,000 holdouts the prior is far from ½. So the audit pairs the n members
with n holdouts picked uniformly at random (its own seed): given that set of m = 2n canaries, which
n are members is a uniform balanced split, and the bound is computed as if each had been an
independent ½-coin. That step is an approximation this code does not prove.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from scipy.stats import binom
from torch import Tensor

from ortho_train.settings import check_settings

AuditScore = Literal["rmia", "loss"]


@dataclass
class AuditConfig:
    """One-run audit settings.

    Args:
        guess_fraction: share of the m audited canaries guessed on, half as members (top scores)
            and half as non-members (bottom scores); the rest abstain. 1: guess on every canary.
        confidence: confidence of the lower bound (0.95 in the paper).
        delta: δ of the null hypothesis for a run without DP-SGD (a DP run uses its own δ).
        seed: picks the holdouts paired with the members and breaks score ties.
        score: the membership score guessed from: `rmia` (needs a reference model) or `loss`.
    """

    guess_fraction: float = 0.5
    confidence: float = 0.95
    delta: float = 1e-5
    seed: int = 0
    score: AuditScore = "rmia"

    def __post_init__(self) -> None:
        check_settings("audit", [
            ("guess_fraction", self.guess_fraction, 0.0 < self.guess_fraction <= 1.0, "must lie in (0, 1]"),
            ("confidence", self.confidence, 0.0 < self.confidence < 1.0, "must lie in (0, 1)"),
            ("delta", self.delta, 0.0 <= self.delta < 1.0, "must lie in [0, 1)"),
            ("score", self.score, self.score in ("rmia", "loss"), "must be 'rmia' or 'loss'"),
        ])


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ≥ v correct guesses out of r (m canaries) under (ε, δ)-DP: min(1, β + 2mδα)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) ≥ v]
    alpha, below = 0.0, 0.0  # below = P[v − i ≤ Binomial(r, q) < v]
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                        iterations: int = 40) -> float:
    """Largest ε with p-value < 1 − confidence (bisection; 0 when even ε = 0 is not rejected)."""
    level = 1.0 - confidence
    if audit_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, r, v, high, delta) < level:  # v = r = m and δ = 0 stay finite: q → 1
        low, high = high, 2 * high
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if audit_p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def audit_guesses(member_scores: Tensor, nonmember_scores: Tensor, guess_fraction: float,
                  generator: torch.Generator) -> dict[str, int]:
    """Pair the members with as many random non-members, guess, count: `{m, r, v, k_plus, k_minus}`.

    n = min(#members, #non-members) of each side are taken uniformly at random; k+ = k− =
    ⌊guess_fraction · n⌋ (at least 1). Ties are broken by a random permutation before the sort.
    """
    member = torch.as_tensor(member_scores, dtype=torch.float64).reshape(-1)
    nonmember = torch.as_tensor(nonmember_scores, dtype=torch.float64).reshape(-1)
    n = min(member.numel(), nonmember.numel())
    if n == 0:
        raise ValueError("the audit needs at least one member and one non-member score")
    if not torch.isfinite(torch.cat([member, nonmember])).all():
        raise ValueError("audit scores contain NaN/inf")
    member = member[torch.randperm(member.numel(), generator=generator)[:n]]
    nonmember = nonmember[torch.randperm(nonmember.numel(), generator=generator)[:n]]
    scores = torch.cat([member, nonmember])  # (2n,)
    is_member = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    shuffle = torch.randperm(2 * n, generator=generator)  # ties fall in random order
    order = shuffle[scores[shuffle].argsort(descending=True, stable=True)]  # highest first
    k = max(1, int(guess_fraction * n))
    correct = int(is_member[order[:k]].sum()) + int((~is_member[order[2 * n - k:]]).sum())
    return {"m": 2 * n, "r": 2 * k, "v": correct, "k_plus": k, "k_minus": k}


def one_run_audit(member_scores: Tensor, nonmember_scores: Tensor, config: AuditConfig,
                  delta: float | None = None) -> dict[str, float | int]:
    """`audit_epsilon_lb` with its counts (`audit_canaries` m, `audit_guesses` r, `audit_correct` v),
    `audit_delta` and `audit_confidence`; `delta` overrides `config.delta` (a DP run's own δ)."""
    delta = config.delta if delta is None else delta
    generator = torch.Generator().manual_seed(config.seed)
    counts = audit_guesses(member_scores, nonmember_scores, config.guess_fraction, generator)
    bound = epsilon_lower_bound(counts["m"], counts["r"], counts["v"], delta, config.confidence)
    return {"audit_epsilon_lb": bound, "audit_canaries": counts["m"], "audit_guesses": counts["r"],
            "audit_correct": counts["v"], "audit_delta": delta, "audit_confidence": config.confidence}
