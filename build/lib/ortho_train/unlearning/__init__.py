"""Unlearning: losses (pure functions of logits and labels) and MANSU pieces.

One file per loss term (`ga`, `gdr`, `klr`, `npo`), shared maths in `common`; `objective` picks a
loss by name; `attribution`, `mansu` and `mansu_setup` implement MANSU (Mechanistic-Aligned
Null-Space Unlearning). Whether an update survives quantisation (bin widths, PTQ copies) is
`ortho_train.quantisation`'s. No Lightning here.
"""
from ortho_train.unlearning.common import masked_kl, prompt_masked_labels, sequence_nll, token_mean_nll
from ortho_train.unlearning.ga import ga_loss
from ortho_train.unlearning.gdr import retain_ce_loss
from ortho_train.unlearning.klr import retain_kl_loss
from ortho_train.unlearning.npo import npo_loss, npo_loss_from_nll
from ortho_train.unlearning.objective import FORGET_TERMS, LOSSES, RETAIN_TERMS, UnlearningObjective

__all__ = [
    "FORGET_TERMS",
    "LOSSES",
    "RETAIN_TERMS",
    "UnlearningObjective",
    "ga_loss",
    "masked_kl",
    "npo_loss",
    "npo_loss_from_nll",
    "prompt_masked_labels",
    "retain_ce_loss",
    "retain_kl_loss",
    "sequence_nll",
    "token_mean_nll",
]
