"""MUSE-style unlearning metrics (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way
Evaluation for Language Models"): VerbMem, KnowMem and PrivLeak.

Departure from MUSE: ROUGE-L is computed on token ids (or any token lists) rather than on
words of decoded text, so no tokenizer or ``rouge-score`` dependency is needed; pass word
lists to :func:`rouge_l_f1` for the word-level variant. Following the project design, the
F1 of ROUGE-L is reported (MUSE's code reports recall for some tables).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ortho_train.metrics.extraction import greedy_continuation


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


def rouge_l_f1(prediction_tokens, reference_tokens) -> float:
    """ROUGE-L F1 (Lin 2004): with L = LCS(pred, ref), P = L/|pred|, R = L/|ref|,
    ``F1 = 2PR/(P+R)``. Identical → 1, disjoint → 0; an empty side gives 0 (as ``rouge-score``).

    Accepts token lists or 1-D tensors (ids, words, characters…).
    """
    pred, ref = _as_list(prediction_tokens), _as_list(reference_tokens)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _as_sequences(ids) -> list[Tensor]:
    if isinstance(ids, Tensor):
        if ids.ndim != 2:
            raise ValueError("expected a (B, L) tensor or a list of 1-D tensors, "
                             f"got {tuple(ids.shape)}")
        return list(ids)
    return [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in ids]


def greedy_rouge_l_f1(model: nn.Module, prompt_ids, target_ids, batch_size: int = 64,
                      max_new_tokens: int | None = None,
                      stop_ids: Sequence[int] = ()) -> list[float]:
    """Per-example ROUGE-L F1 between the greedy continuation of each prompt and its target.

    Prompts may differ in length (a list of 1-D tensors): they are grouped by length and each
    group is decoded unpadded with :func:`~ortho_train.metrics.extraction.greedy_continuation`.
    Each prediction has ``len(target)`` tokens (or ``max_new_tokens``) and is cut before the
    first token in ``stop_ids``.
    """
    prompts, targets = _as_sequences(prompt_ids), _as_sequences(target_ids)
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    stop = set(stop_ids)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(prompt.numel(), []).append(i)
    scores = [math.nan] * len(prompts)
    for indices in by_length.values():
        lengths = [max_new_tokens or targets[i].numel() for i in indices]
        stacked = torch.stack([prompts[i] for i in indices])  # (b, P)
        generated = greedy_continuation(model, stacked, max(lengths), batch_size)  # (b, n)
        for row, i, n in zip(generated.tolist(), indices, lengths):
            prediction = row[:n]
            for pos, token in enumerate(prediction):
                if token in stop:
                    prediction = prediction[:pos]
                    break
            scores[i] = rouge_l_f1(prediction, targets[i])
    return scores


def verbmem(model: nn.Module, prefix_ids, continuation_ids, batch_size: int = 64) -> float:
    """VerbMem (MUSE §3): mean ROUGE-L F1 between the greedy continuation of each forget-set
    prefix (``len(true continuation)`` tokens) and the true continuation.

    Args:
        prefix_ids: (B, P) tensor or a list of 1-D tensors of varying length.
        continuation_ids: (B, S) tensor or a list of 1-D tensors.
    """
    scores = greedy_rouge_l_f1(model, prefix_ids, continuation_ids, batch_size)
    return sum(scores) / len(scores)


def knowmem(model: nn.Module, question_ids, answer_ids, batch_size: int = 64,
            max_new_tokens: int | None = None, stop_ids: Sequence[int] = ()) -> float:
    """KnowMem (MUSE §3): mean ROUGE-L F1 between the greedy answer to each (few-shot
    formatted) question and the true answer; decoding stops at ``stop_ids`` (e.g. newline/EOS).
    """
    scores = greedy_rouge_l_f1(model, question_ids, answer_ids, batch_size, max_new_tokens,
                               stop_ids)
    return sum(scores) / len(scores)


def privleak(auc_unlearned: float, auc_reference: float | None) -> float:
    """PrivLeak (MUSE §3): ``(AUC_unl − AUC_ref) / AUC_ref · 100``.

    Both AUCs come from the same MIA (MUSE: Min-40% on forget vs holdout); ``AUC_ref`` from a
    reference (retrained) model that never saw the forget set. ≈ 0 is ideal; positive means
    the forget set still looks member-like (under-unlearning), negative means it looks less
    member-like than a never-trained model would make it (over-unlearning). Raises
    ``ValueError`` without a real reference: substituting 0.5 would silently report a number
    that measures nothing.
    """
    if auc_reference is None or not math.isfinite(auc_reference) or auc_reference <= 0:
        raise ValueError(f"privleak needs the AUC of a reference model that never saw the forget "
                         f"set; got auc_reference={auc_reference!r}")
    if auc_unlearned is None or not math.isfinite(auc_unlearned):
        raise ValueError(f"privleak: invalid auc_unlearned={auc_unlearned!r}")
    return (auc_unlearned - auc_reference) / auc_reference * 100.0
