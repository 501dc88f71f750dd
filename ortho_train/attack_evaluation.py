"""Reference-model MIA, extraction@k and the one-run audit over a `MemorisationProbe`.

The probe-level side of `ortho_train.metrics.reference_mia` (offline RMIA),
`ortho_train.metrics.sampled_extraction` and `ortho_train.privacy.audit`, used by the run's final
summary and by the measurement tables (docs/methods.md §2):

- `log Pr(x | θ)` of a canary is the LOSS score of `evaluation.canary_scores`: the mean log-prob of
  the secret's tokens after the canary prefix;
- the RMIA population Z: reference secrets (drawn like every canary's secret, none of them a
  canary's) placed after the prefixes of the first `population_prefixes` holdout canaries, each
  prefix taking an equal share; ids and secrets are then drawn like a non-member canary's;
- `ReferenceScores` holds the reference model's numbers, computed once per reference model;
- the audit (`ortho_train.privacy.audit.one_run_audit`) takes the RMIA or LOSS scores as they are.

Nothing here logs or returns text or secrets.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from ortho_train import metrics
from ortho_train.evaluation import canary_scores
from ortho_train.metrics.reference_mia import RMIAConfig, reference_mia_report, rmia_scores, tie_broken
from ortho_train.metrics.sampled_extraction import SampledExtractionConfig, extraction_at_k
from ortho_train.models import eval_mode
from ortho_train.token_datasets import MemorisationProbe, TokenisedCanaries


@torch.no_grad()
def population_log_probs(model, probe: MemorisationProbe, config: RMIAConfig) -> Tensor:
    """(Z,) mean log-prob (nats per token) of each population secret after its holdout prefix."""
    prefixes = probe.holdout.prefix_ids[:config.population_prefixes]
    if not prefixes:
        raise ValueError("the RMIA population needs holdout canaries (data.num_holdout_canaries ≥ 1)")
    secrets = probe.reference_secret_ids[:config.population]
    if not secrets:
        raise ValueError("the RMIA population needs reference secrets (data.num_reference_secrets ≥ 1)")
    out = []
    with eval_mode(model):
        for p, prefix in enumerate(prefixes):
            share = secrets[p::len(prefixes)]  # secret j goes to prefix j mod len(prefixes)
            groups: dict[int, list[Tensor]] = defaultdict(list)
            for secret in share:
                groups[len(secret)].append(secret)
            for length, group in groups.items():
                bits = metrics.secret_log_perplexity(model, prefix, torch.stack(group))  # (g,) Σ −log2 p
                out.append(-bits * math.log(2) / length)
    return torch.cat(out).double()


@dataclass
class ReferenceScores:
    """log Pr(·|θ_ref) of the members (N_m,), holdouts (N_h,) and population (Z,) under one reference model."""

    members: Tensor
    holdout: Tensor
    population: Tensor

    @classmethod
    def of(cls, reference_model, probe: MemorisationProbe, config: RMIAConfig) -> "ReferenceScores":
        scores = canary_scores(reference_model, probe)
        return cls(scores["members"]["loss"], scores["holdout"]["loss"],
                   population_log_probs(reference_model, probe, config))


def rmia_evaluation(model, probe: MemorisationProbe, reference: ReferenceScores, config: RMIAConfig,
                    scores: dict | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(`mia_auc_rmia`, its SE, `mia_tpr_at_<f>_fpr_rmia` or None, `mia_holdout_count`) and the RMIA
    scores `{"members", "holdout"}` of `model` (ties broken by the ratio: `tie_broken`); `scores`:
    its `canary_scores`, if already computed."""
    scores = scores or canary_scores(model, probe)
    population = population_log_probs(model, probe, config)

    def score(target: Tensor, ref: Tensor) -> Tensor:  # the RMIA fraction, ties ordered by the ratio
        fraction = rmia_scores(target, ref, population, reference.population, config.a, config.gamma)
        return tie_broken(fraction, target, ref, config.a, len(population))

    found = {"members": score(scores["members"]["loss"], reference.members),
             "holdout": score(scores["holdout"]["loss"], reference.holdout)}
    return reference_mia_report(found["members"], found["holdout"], config.fprs), found


def sampled_extraction_rate(model, canaries: TokenisedCanaries, config: SampledExtractionConfig) -> float:
    """extraction@k of `canaries`: the share whose secret the greedy continuation or any of k samples gives."""
    generator = torch.Generator().manual_seed(config.seed)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (prefix, secret) in enumerate(zip(canaries.prefix_ids, canaries.secret_ids)):
        groups[(len(prefix), len(secret))].append(index)
    hits = 0
    for rows in groups.values():
        prefixes = torch.stack([canaries.prefix_ids[i] for i in rows])  # (G, P)
        secrets = torch.stack([canaries.secret_ids[i] for i in rows])  # (G, S)
        hits += int(extraction_at_k(model, prefixes, secrets, config, generator).sum())
    return hits / len(canaries)



def rmia_summary(model, reference_state_dict: dict | None, probe: MemorisationProbe,
                 scores: dict | None = None, config: RMIAConfig | None = None) -> dict:
    """The final summary's RMIA keys (`rmia_evaluation`) against the model holding
    `reference_state_dict` (the pre-canary weights), plus `rmia_settings`; {} without a reference
    state or holdout canaries."""
    if reference_state_dict is None or not len(probe.holdout):
        return {}
    config = config or RMIAConfig()
    reference = copy.deepcopy(model)
    reference.load_state_dict(reference_state_dict)
    report, _ = rmia_evaluation(model, probe, ReferenceScores.of(reference.eval(), probe, config), config, scores)
    settings = {"reference": "pre-canary model", "a": config.a, "gamma": config.gamma,
                "population": config.population, "unresolved": "a TPR is null where holdouts · FPR < 1"}
    return report | {"rmia_settings": settings}
