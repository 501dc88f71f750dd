"""Split a fine-tuning task vector into a low-rank "general" part and a residual "memorised" part.

Per weight matrix, with the task vector τ = W_ft − W_base and its SVD τ = U diag(σ) Vᵀ
(float64, σ descending):

    k      = smallest rank with Σ_{i≤k} σ_i² ≥ energy · Σ_i σ_i²      (default energy 0.9)
    τ_gen  = U_k diag(σ_k) V_kᵀ          τ_mem = τ − τ_gen
    W_clean = W_base + τ_gen

(the spectral task-vector split of the K-FAC / orthogonal-gradient task-vector method: the
claim is that memorised content sits in the low-energy tail). At energy 1.0, k is the number
of non-zero singular values and τ_gen = τ up to float64 round-off.

The "naive pruning" baseline keeps, per matrix, the `budget` entries of τ with the largest
magnitude and zeroes the rest, at the parameter budget of the rank-k factors:

    budget = k · (d_out + d_in)     (U_k·diag(σ_k) and V_k; σ folded into one factor)

capped at d_out·d_in. A sparse matrix also stores indices, so at equal budget the pruned
task vector costs more bits than the factors; the rule matches *numbers*, not bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ortho_train.models import linear_layers


@dataclass
class LayerSplit:
    """What the split kept of one matrix.

    Attributes:
        rank: k, the rank of τ_gen.
        full_rank: min(d_out, d_in).
        energy: Σ_{i≤k} σ_i² / Σ σ_i² actually kept (1.0 for a zero task vector).
        budget: k·(d_out + d_in) capped at d_out·d_in, the naive-pruning budget.
    """

    rank: int
    full_rank: int
    energy: float
    budget: int


@dataclass
class SVDSplitResult:
    """`state_dict`: W_clean for the split keys, the other entries per `rest_from`."""

    state_dict: dict[str, Tensor]
    layers: dict[str, LayerSplit]


def _check_energy(energy: float) -> None:
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"svd split: energy must be in (0, 1], got {energy}")


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy·Σ σ_i² (σ descending); 0 when all σ are 0."""
    _check_energy(energy)
    power = singular_values.double() ** 2
    total = power.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(power, 0)  # (r,)
    k = int(torch.searchsorted(cumulative, energy * total)) + 1
    nonzero = int((singular_values > 0).sum())
    return min(k, nonzero)  # round-off can push energy·total past the last partial sum


def svd_split(tau: Tensor, energy: float = 0.9) -> tuple[Tensor, Tensor, LayerSplit]:
    """(τ_gen, τ_mem, LayerSplit) of one matrix τ (d_out, d_in); parts in float64."""
    if tau.dim() != 2:
        raise ValueError(f"svd split: the task vector must be a matrix, got shape {tuple(tau.shape)}")
    t = tau.double()
    u, s, vh = torch.linalg.svd(t, full_matrices=False)  # (m, r), (r,), (r, n)
    k = energy_rank(s, energy)
    gen = (u[:, :k] * s[:k]) @ vh[:k]  # (d_out, d_in)
    total = float((s**2).sum())
    kept = 1.0 if total == 0 else float((s[:k] ** 2).sum()) / total
    d_out, d_in = t.shape
    budget = min(k * (d_out + d_in), d_out * d_in)
    return gen, t - gen, LayerSplit(k, min(d_out, d_in), kept, budget)


def magnitude_prune(tau: Tensor, budget: int) -> Tensor:
    """τ with all but its `budget` largest-magnitude entries zeroed (ties: `topk`'s order)."""
    if budget < 0:
        raise ValueError(f"magnitude prune: budget must be ≥ 0, got {budget}")
    flat = tau.flatten()  # (d_out*d_in,)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), min(budget, flat.numel())).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tau)


def linear_weight_keys(model: nn.Module, include_lm_head: bool = False) -> list[str]:
    """State-dict keys of the `nn.Linear` weights (the default set to split)."""
    return [f"{name}.weight" for name in linear_layers(model, include_lm_head)]


def _matrix_keys(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                 keys: Iterable[str] | None) -> list[str]:
    if keys is None:
        return [k for k, v in finetuned.items()
                if v.dim() == 2 and v.is_floating_point() and k in base]
    keys = list(keys)
    missing = [k for k in keys if k not in base or k not in finetuned]
    if missing:
        raise KeyError(f"svd split: keys missing from a state dict: {missing[:3]}")
    for k in keys:
        if base[k].shape != finetuned[k].shape:
            raise ValueError(f"svd split: {k!r} has shape {tuple(base[k].shape)} in the base and "
                             f"{tuple(finetuned[k].shape)} in the fine-tune")
    return keys


def _rest(base, finetuned, rest_from: str) -> dict[str, Tensor]:
    sources = {"finetuned": finetuned, "base": base}
    if rest_from not in sources:
        raise ValueError(f"svd split: rest_from must be one of {sorted(sources)}, got {rest_from!r}")
    return {k: v.clone() for k, v in sources[rest_from].items()}


def svd_split_state_dict(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                         energy: float = 0.9, keys: Iterable[str] | None = None,
                         rest_from: str = "finetuned") -> SVDSplitResult:
    """W_clean = W_base + τ_gen for every key in `keys`, and what each split kept.

    Args:
        base, finetuned: state dicts of the same architecture.
        energy: spectral energy τ_gen keeps, in (0, 1].
        keys: matrices to split; default every 2-D floating-point entry of both (embeddings
            and LM head included: pass `linear_weight_keys(model)` for the linears only).
        rest_from: where the entries not split come from, "finetuned" or "base".
    """
    _check_energy(energy)
    out = _rest(base, finetuned, rest_from)
    layers = {}
    for key in _matrix_keys(base, finetuned, keys):
        w_base = base[key]
        gen, _, layers[key] = svd_split(finetuned[key].double() - w_base.double(), energy)
        out[key] = (w_base.double() + gen).to(w_base.dtype)
    return SVDSplitResult(out, layers)


def pruned_state_dict(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                      budgets: Mapping[str, int], rest_from: str = "finetuned") -> dict[str, Tensor]:
    """W_base + magnitude_prune(τ, budget) for every key of `budgets`.

    Use the split's budgets for the matched baseline:
    `{k: s.budget for k, s in svd_split_state_dict(...).layers.items()}`.
    """
    out = _rest(base, finetuned, rest_from)
    for key in _matrix_keys(base, finetuned, budgets.keys()):
        tau = finetuned[key].double() - base[key].double()
        out[key] = (base[key].double() + magnitude_prune(tau, budgets[key])).to(base[key].dtype)
    return out
