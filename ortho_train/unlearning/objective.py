"""Pick an unlearning loss by name: a forget term (GA or NPO) plus an optional retain term.

    name      forget term      retain term
    ga        −CE(F)           —
    gdr       −CE(F)           λ·CE(R)
    klr       −CE(F)           λ·KL(p_ref ‖ p_θ)|_R
    npo       L_NPO(β)         —
    npo_gdr   L_NPO(β)         λ·CE(R)
    npo_klr   L_NPO(β)         λ·KL(p_ref ‖ p_θ)|_R

The table is the whole registry: the parts are the per-method functions of `ga`, `gdr`, `klr`
and `npo`, so `UnlearningObjective("npo_gdr")(...)["loss"]` equals `npo_gdr_loss(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ortho_train.unlearning.ga import ga_loss
from ortho_train.unlearning.gdr import retain_ce_loss
from ortho_train.unlearning.klr import retain_kl_loss
from ortho_train.unlearning.npo import npo_loss

LOSSES: dict[str, tuple[str, str | None]] = {
    "ga": ("ga", None),
    "gdr": ("ga", "gdr"),
    "klr": ("ga", "klr"),
    "npo": ("npo", None),
    "npo_gdr": ("npo", "gdr"),
    "npo_klr": ("npo", "klr"),
}


@dataclass(frozen=True)
class UnlearningObjective:
    """An unlearning loss and its hyper-parameters.

    Args:
        name: one of `LOSSES` (ga, gdr, klr, npo, npo_gdr, npo_klr).
        beta: NPO inverse temperature β (MUSE and the quantisation-robust LoRA unlearning paper: 0.1).
        retain_weight: λ of the retain term.
    """

    name: str = "npo_gdr"
    beta: float = 0.1
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"unknown unlearning loss {self.name!r}; choose one of {sorted(LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be ≥ 0, got {self.retain_weight}")

    @property
    def forget_term(self) -> str:
        return LOSSES[self.name][0]

    @property
    def retain_term(self) -> str | None:
        return LOSSES[self.name][1]

    @property
    def needs_reference(self) -> bool:
        """True when a frozen copy of the starting model must score the batch (NPO, KLR)."""
        return self.forget_term == "npo" or self.retain_term == "klr"

    @property
    def needs_retain(self) -> bool:
        return self.retain_term is not None

    def __call__(self, forget_logits: Tensor, forget_labels: Tensor, ref_forget_logits: Tensor | None = None,
                 retain_logits: Tensor | None = None, retain_labels: Tensor | None = None,
                 ref_retain_logits: Tensor | None = None) -> dict[str, Tensor]:
        """``{"loss", "forget"[, "retain"]}``; `loss = forget + λ·retain` (scalars)."""
        if self.forget_term == "npo":
            if ref_forget_logits is None:
                raise ValueError(f"{self.name}: NPO needs the reference model's forget logits")
            forget = npo_loss(forget_logits, forget_labels, ref_forget_logits, self.beta)
        else:
            forget = ga_loss(forget_logits, forget_labels)
        parts = {"forget": forget}
        if self.retain_term is not None:
            if retain_logits is None or retain_labels is None:
                raise ValueError(f"{self.name}: the retain term needs a retain batch")
            if self.retain_term == "gdr":
                parts["retain"] = retain_ce_loss(retain_logits, retain_labels)
            else:
                if ref_retain_logits is None:
                    raise ValueError(f"{self.name}: KLR needs the reference model's retain logits")
                parts["retain"] = retain_kl_loss(retain_logits, ref_retain_logits, retain_labels)
            parts["loss"] = forget + self.retain_weight * parts["retain"]
        else:
            parts["loss"] = forget
        return parts
