"""MANSU pieces (MANSU, "Mechanistic-Aligned Null-Space Unlearning"), pure torch.

Three constraints turn an ordinary forget-loss descent into an update that a 4-bit deployment
cannot round away:

1. *Circuit restriction*: only the weight rows of the components (linear output units) most
   specific to the forget behaviour may change (`attribution.select_components`).
2. *Retain null space with a diagonal-Fisher bound*: per-sequence retain gradients g_k
   (restricted to those rows) span the directions that change the retain loss to first
   order; each applied step s is projected onto their orthogonal complement,
   ``s ← s − Q Qᵀ s`` (Q an orthonormal basis of span{g_k}). Second-order damage is
   bounded with the empirical diagonal Fisher ``F_i = mean_k g_{k,i}² / T_k`` (per token):
   the predicted retain KL ``D(Δ) = ½ Σ_i F_i Δ_i²`` must stay ≤ `fisher_budget` nats/token.
3. *Magnitude floor*: every updated weight ends at ``|Δ_i| ≥ (1 + margin)·b_i``, b_i the bin
   width of its quantisation block (`WeightFormat.bin_width`: NF4 block of 64 or INT4 group), so it
   leaves its rounding interval by construction.

The floor fixes the least damage an update can do, ``½ Σ F_i b_i²``; weights whose floored
move would cost most are dropped before training (`fisher_prune`) until the floor alone uses
at most `floor_budget_share` of the budget, and during training the part of |Δ| above the
floor is shrunk whenever D(Δ) would exceed the budget (`fisher_bound`). The update direction
comes from the optimiser (any forget loss); the constraints act on the *applied* update after
each optimiser step, so Adam's re-entry into the retain directions (docs/methods.md §7) is undone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ortho_train.metrics import token_logprobs
from ortho_train.models import eval_mode
from ortho_train.quantisation import PTQConfig, canonical_format, deployment_format, deployment_formats


@dataclass
class MansuConfig:
    """MANSU hyper-parameters.

    Args:
        component_fraction: share of all linear output units chosen as the forget circuit.
        attribution_batches: forget and retain batches used for the attribution scores.
        retain_sequences: retain sequences whose gradients span the protected subspace and
            estimate the diagonal Fisher.
        fisher_budget: bound on the predicted retain damage ½ Σ F Δ² (nats per token).
        floor_budget_share: share of the budget the magnitude floor alone may use (pruning).
        floor_format: grid of the magnitude floor, a registered deployment format ('nf4', 'fp4',
            'int4_rtn').
        blocksize: NF4/FP4 block size of the floor grid.
        group_size: INT4 group size of the floor grid.
        floor_margin: the floor is (1 + margin) bin widths.
        nullspace_rtol: singular values below rtol·max are not part of the retain span.
    """

    component_fraction: float = 0.02
    attribution_batches: int = 4
    retain_sequences: int = 32
    fisher_budget: float = 0.05
    floor_budget_share: float = 0.5
    floor_format: str = "nf4"
    blocksize: int = 64
    group_size: int = 128
    floor_margin: float = 0.1
    nullspace_rtol: float = 1e-6

    def __post_init__(self) -> None:
        if not 0 < self.component_fraction <= 1:
            raise ValueError(f"component_fraction must be in (0, 1], got {self.component_fraction}")
        if self.fisher_budget <= 0 or not 0 < self.floor_budget_share <= 1:
            raise ValueError("fisher_budget must be > 0 and floor_budget_share in (0, 1]")
        if canonical_format(self.floor_format) not in deployment_formats():
            raise ValueError(f"floor_format must be one of {deployment_formats()}, got {self.floor_format!r}")
        self.floor_settings()  # a blocksize bitsandbytes cannot deploy fails here
        if self.floor_margin < 0 or self.retain_sequences < 1 or self.attribution_batches < 1:
            raise ValueError("floor_margin ≥ 0, retain_sequences ≥ 1 and attribution_batches ≥ 1 required")

    def floor_settings(self) -> PTQConfig:
        """The quantisation settings of the floor grid (`blocksize`, `group_size`)."""
        return PTQConfig(blocksize=self.blocksize, group_size=self.group_size)


def per_sequence_gradients(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], params: Mapping[str, Tensor],
                           masks: Mapping[str, Tensor], max_sequences: int) -> tuple[Tensor, Tensor]:
    """Gradients of each sequence's summed NLL at the masked entries: (K, n) and token counts (K,)."""
    device = next(model.parameters()).device
    rows, counts = [], []
    with eval_mode(model):
        for batch in batches:
            for b in range(batch["input_ids"].shape[0]):
                if len(rows) == max_sequences:
                    break
                ids = batch["input_ids"][b:b + 1].to(device)  # (1, T)
                labels = batch["labels"][b:b + 1].to(device)
                with torch.enable_grad():
                    logits = model(input_ids=ids, attention_mask=batch["attention_mask"][b:b + 1].to(device)).logits
                    logp, mask = token_logprobs(logits, labels)
                    grads = torch.autograd.grad(-logp.sum(), list(params.values()))
                rows.append(torch.cat([g[masks[n]].float() for n, g in zip(params, grads)]))
                counts.append(mask.sum().item())
    if not rows:
        raise ValueError("MANSU: the retain set gave no sequences for the Fisher/null-space estimate")
    return torch.stack(rows), torch.tensor(counts, dtype=torch.float32, device=rows[0].device)


