"""KL minimisation on the retain set (KLR): stay close to the reference model on R.

MUSE (Shi et al. 2024), §4; TOFU (Maini et al. 2024) "KL" baseline; quantisation-robust LoRA unlearning uses GA+KLR:

    L_KLR-term = (1/N_R) Σ_{scored positions t of R} KL(p_ref(·|y_<t) ‖ p_θ(·|y_<t))
    L_GA+KLR   = −CE(F) + λ·L_KLR-term

The KL is over whole next-token distributions at the retain positions whose next label is
scored (pads masked), averaged per token. It is 0 at θ = ref; the reference is detached.
"""
from __future__ import annotations

from torch import Tensor

from ortho_train.unlearning.common import masked_kl
from ortho_train.unlearning.terms import require_reference


def retain_kl_loss(retain_logits: Tensor, ref_retain_logits: Tensor, retain_labels: Tensor) -> Tensor:
    """Token-mean ``KL(p_ref ‖ p_θ)`` on retain positions: the KLR term on its own (scalar)."""
    return masked_kl(ref_retain_logits, retain_logits, retain_labels)



class RetainKL:
    """Retain term ``KL(p_ref ‖ p_θ)|_R`` (KLR); needs the reference's retain logits."""

    needs_reference = True

    def __call__(self, logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, beta: float = 0.1) -> Tensor:
        return retain_kl_loss(logits, require_reference(self, ref_logits), labels)
