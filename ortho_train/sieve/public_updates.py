"""Public base updates of an isolated canary SFT: the tensor work behind the module's hooks.

The weights off the support S (and every unsieved parameter) learn from public batches only,
through the α = 0 model; S learns from the whole batch (`ortho_train.sieve.isolation`,
`IsolationConfig.public_base_updates`). Per step:
1. `alpha_zero_public_grads`: ∇ of the public loss with S at its frozen public values;
2. the ordinary backward of the full loss (public + canaries);
3. `merge_public_grads_`: g ← where(S, g_full, g_public); unsieved parameters take g_public;
4. `clip_split_`: the public and the private parts clipped to the norm bound each;
5. AdamW's step, then `scale_public_update_`: the update off S scaled by public_lr / sft_lr.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ortho_train.sieve.isolation import IsolatedSupport


def support_masks_by_param(model: nn.Module, support: IsolatedSupport) -> dict[int, torch.Tensor]:
    """id(weight) -> S (bool, same shape) for every sieved weight."""
    return {id(w): support.masks[name].to(w.device) for name, w in support.weights(model).items()}


def alpha_zero_public_grads(model: nn.Module, support: IsolatedSupport,
                            public_loss: Callable[[], torch.Tensor]
                            ) -> tuple[dict[int, torch.Tensor | None], torch.Tensor]:
    """(id(param) -> ∇ public_loss(), the detached loss), evaluated with S at its frozen
    public values (α = 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with support.alpha_zero(model):
        loss = public_loss()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p): g for p, g in zip(params, grads)}, loss.detach()


def merge_public_grads_(model: nn.Module, public: dict[int, torch.Tensor | None],
                        masks: dict[int, torch.Tensor]) -> None:
    """p.grad ← where(S, p.grad, g_public) for sieved weights, g_public for the rest."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        g = public.get(id(p))
        g = torch.zeros_like(p) if g is None else g
        mask = masks.get(id(p))
        p.grad = g if mask is None or p.grad is None else torch.where(mask, p.grad, g)


@torch.no_grad()
def scale_public_update_(model: nn.Module, before: dict[int, torch.Tensor], ratio: float,
                         masks: dict[int, torch.Tensor]) -> None:
    """W ← W_before + ratio·(W − W_before) off S and on unsieved parameters; S untouched."""
    for p in model.parameters():
        old = before.get(id(p))
        if old is None:
            continue
        scaled = old + ratio * (p - old)
        mask = masks.get(id(p))
        p.copy_(scaled if mask is None else torch.where(mask, p, scaled))


def clip_split_(params: list[nn.Parameter], masks: dict[int, torch.Tensor], max_norm: float) -> None:
    """Clip the public part (off S, and unsieved parameters) and the private part (on S) of
    the gradients to `max_norm` each, in place. `masks` maps id(param) -> S of a sieved weight."""
    public_sq = private_sq = 0.0
    for p in params:
        if p.grad is None:
            continue
        mask = masks.get(id(p))
        if mask is None:
            public_sq += float(p.grad.square().sum())
        else:
            sq = p.grad.square()
            on = float(sq[mask].sum())
            private_sq, public_sq = private_sq + on, public_sq + float(sq.sum()) - on
    public_c = min(1.0, max_norm / (public_sq ** 0.5 + 1e-6))
    private_c = min(1.0, max_norm / (private_sq ** 0.5 + 1e-6))
    for p in params:
        if p.grad is None:
            continue
        mask = masks.get(id(p))
        if mask is None:
            p.grad.mul_(public_c)
        else:
            p.grad.mul_(torch.where(mask, private_c, public_c))
