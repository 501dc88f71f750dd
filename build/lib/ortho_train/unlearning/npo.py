"""Negative Preference Optimization (NPO) and its retain-regularised variants.

Zhang, Lin, Bai, Mei 2024, "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning", eq. (3), written with sequence NLLs over the answer tokens:

    L_NPO = −(2/β) · mean_{(x,y)∈F} log σ( β · (NLL_θ(y|x) − NLL_ref(y|x)) ),   β = 0.1

At θ = ref every term is log σ(0) = −ln 2, so L_NPO = (2/β)·ln 2 (13.86 for β = 0.1).
dL/dNLL_θ = −2·σ(−β·ΔNLL) < 0: descending L raises the forget NLL, with a weight that fades
once the forget answer is already unlikely (what keeps NPO from GA's collapse).
NLL here is the *sum* over the answer tokens (sequence log-likelihood ratio); a widespread
bug feeds raw logits or token means instead.

Variants (MUSE; quantisation-robust LoRA unlearning): NPO+GDR adds λ·CE(R); NPO+KLR adds λ·KL(p_ref ‖ p_θ)
on R (`ortho_train.unlearning.objective.LOSSES`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ortho_train.unlearning.common import sequence_nll
from ortho_train.unlearning.terms import require_reference


def npo_loss_from_nll(nll: Tensor, ref_nll: Tensor, beta: float = 0.1) -> Tensor:
    """``−(2/β)·mean log σ(β·(NLL_θ − NLL_ref))`` from (B,) sequence NLLs (scalar)."""
    if beta <= 0:
        raise ValueError(f"NPO needs beta > 0, got {beta}")
    if nll.shape != ref_nll.shape:
        raise ValueError(f"NLL shapes differ: {tuple(nll.shape)} vs reference {tuple(ref_nll.shape)}")
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll.detach())).mean()


def npo_loss(forget_logits: Tensor, forget_labels: Tensor, ref_forget_logits: Tensor, beta: float = 0.1) -> Tensor:
    """NPO on a forget batch from the model's and the frozen reference's logits (scalar)."""
    return npo_loss_from_nll(sequence_nll(forget_logits, forget_labels),
                             sequence_nll(ref_forget_logits, forget_labels), beta)



class NegativePreference:
    """Forget term ``L_NPO(β)``; needs the reference's forget logits."""

    needs_reference = True

    def __call__(self, logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, beta: float = 0.1) -> Tensor:
        return npo_loss(logits, labels, require_reference(self, ref_logits), beta)