def orthonormal_basis(vectors: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis (n, r) of the span of the rows of `vectors` (K, n), via SVD in float64."""
    u, s, _ = torch.linalg.svd(vectors.double().T, full_matrices=False)  # u: (n, K)
    keep = s > rtol * s.max().clamp_min(1e-30)
    return u[:, keep].to(vectors.dtype)


def project_out(v: Tensor, basis: Tensor) -> Tensor:
    """``v − Q Qᵀ v``: the component of v orthogonal to the span of Q's columns."""
    return v - basis @ (basis.T @ v)


def apply_floor(delta: Tensor, floor: Tensor, fallback: Tensor) -> Tensor:
    """``sign(Δ)·max(|Δ|, floor)``; where Δ = 0 the sign of `fallback` (else +) is used."""
    sign = torch.where(delta != 0, delta.sign(), fallback.sign())
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return sign * torch.maximum(delta.abs(), floor)


def predicted_damage(delta: Tensor, fisher: Tensor) -> float:
    """``½ Σ F_i Δ_i²`` (nats per token under the diagonal-Fisher approximation)."""
    return 0.5 * float((fisher.double() * delta.double().square()).sum())


def fisher_bound(delta: Tensor, floor: Tensor, fisher: Tensor, budget: float) -> Tensor:
    """Shrink the part of |Δ| above the floor by s ∈ [0, 1] so that ½ Σ F Δ² ≤ budget.

    With e = |Δ| − floor: ½ΣF(floor + s e)² = a s² + b s + c, solved for the largest s.
    """
    if predicted_damage(delta, fisher) <= budget:
        return delta
    f = fisher.double()
    excess = (delta.abs() - floor).clamp_min(0).double()
    a = 0.5 * float((f * excess.square()).sum())
    b = float((f * floor.double() * excess).sum())
    c = 0.5 * float((f * floor.double().square()).sum())
    if c >= budget or a == 0:
        s = 0.0
    else:
        s = (-b + math.sqrt(b * b + 4 * a * (budget - c))) / (2 * a)
    return delta.sign() * (floor + s * excess.to(delta.dtype))


def fisher_prune(floor: Tensor, fisher: Tensor, allowance: float) -> Tensor:
    """Keep the entries with the smallest floor damage ½F b² while their sum ≤ `allowance`."""
    damage = 0.5 * fisher.double() * floor.double().square()  # (n,)
    order = torch.argsort(damage)
    keep_sorted = torch.cumsum(damage[order], 0) <= allowance
    keep = torch.zeros_like(damage, dtype=torch.bool)
    keep[order[keep_sorted]] = True
    return keep


@dataclass
class MansuPlan:
    """Where MANSU may move weights and how far, over a flat vector of the masked entries.

    `masks[name]` (d_out, d_in) selects the updatable entries of each linear weight; flat
    vectors concatenate `w[masks[name]]` in `names` order.
    """

    names: list[str]
    masks: dict[str, Tensor]
    theta0: Tensor  # (n,) original values of the masked entries
    floor: Tensor  # (n,) magnitude floor (1 + margin)·bin width
    fisher: Tensor  # (n,) diagonal Fisher per token
    basis: Tensor  # (n, r) orthonormal basis of the retain-gradient span
    budget: float
    info: dict = field(default_factory=dict)

    def gather(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].detach()[self.masks[n]].float() for n in self.names])  # (n,)

    @torch.no_grad()
    def scatter_(self, params: Mapping[str, Tensor], flat: Tensor) -> None:
        start = 0
        for name in self.names:
            mask = self.masks[name]
            count = int(mask.sum())
            params[name].data[mask] = flat[start:start + count].to(params[name].dtype)
            start += count

    @torch.no_grad()
    def constrain_(self, params: Mapping[str, Tensor], before: Tensor) -> dict[str, float]:
        """Project the step just applied (params − `before`), floor and bound the total update."""
        step = project_out(self.gather(params) - before, self.basis)
        delta = (before - self.theta0) + step
        delta = fisher_bound(apply_floor(delta, self.floor, step), self.floor, self.fisher, self.budget)
        self.scatter_(params, self.theta0 + delta)
        return {"damage": predicted_damage(delta, self.fisher),
                "min_floor_ratio": float((delta.abs() / self.floor).min()) if delta.numel() else float("nan")}


def build_floor(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], names: list[str],
                settings: MansuConfig) -> Tensor:
    """(1 + margin) × the bin width at each masked entry, flat (n,)."""
    grid, grid_settings = deployment_format(settings.floor_format), settings.floor_settings()
    return torch.cat([
        (1 + settings.floor_margin) * grid.bin_width(weights[n], grid_settings)[masks[n]].to(weights[n].device)
        for n in names
    ])
