"""MUSE-style unlearning metrics (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way
Evaluation for Language Models"): VerbMem, KnowMem and PrivLeak.

Departure from MUSE: :func:`verbmem` and :func:`knowmem` compute ROUGE-L on token ids rather
than on words of decoded text, so they need no tokenizer; the F1 of ROUGE-L is reported, as
MUSE's own code does (``mean_rougeL`` is rouge-score's F-measure). The word-level scores of the
benchmark, from decoded text, are in ``ortho_train.measurement.benchmarks.muse_eval`` (ROUGE-L
itself: ``ortho_train.metrics.rouge``).

PrivLeak's AUC comes in two orientations. MUSE's code scores the holdout texts as the positive
class against the forget texts (:func:`muse_privleak_auc`), so a model that still remembers its
forget set has AUC near 0 and PrivLeak near −100 (the paper's sign: negative = under-unlearning).
The toolkit's MIA tables report the usual orientation (forget = members), AUC' = 1 − AUC, for
which :func:`privleak` gives the opposite sign. The formula is the same; say which AUC you pass.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ortho_train.metrics.extraction import greedy_continuation
from ortho_train.metrics.mia import roc_auc
from ortho_train.metrics.rouge import lcs_length, rouge_l_f1  # noqa: F401  (re-exported)


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


def muse_privleak_auc(forget_scores, holdout_scores) -> float:
    """The AUC MUSE's PrivLeak uses: ROC-AUC of the membership scores (higher = more member-like,
    e.g. Min-40%) with the *holdout* texts as the positive class and the forget texts as the
    negative one, i.e. ``P(score(holdout) > score(forget))`` (ties count one half). A model that
    memorised its forget set scores near 0; one that never saw it near 0.5."""
    return roc_auc(holdout_scores, forget_scores)


def privleak(auc_unlearned: float, auc_reference: float | None) -> float:
    """PrivLeak (MUSE §3): ``(AUC_unl − AUC_ref) / AUC_ref · 100``.

    Both AUCs come from the same MIA (MUSE: Min-40% on forget vs holdout); ``AUC_ref`` from a
    reference (retrained) model that never saw the forget set. ≈ 0 is ideal. With AUCs in the
    usual orientation (forget = members) positive means the forget set still looks member-like
    (under-unlearning), negative means it looks less member-like than a never-trained model
    would make it (over-unlearning); with MUSE's orientation (:func:`muse_privleak_auc`) the
    signs swap, as in the paper's tables. Raises
    ``ValueError`` without a real reference: substituting 0.5 would silently report a number
    that measures nothing.
    """
    if auc_reference is None or not math.isfinite(auc_reference) or auc_reference <= 0:
        raise ValueError(f"privleak needs the AUC of a reference model that never saw the forget "
                         f"set; got auc_reference={auc_reference!r}")
    if auc_unlearned is None or not math.isfinite(auc_unlearned):
        raise ValueError(f"privleak: invalid auc_unlearned={auc_unlearned!r}")
    return (auc_unlearned - auc_reference) / auc_reference * 100.0
