"""The attacks the tables add to a row: reference-model MIA, extraction@k, the one-run audit.

`AttackSuite(probe, metrics, settings, reference_model)` measures, for each model it is given,
the groups of `metrics` it owns (`ATTACK_METRICS`):

- `rmia`: offline RMIA against `reference_model` (`ortho_train.metrics.reference_mia`): keys
  `mia_auc_rmia`, `mia_auc_rmia_se`, `mia_tpr_at_1pct_fpr_rmia`, `mia_tpr_at_0.1pct_fpr_rmia` (None
  where the holdout count n does not resolve the FPR: n·FPR < 1) and `mia_holdout_count`;
- `extraction_at_k`: the members' extraction@k (`ortho_train.metrics.sampled_extraction`), key
  `extraction_at_k`;
- `audit`: the lower bound on ε of "Privacy Auditing with One (1) Training Run" from the RMIA (or
  LOSS) scores of members against holdout canaries (`ortho_train.privacy.audit`): keys
  `audit_epsilon_lb`, `audit_canaries`, `audit_guesses`, `audit_correct`, `audit_delta`.

The reference model's scores are computed once, at the first model measured. A suite asked for a
reference attack without a reference model refuses at construction, naming the setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ortho_train.attack_evaluation import ReferenceScores, rmia_evaluation, sampled_extraction_rate
from ortho_train.evaluation import canary_scores
from ortho_train.metrics.reference_mia import RMIAConfig
from ortho_train.metrics.sampled_extraction import SampledExtractionConfig
from ortho_train.privacy.audit import AuditConfig, one_run_audit

ATTACK_METRICS = ("rmia", "extraction_at_k", "audit")


@dataclass
class AttackSettings:
    """How the attacks run (`TableConfig`, `PrivacyTableConfig` and `PTQGapCallback` hold one each).

    Args:
        rmia: offline RMIA (mixing weight a, γ, population size, FPR levels).
        sampled_extraction: extraction@k (k, temperature, top-k, seed).
        audit: the one-run audit (guessed share, confidence, δ of a run without DP, seed, score).
    """

    rmia: RMIAConfig = field(default_factory=RMIAConfig)
    sampled_extraction: SampledExtractionConfig = field(default_factory=SampledExtractionConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def needs_reference(metrics: Sequence[str], settings: AttackSettings) -> bool:
    """The metrics need a reference model: `rmia`, or `audit` guessing from RMIA scores."""
    return "rmia" in metrics or ("audit" in metrics and settings.audit.score == "rmia")


class AttackSuite:
    """Measures the `ATTACK_METRICS` of `metrics` on each model (see the module docstring).

    Args:
        probe: members, holdout canaries and reference secrets.
        metrics: the requested metric groups (groups other than `ATTACK_METRICS` are ignored here).
        settings: the attacks' settings.
        reference_model: the model that never saw the members (None: refused when needed).
        setting: how the metrics list is named in a refusal (e.g. `table.metrics`).
        delta: δ of the audit (a DP run's own δ; None: `settings.audit.delta`).
    """

    def __init__(self, probe, metrics: Sequence[str], settings: AttackSettings, reference_model=None,
                 setting: str = "metrics", delta: float | None = None):
        self.probe, self.settings, self.delta = probe, settings, delta
        self.groups = tuple(m for m in metrics if m in ATTACK_METRICS)
        if needs_reference(self.groups, settings) and reference_model is None:
            raise ValueError(f"{setting}={list(metrics)}: rmia (and an audit with audit.score='rmia') needs a "
                             "reference model that never saw the canaries (the pre-canary model of an SFT run), "
                             "and none is available")
        self._reference_model = reference_model if needs_reference(self.groups, settings) else None
        self._reference: ReferenceScores | None = None

    @property
    def active(self) -> bool:
        """Any attack metric was asked for."""
        return bool(self.groups)

    @property
    def needs_scores(self) -> bool:
        """`measure` reads the model's `canary_scores` (rmia, audit; only with holdout canaries)."""
        return bool(set(self.groups) & {"rmia", "audit"}) and len(self.probe.holdout) > 0

    def reference(self) -> ReferenceScores:
        if self._reference is None:
            self._reference = ReferenceScores.of(self._reference_model, self.probe, self.settings.rmia)
            self._reference_model = None  # its numbers are all the suite needs
        return self._reference

    def measure(self, model, scores: dict | None = None) -> dict:
        """The suite's keys for `model` (`scores`: its `evaluation.canary_scores`, if computed)."""
        out: dict = {}
        if "extraction_at_k" in self.groups:
            out["extraction_at_k"] = sampled_extraction_rate(model, self.probe.members,
                                                             self.settings.sampled_extraction)
        if not self.needs_scores:
            return out
        scores = scores or canary_scores(model, self.probe)
        rmia = None
        if needs_reference(self.groups, self.settings):
            report, rmia = rmia_evaluation(model, self.probe, self.reference(), self.settings.rmia, scores)
            if "rmia" in self.groups:
                out |= report
        if "audit" in self.groups:
            guess = rmia or {"members": scores["members"]["loss"], "holdout": scores["holdout"]["loss"]}
            out |= one_run_audit(guess["members"], guess["holdout"], self.settings.audit, self.delta)
        return out


def attack_notes(metrics: Sequence[str], settings: AttackSettings, delta: float | None = None) -> list[str]:
    """The markdown notes of the attack columns present (their settings and what they assume)."""
    notes = []
    if "extraction_at_k" in metrics:
        notes.append(f"extraction@k: {settings.sampled_extraction.describe()} (so ≥ greedy extraction by "
                     "construction); exact match of the whole secret")
    if "rmia" in metrics:
        r = settings.rmia
        notes.append(f"RMIA: offline RMIA (\"Low-Cost High-Power Membership Inference Attacks\") against the "
                     f"pre-canary model, a = {r.a:g}, γ = {r.gamma:g}, {r.population} population secrets; "
                     "Pr(x|θ) = geometric mean of the secret's token probabilities; a TPR at FPR f is "
                     "'unresolved (n=N)' where N holdout canaries give N·f < 1")
    if "audit" in metrics:
        a = settings.audit
        notes.append(f"audit ε ≥: one-run lower bound (\"Privacy Auditing with One (1) Training Run\") at "
                     f"δ = {a.delta if delta is None else delta:g}, confidence {a.confidence:g}, from {a.score} "
                     f"scores; the members paired with as many random holdouts, guesses on "
                     f"{a.guess_fraction:g} of them (top half member, bottom half non-member); assumes the "
                     "members' uniform choice acts as independent ½-coins (an approximation)")
    return notes
