"""ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"), implemented here
rather than through ``rouge-score`` (not a dependency of the toolkit).

With L = LCS(prediction, reference), the longest common subsequence of the two token lists,
``P = L/|prediction|``, ``R = L/|reference|`` and ``F1 = 2PR/(P+R)``; an empty side (or L = 0)
gives 0 for all three, as ``rouge-score`` does.

Tokens can be anything comparable: token ids (the canary metrics), or words of a text.
:func:`rouge_tokens` splits a text the way ``rouge-score``'s default tokenizer does
(lower-case, every run of characters outside ``[a-z0-9]`` is a separator), so the word-level
scores of the benchmark papers (MUSE, TOFU) can be reproduced from decoded text. ``rouge-score``'s
optional Porter stemmer (``use_stemmer=True``, which TOFU's own code sets): pass ``stem=`` a word →
stem callable, e.g. ``ortho_train.metrics.porter.porter_stem`` (the published algorithm; ``nltk``'s
default mode, which ``rouge-score`` uses, departs from it on a few words), applied to the words
longer than 3 characters as ``rouge-score`` does. Without it, two words differing only by
inflection ("killed", "kill") do not match.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from torch import Tensor

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


class RougeL(NamedTuple):
    precision: float
    recall: float
    f1: float


def _as_list(tokens) -> list:
    return tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(|a|·|b|) time, O(|b|) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction_tokens, reference_tokens) -> RougeL:
    """ROUGE-L precision, recall and F1 of a prediction against a reference (module docstring).

    Accepts token lists or 1-D tensors (ids, words, characters…).
    """
    pred, ref = _as_list(prediction_tokens), _as_list(reference_tokens)
    lcs = lcs_length(pred, ref) if pred and ref else 0
    if lcs == 0:
        return RougeL(0.0, 0.0, 0.0)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return RougeL(precision, recall, 2 * precision * recall / (precision + recall))


def rouge_l_f1(prediction_tokens, reference_tokens) -> float:
    """ROUGE-L F1 ``2PR/(P+R)``. Identical → 1, disjoint → 0; an empty side gives 0."""
    return rouge_l(prediction_tokens, reference_tokens).f1


def rouge_l_recall(prediction_tokens, reference_tokens) -> float:
    """ROUGE-L recall ``LCS/|reference|``: the share of the reference recovered, in order (TOFU's
    ROUGE metric)."""
    return rouge_l(prediction_tokens, reference_tokens).recall


def rouge_tokens(text: str, stem: Callable[[str], str] | None = None) -> list[str]:
    """Words of `text` as ``rouge-score``'s default tokenizer makes them: lower-cased, split at
    every run of characters outside ``[a-z0-9]``; with `stem`, words longer than 3 characters
    are replaced by their stem."""
    words = _NON_ALPHANUMERIC.sub(" ", text.lower()).split()
    if stem is None:
        return words
    return [stem(w) if len(w) > 3 else w for w in words]


def text_rouge_l(prediction: str, reference: str, stem: Callable[[str], str] | None = None) -> RougeL:
    """Word-level ROUGE-L of two texts (:func:`rouge_tokens` on each)."""
    return rouge_l(rouge_tokens(prediction, stem), rouge_tokens(reference, stem))
