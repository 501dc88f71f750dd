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
- "dsm": whole input columns of W_pre by the differentiated sensitivity metric of
  "A Geometric Theory of Functionally Sensitive Outlier Separability"
  (`ortho_train.sieve.dsm`): log(1 + a₁·Tr(H_j)) + a₂·‖W_{:, j}‖ + a₃·σ(A_j), Hutchinson
  traces of the loss Hessian and activation stds on `calibration_batches` *public* batches.
  Sees public data only.

The choices are a registry (`SUPPORTS`, an `ortho_train.registry.Registry`), name → mask builder
with what it sees as metadata (`support_choice` gives both as a `SupportChoice`): a new support is
one function of `SupportInputs` returning a bool mask per layer, plus one `@register_support` line
that says what it sees. A choice registered without `sees_canaries=True` gets canary batches that raise
when drawn, so it cannot read the private data by accident; DP-SGD refuses a choice that sees
them (its S would leak the secrets).

All are pure torch; `gradient_saliency` runs forward/backward passes on the given batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ortho_kernels import QuantisedBase
from ortho_train.models import eval_mode
from ortho_train.registry import REQUIRED, Registry
from ortho_train.sieve.dsm import DSMConfig, dsm_scores, dsm_support
from ortho_train.sieve.select import hinv_diagonal, impact_scores, top_fraction_mask


@dataclass
class SupportInputs:
    """What a support function may draw on at the switch, the model still at W_pre.

    Args:
        model: the model (not to be changed).
        modules: the linears to give a mask, by name relative to the model.
        config: the `IsolationConfig` (ρ, seeds, batch counts, per-support settings).
        bases: Q(W_pre) per layer.
        hessians: GPTQ Hessians of public calibration text per layer (empty unless the
            quantiser or the support needs them).
        public_batches: callable returning a fresh iterable of public LM batches.
        canary_batches: the same for canary batches (raises unless the choice sees canaries).
        loss_fn: callable(model, batch) -> mean loss.
    """

    model: nn.Module
    modules: dict[str, nn.Linear]
    config: Any
    bases: dict[str, QuantisedBase]
    hessians: dict[str, torch.Tensor]
    public_batches: Callable[[], Iterable[dict]]
    canary_batches: Callable[[], Iterable[dict]]
    loss_fn: Callable[[nn.Module, dict], torch.Tensor]


@dataclass(frozen=True)
class SupportChoice:
    """One registered support: its mask builder and what it sees."""

    name: str
    build: Callable[[SupportInputs], dict[str, torch.Tensor]]
    sees: str
    needs_hessians: bool = False
    sees_canaries: bool = False


# `fn(inputs: SupportInputs) -> {layer: bool mask}` per name. Metadata: `sees` is logged and written
# to the run summary; `needs_hessians` has the isolation set-up collect public-calibration Hessians
# for it; `sees_canaries` hands it the canary batches. An open registry: `support` is a str.
SUPPORTS: Registry[Callable[[SupportInputs], dict[str, torch.Tensor]]] = Registry(
    "isolation support", setting="model.init_args.isolation.support",
    meta={"sees": REQUIRED, "needs_hessians": False, "sees_canaries": False})
register_support = SUPPORTS.register  # @register_support("name", sees="…"[, needs_hessians=…, sees_canaries=…])


def support_choice(name: str) -> SupportChoice:
    """The registered support `name` with its metadata (a `SettingError` naming the choices otherwise)."""
    return SupportChoice(name, SUPPORTS.get(name), **SUPPORTS.meta(name))


def take(batches: Iterable[dict], count: int) -> list[dict]:
    """The first `count` batches of an iterable (fewer if it runs out)."""
    out = []
    for batch in batches:
        if len(out) >= count:
            break
        out.append(batch)
    return out


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
    with eval_mode(model):
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for (name, _), grad in zip(modules.items(), grads):
                if grad is not None:
                    scores[name] += grad.detach().float().square()
            seen += 1
    if seen == 0:
        raise ValueError("no batches for gradient saliency: the data loader is empty")
    return scores


def saliency_support(scores: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Top-ρ per layer of saliency scores: bool masks."""
    return {name: top_fraction_mask(score, rho) for name, score in scores.items()}


# ---------------------------------------------------------------- registered choices
@register_support("impact", sees="public calibration text (curvature) and the pre-fine-tuning weights",
                  needs_hessians=True)
def _impact(inputs: SupportInputs) -> dict[str, torch.Tensor]:
    cfg = inputs.config
    return {name: impact_support(m.weight, inputs.bases[name], inputs.hessians[name], cfg.rho, cfg.quant.damp)
            for name, m in inputs.modules.items()}


@register_support("saliency_public", sees="public text gradients at the pre-fine-tuning weights")
def _saliency_public(inputs: SupportInputs) -> dict[str, torch.Tensor]:
    batches = take(inputs.public_batches(), inputs.config.saliency_batches)
    return saliency_support(gradient_saliency(inputs.model, inputs.modules, batches, inputs.loss_fn),
                            inputs.config.rho)


@register_support("saliency_canary", sees="member-canary (private) gradients at the pre-fine-tuning weights",
                  sees_canaries=True)
def _saliency_canary(inputs: SupportInputs) -> dict[str, torch.Tensor]:
    batches = take(inputs.canary_batches(), inputs.config.saliency_batches)
    return saliency_support(gradient_saliency(inputs.model, inputs.modules, batches, inputs.loss_fn),
                            inputs.config.rho)


@register_support("random", sees="nothing (seeded draw)")
def _random(inputs: SupportInputs) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(inputs.config.seed)
    return {name: random_support(tuple(m.weight.shape), inputs.config.rho, generator).to(m.weight.device)
            for name, m in inputs.modules.items()}


@register_support("dsm", sees="public calibration text (Hessian traces, activation stds) and the "
                              "pre-fine-tuning weights")
def _dsm(inputs: SupportInputs) -> dict[str, torch.Tensor]:
    cfg = inputs.config
    batches = take(inputs.public_batches(), cfg.calibration_batches)
    scores = dsm_scores(inputs.model, inputs.modules, batches, inputs.loss_fn, cfg.dsm or DSMConfig())
    return dsm_support(scores, {name: tuple(m.weight.shape) for name, m in inputs.modules.items()}, cfg.rho)
