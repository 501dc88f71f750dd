"""What an unlearning loss is made of: a forget term and an optional retain term.

A term is a callable ``term(logits, labels, ref_logits, beta) -> scalar`` with a class attribute
`needs_reference`: whether the frozen starting model must score the same batch (NPO, KLR). The
module computes reference logits for a batch exactly when its term asks for them. A new term is
one class in its own file and one line in `objective.FORGET_TERMS` or `objective.RETAIN_TERMS`.
"""
from __future__ import annotations

from typing import ClassVar, Protocol

from torch import Tensor


class LossTerm(Protocol):
    needs_reference: ClassVar[bool]

    def __call__(self, logits: Tensor, labels: Tensor, ref_logits: Tensor | None, beta: float) -> Tensor:
        """The term's value on one batch (scalar); `beta` is the objective's NPO temperature."""


def require_reference(term: object, ref_logits: Tensor | None) -> Tensor:
    """`ref_logits`, or a clear error naming the term that needs them."""
    if ref_logits is None:
        raise ValueError(f"{type(term).__name__} needs the reference model's logits of the batch")
    return ref_logits
