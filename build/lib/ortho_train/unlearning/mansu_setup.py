"""Build a `MansuPlan` for a model: attribute, select, estimate the retain geometry, prune.

Steps (MANSU; maths in `mansu.py` and `attribution.py`):
1. forget and retain attribution of every linear output unit; select the units most specific
   to the forget set (a boolean row mask per linear weight);
2. magnitude floor (1 + margin)·bin width at every selected weight;
3. per-sequence retain gradients at those weights → diagonal Fisher and the retain span;
4. Fisher pruning: drop the weights whose floored move would cost most until the floor alone
   predicts at most `floor_budget_share · fisher_budget` nats/token of retain damage.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ortho_train.unlearning.attribution import select_components, unit_attribution
from ortho_train.unlearning.common import sequence_nll
from ortho_train.unlearning.mansu import (
    MansuPlan,
    MansuConfig,
    build_floor,
    fisher_prune,
    orthonormal_basis,
    per_sequence_gradients,
    predicted_damage,
)


def build_mansu_plan(model: nn.Module, forget_batches: Sequence[Mapping[str, Tensor]],
                     retain_batches: Sequence[Mapping[str, Tensor]], forget_scores: Mapping[str, Tensor],
                     settings: MansuConfig, names: Sequence[str], params: Mapping[str, nn.Parameter]) -> MansuPlan:
    """A plan over the weights `params[name]` (d_out, d_in) of the linears `names`.

    `forget_scores` are the forget-set unit attributions (computed by the caller, who keeps
    them for CAD); the retain ones are computed here on `retain_batches`.
    """
    if not forget_batches:
        raise ValueError("MANSU: the forget set is empty")
    retain_scores = unit_attribution(model, retain_batches[:settings.attribution_batches], sequence_nll, names)
    row_masks = select_components(forget_scores, retain_scores, settings.component_fraction)
    # row mask (d_out,) -> entry mask (d_out, d_in): a component is a whole weight row
    masks = {n: row_masks[n].to(params[n].device).unsqueeze(1).expand_as(params[n]).clone() for n in names}
    selected = [n for n in names if masks[n].any()]
    if not selected:
        raise ValueError("MANSU: no component is more attributed on the forget set than on the retain set")
    weights = {n: params[n].detach() for n in selected}
    floor = build_floor(weights, masks, selected, settings)  # (n,)
    grads, tokens = per_sequence_gradients(model, retain_batches, {n: params[n] for n in selected}, masks,
                                           settings.retain_sequences)  # (K, n), (K,)
    fisher = (grads.square() / tokens.clamp_min(1).unsqueeze(1)).mean(dim=0)  # (n,) per-token Fisher
    candidates = floor.numel()
    floor_damage_before = predicted_damage(floor, fisher)
    keep = fisher_prune(floor, fisher, settings.floor_budget_share * settings.fisher_budget)
    start = 0
    for name in selected:
        count = int(masks[name].sum())
        masks[name][masks[name].clone()] = keep[start:start + count]
        start += count
    selected = [n for n in selected if masks[n].any()]
    if not selected:
        raise ValueError("MANSU: the Fisher budget leaves no weight to update; raise fisher_budget")
    grads, floor, fisher = grads[:, keep], floor[keep], fisher[keep]
    basis = orthonormal_basis(grads, settings.nullspace_rtol)
    theta0 = torch.cat([params[n].detach()[masks[n]].float() for n in selected])
    total = sum(p.numel() for p in params.values())
    info = {
        "components_selected": int(sum(int(m.sum()) for m in row_masks.values())),
        "components_total": int(sum(m.numel() for m in row_masks.values())),
        "candidate_weights": candidates,
        "updated_weights": int(theta0.numel()),
        "updated_fraction_of_linear_weights": theta0.numel() / total,
        "floor_damage_before_pruning": floor_damage_before,
        "floor_damage": predicted_damage(floor, fisher),
        "retain_span_rank": int(basis.shape[1]),
        "retain_sequences": int(tokens.numel()),
        "layers": {n: int(masks[n].any(dim=1).sum()) for n in selected},
        "row_masks": {n: row_masks[n] for n in names},
    }
    return MansuPlan(names=selected, masks={n: masks[n] for n in selected}, theta0=theta0, floor=floor,
                     fisher=fisher, basis=basis, budget=settings.fisher_budget, info=info)
