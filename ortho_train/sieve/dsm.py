"""The differentiated sensitivity metric (DSM) of the HOP/DQC paper ("A Geometric Theory of
Functionally Sensitive Outlier Separability", §4.4), per input column of a linear layer.

    DSM_j = log(1 + a₁·Tr(H_j)) + a₂·‖W_{:, j}‖₂ + a₃·σ(A_j)

The parameter group i is an *input column* j of a linear y = x Wᵀ (W: N × K): the N weights
that multiply input feature j. That is the grouping of the paper's HOP algorithm (per column
w_i of W, the GPTQ sweep order) and the one in which all three terms are defined:
- Tr(H_j) = Σ_i ∂²L/∂W_ij², the trace of the loss Hessian's diagonal block of column j,
  estimated with Hutchinson's estimator (Rademacher z, E[z ⊙ Hz] = diag H):
      diag H ≈ (1/m) Σ_{r=1..m} z_r ⊙ (H z_r),  Tr(H_j) ≈ Σ_i [diag H]_ij,
  H z by double backward (∇(∇L · z)); the probe spans all listed weights at once, so the
  estimate of each column's trace is unbiased, with variance from the off-diagonal terms;
- ‖W_{:, j}‖₂ the L2 norm of the column;
- σ(A_j) the standard deviation of input feature j over calibration tokens (pads masked).

As a sieve score: `column_scores_to_weight` broadcasts the (K,) score over the rows, so top-ρ
selection keeps whole high-DSM columns (ties inside a column broken by position); `dsm_support`
gives the masks. It is the isolation support `dsm` (`isolation: {support: dsm, dsm: {a1, a2,
a3, probes, seed}}`, registered in `ortho_train.sieve.support`): scores of the pre-fine-tuning
model on `calibration_batches` *public* batches, never a canary, so S carries nothing of the
secrets. Hugging Face models run eager attention during the estimate
(`ortho_train.attention`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ortho_train.hooks import LayerInputHooks
from ortho_train.models import eval_mode, requires_grad_as
from ortho_train.attention import eager_attention
from ortho_train.sieve.select import top_fraction_mask


@dataclass
class DSMConfig:
    """Weights of the DSM terms and the Hutchinson budget.

    Args:
        a1: weight of the Hessian trace inside the log.
        a2: weight of the column norm.
        a3: weight of the activation std.
        probes: Rademacher probes m of Hutchinson's estimator.
        seed: seed of the probes.
    """

    a1: float = 1.0
    a2: float = 1.0
    a3: float = 1.0
    probes: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.a1, self.a2, self.a3) < 0:
            raise ValueError(f"DSM weights a1, a2, a3 must be ≥ 0, got {self.a1}, {self.a2}, {self.a3}")
        if self.probes < 1:
            raise ValueError(f"DSM probes must be ≥ 1, got {self.probes}")


def hutchinson_diagonal(loss_fn: Callable[[], torch.Tensor], params: dict[str, torch.Tensor],
                        probes: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """(1/m) Σ_r z_r ⊙ H z_r per tensor (same shapes): an unbiased estimate of diag H of
    `loss_fn()` with respect to `params` (which must require grad)."""
    tensors = list(params.values())
    loss = loss_fn()
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    estimate = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    for r in range(probes):
        z = [(torch.randint(0, 2, p.shape, generator=generator, device=generator.device) * 2 - 1)
             .to(device=p.device, dtype=p.dtype) for p in tensors]  # Rademacher ±1
        hz = torch.autograd.grad(grads, tensors, grad_outputs=z, retain_graph=r < probes - 1)
        for e, zi, hzi in zip(estimate, z, hz):
            e += (zi * hzi).float()
    return {name: e / probes for name, e in zip(params, estimate)}


class ActivationStats(LayerInputHooks):
    """Forward pre-hooks: running mean and second moment of each listed linear's input features."""

    def __init__(self, modules: dict[str, nn.Linear]):
        super().__init__(modules)
        self.sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}
        self.squares = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}
        self.tokens = {n: 0 for n in modules}

    def observe(self, name: str, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])  # (tokens, K)
        if self.token_mask is not None and self.token_mask.shape == x.shape[:-1]:
            rows = rows[self.token_mask.reshape(-1).bool().to(rows.device)]  # (kept, K)
        rows = rows.double().cpu()
        self.sums[name] += rows.sum(dim=0)
        self.squares[name] += rows.square().sum(dim=0)
        self.tokens[name] += rows.shape[0]

    def std(self) -> dict[str, torch.Tensor]:
        """σ(A_j) (K,) per layer: sqrt(E[x²] − E[x]²) over the tokens seen."""
        out = {}
        for name, count in self.tokens.items():
            if count == 0:
                raise ValueError(f"no calibration token reached layer {name!r}")
            mean = self.sums[name] / count
            out[name] = (self.squares[name] / count - mean.square()).clamp(min=0).sqrt().float()
        return out


def dsm_column_scores(weight: torch.Tensor, trace: torch.Tensor, activation_std: torch.Tensor,
                      config: DSMConfig) -> torch.Tensor:
    """DSM_j (K,) of one linear from its weight (N, K), Tr(H_j) (K,) and σ(A_j) (K,).

    A Hutchinson estimate may come out slightly negative for a near-zero trace: it is clamped
    at 0 inside the log."""
    k = weight.shape[1]
    if trace.shape != (k,) or activation_std.shape != (k,):
        raise ValueError(f"trace and activation_std must be ({k},), got {tuple(trace.shape)}, "
                         f"{tuple(activation_std.shape)}")
    column_norm = weight.detach().float().norm(dim=0)  # (K,)
    return (torch.log1p(config.a1 * trace.float().clamp(min=0)) + config.a2 * column_norm
            + config.a3 * activation_std.float().to(column_norm.device))


def dsm_scores(model: nn.Module, modules: dict[str, nn.Linear], batches: Iterable[dict],
               loss_fn: Callable[[nn.Module, dict], torch.Tensor], config: DSMConfig
               ) -> dict[str, torch.Tensor]:
    """DSM_j (K,) per listed linear: Hutchinson traces of the mean loss over `batches` and
    activation stds from the same forward passes. The model is left unchanged."""
    batches = list(batches)
    if not batches:
        raise ValueError("DSM needs at least one calibration batch")
    weights = {name: m.weight for name, m in modules.items()}
    with eval_mode(model), requires_grad_as(weights.values(), True):
        stats = ActivationStats(modules)

        def mean_loss() -> torch.Tensor:
            with stats:
                total = 0.0
                for batch in batches:
                    stats.token_mask = batch.get("attention_mask")
                    total = total + loss_fn(model, batch)
            return total / len(batches)

        device = next(iter(weights.values())).device
        generator = torch.Generator(device=device).manual_seed(config.seed)
        with eager_attention(model):  # SDPA's CPU backward has no double backward
            diagonal = hutchinson_diagonal(mean_loss, weights, config.probes, generator)
    stds = stats.std()
    return {name: dsm_column_scores(weights[name], diagonal[name].sum(dim=0), stds[name], config)
            for name in modules}


def column_scores_to_weight(score: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A per-column score (K,) as a per-entry score (N, K): every row gets its column's score."""
    return score[None, :].expand(shape)  # (N, K)


def dsm_support(scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                rho: float) -> dict[str, torch.Tensor]:
    """Top-ρ masks per layer of the column DSM broadcast to the weight: whole columns first."""
    return {name: top_fraction_mask(column_scores_to_weight(scores[name], shapes[name]).contiguous(), rho)
            for name in scores}
