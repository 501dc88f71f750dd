"""The public-text anchor of the ortho stream: KL(α = 0 ‖ α = 1) on public batches.

With `IsolationConfig.support_objective = "canaries_kl"` the entries on the support S learn

    L_S = NLL_canaries(α = 1) + λ · (1/M) Σ_{t ∈ public labels} KL(p_α0(·|x_<t) ‖ p_α1(·|x_<t)),

λ = `public_kl_weight`, M the number of public label positions. The public model (α = 0)
learns the public text; the ortho stream is asked only to add the canaries while leaving the
public model's next-token distributions where they are (a distillation anchor), instead of
learning the public text a second time at its own, much larger learning rate.

The target distributions come from the α = 0 forward that the public base updates run anyway
(`AlphaZeroTargets.nll_and_keep`), or, once the base is frozen or without public updates, from
one extra no-grad forward (`AlphaZeroTargets.refresh`). Full logits are held for the public
label positions only: M·V floats per tensor (2 × 63 × 262,144 × 4 B = 132 MB for Gemma 3 at
batch 2 × 64), a few copies at a time.
"""
from __future__ import annotations

import torch
from torch import nn


def label_logprobs_full(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax rows at the public label positions, their labels): shapes (M, V) and (M,).

    Position t predicts `labels[:, t + 1]`; positions whose label is -100 are dropped."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    keep = labels != -100  # (B, T-1)
    rows = logits[:, :-1][keep]  # (B, T-1, V) -> (M, V)
    return rows.float().log_softmax(-1), labels[keep]


def kl_from_reference(reference_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_ref ‖ p) = Σ_v p_ref (log p_ref − log p); both (M, V) log-probs."""
    return (reference_logp.exp() * (reference_logp - logp)).sum(-1).mean()


class AlphaZeroTargets:
    """The α = 0 model's log-probs on the current public batch, kept detached as KL targets."""

    def __init__(self) -> None:
        self.logp: torch.Tensor | None = None

    def nll_and_keep(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean NLL of `batch` under `model` (with grad; the caller holds α = 0), keeping its
        log-probs detached as the targets."""
        logp, labels = label_logprobs_full(model, batch)
        self.logp = logp.detach()
        return -logp.gather(1, labels[:, None]).mean()

    @torch.no_grad()
    def refresh(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """No-grad α = 0 pass (the caller holds α = 0): targets and the batch's mean NLL."""
        logp, labels = label_logprobs_full(model, batch)
        self.logp = logp
        return -logp.gather(1, labels[:, None]).mean()

    def kl(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL(α = 0 ‖ model) on `batch` with grad, model's detached mean NLL); uses the targets once."""
        if self.logp is None:
            raise RuntimeError("no α = 0 targets for this batch: call nll_and_keep or refresh first")
        logp, labels = label_logprobs_full(model, batch)
        kl = kl_from_reference(self.logp, logp)
        self.logp = None
        return kl, -logp.detach().gather(1, labels[:, None]).mean()
