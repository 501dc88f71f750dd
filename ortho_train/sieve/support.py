"""Supports S for isolation by construction: which entries a private fine-tune may move.

S is fixed *before* fine-tuning, per linear layer, as the top-ρ entries of a score (or a
seeded random draw). What each choice looks at matters for the privacy claim:

- "impact": curvature-weighted impact R²/[H⁻¹]_jj of the pre-fine-tuning weights' own
  quantisation residual R = W_pre − dequant(Q(W_pre)), H from *public* calibration text.
  Sees public data only.
- "saliency_public": empirical-Fisher saliency Σ_b (∂L_public/∂W)² over public batches at
  W_pre. Sees public data only.
- "saliency_canary": the same on the canary loss (the member canaries), at W_pre, before any
  update. Sees the *private* data: S then encodes where the private gradient is large
  (the values stay in the ortho stream; the base Q(W_pre) never depends on private data).
- "random": a seeded uniform draw. Sees nothing.

All are pure torch; `gradient_saliency` runs forward/backward passes on the given batches.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ortho_kernels import QuantisedBase
from ortho_train.sieve.select import hinv_diagonal, impact_scores, top_fraction_mask

SUPPORTS = ("impact", "saliency_public", "saliency_canary", "random")
SUPPORT_SEES = {
    "impact": "public calibration text (curvature) and the pre-fine-tuning weights",
    "saliency_public": "public text gradients at the pre-fine-tuning weights",
    "saliency_canary": "member-canary (private) gradients at the pre-fine-tuning weights",
    "random": "nothing (seeded draw)",
}


def impact_support(w_pre: torch.Tensor, base: QuantisedBase, hessian: torch.Tensor, rho: float,
                   damp: float = 0.01) -> torch.Tensor:
    """Top-ρ of R²/[H⁻¹]_jj with R = W_pre − dequant(base): bool (N, K)."""
    residual = w_pre.detach().float() - base.dequantise()  # (N, K)
    return top_fraction_mask(impact_scores(residual, hinv_diagonal(hessian, damp)), rho)


def random_support(shape: tuple[int, int], rho: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly ceil(ρ·N·K) uniformly drawn entries: bool (N, K)."""
    score = torch.rand(shape, generator=generator)
    return top_fraction_mask(score, rho)


def gradient_saliency(model: nn.Module, modules: dict[str, nn.Linear],
                      batches: Iterable[dict[str, torch.Tensor]],
                      loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Σ_b (∂L_b/∂W)² per listed linear (empirical Fisher diagonal), model left unchanged.

    Gradients of other parameters are not kept; existing `.grad` fields are restored.
    """
    params = [m.weight for m in modules.values()]
    scores = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in modules.items()}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for (name, _), grad in zip(modules.items(), grads):
                if grad is not None:
                    scores[name] += grad.detach().float().square()
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batches for gradient saliency: the data loader is empty")
    return scores


def saliency_support(scores: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Top-ρ per layer of saliency scores: bool masks."""
    return {name: top_fraction_mask(score, rho) for name, score in scores.items()}
