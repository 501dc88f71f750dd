"""Pick an unlearning loss by name: a forget term (GA or NPO) plus an optional retain term.

    name      forget term      retain term
    ga        −CE(F)           —
    gdr       −CE(F)           λ·CE(R)
    klr       −CE(F)           λ·KL(p_ref ‖ p_θ)|_R
    npo       L_NPO(β)         —
    npo_gdr   L_NPO(β)         λ·CE(R)
    npo_klr   L_NPO(β)         λ·KL(p_ref ‖ p_θ)|_R

`LOSSES` is the whole table: each name is a pair of terms from `FORGET_TERMS` and
`RETAIN_TERMS` (one class per term, in the method's own file; `ortho_train.unlearning.terms`).
A new combination is one line here; a new term is one file and one line here. All three are
`ortho_train.registry.Registry` tables: an unknown name is refused naming the setting and the choices.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ortho_train.registry import Registry
from ortho_train.unlearning.ga import GradientAscent
from ortho_train.unlearning.gdr import RetainCrossEntropy
from ortho_train.unlearning.klr import RetainKL
from ortho_train.unlearning.npo import NegativePreference
from ortho_train.unlearning.terms import LossTerm

FORGET_TERMS: Registry[LossTerm] = Registry("forget term")
FORGET_TERMS.add("ga", GradientAscent())
FORGET_TERMS.add("npo", NegativePreference())
RETAIN_TERMS: Registry[LossTerm] = Registry("retain term")
RETAIN_TERMS.add("gdr", RetainCrossEntropy())
RETAIN_TERMS.add("klr", RetainKL())

LOSSES: Registry[tuple[str, str | None]] = Registry("unlearning loss", setting="model.init_args.loss")
LOSSES.add("ga", ("ga", None))
LOSSES.add("gdr", ("ga", "gdr"))
LOSSES.add("klr", ("ga", "klr"))
LOSSES.add("npo", ("npo", None))
LOSSES.add("npo_gdr", ("npo", "gdr"))
LOSSES.add("npo_klr", ("npo", "klr"))


@dataclass(frozen=True)
class UnlearningObjective:
    """An unlearning loss and its hyper-parameters: ``loss = forget + λ·retain``.

    Args:
        name: one of `LOSSES` (ga, gdr, klr, npo, npo_gdr, npo_klr).
        beta: NPO inverse temperature β (MUSE and the quantisation-robust LoRA unlearning paper: 0.1).
        retain_weight: λ of the retain term.
    """

    name: str = "npo_gdr"
    beta: float = 0.1
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        LOSSES.get(self.name)  # an open table (str, not a Literal): refuses an unknown name
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be ≥ 0, got {self.retain_weight}")

    @property
    def forget(self) -> LossTerm:
        return FORGET_TERMS[LOSSES[self.name][0]]

    @property
    def retain(self) -> LossTerm | None:
        retain = LOSSES[self.name][1]
        return None if retain is None else RETAIN_TERMS[retain]

    @property
    def needs_reference(self) -> bool:
        """True when a frozen copy of the starting model must score some batch."""
        return self.forget.needs_reference or (self.retain is not None and self.retain.needs_reference)

    def __call__(self, forget_logits: Tensor, forget_labels: Tensor, ref_forget_logits: Tensor | None = None,
                 retain_logits: Tensor | None = None, retain_labels: Tensor | None = None,
                 ref_retain_logits: Tensor | None = None) -> dict[str, Tensor]:
        """``{"loss", "forget"[, "retain"]}`` (scalars)."""
        parts = {"forget": self.forget(forget_logits, forget_labels, ref_forget_logits, self.beta)}
        if self.retain is None:
            parts["loss"] = parts["forget"]
            return parts
        if retain_logits is None or retain_labels is None:
            raise ValueError(f"{self.name}: the retain term needs a retain batch")
        parts["retain"] = self.retain(retain_logits, retain_labels, ref_retain_logits, self.beta)
        parts["loss"] = parts["forget"] + self.retain_weight * parts["retain"]
        return parts
