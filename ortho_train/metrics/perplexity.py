"""Perplexity of a causal LM on held-out text.

Token-weighted, not sequence-weighted: every scored token counts once, whatever sequence or
batch it sits in, so the result does not depend on how the text was batched or padded.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ortho_train.metrics.logprobs import IGNORE_INDEX
from ortho_train.metrics.scoring import label_logprobs
from ortho_train.models import eval_mode


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def nll_sum_and_count(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
                      device: torch.device | str | None = None,
                      ignore_index: int = IGNORE_INDEX) -> tuple[float, int]:
    """Total next-token NLL (nats, float64 accumulation) and number of scored tokens.

    Each batch is a mapping with ``input_ids`` (B, T), optionally ``attention_mask`` (B, T)
    and ``labels`` (B, T; ``ignore_index`` = not scored). Without ``labels`` every attended
    token after the first is scored. The model is put in eval mode and its previous mode is
    restored afterwards. A large vocabulary is scored without its (B, T, V) logits
    (`metrics.scoring.label_logprobs`).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = attention_mask.to(device) if attention_mask is not None else None
            labels = batch.get("labels")
            labels = labels.to(device) if labels is not None else input_ids
            logp, mask = label_logprobs(model, input_ids, labels, attention_mask, ignore_index)  # (B, T-1)
            total -= logp.sum(dtype=torch.float64).item()
            count += int(mask.sum().item())
    return total, count


def perplexity(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
               device: torch.device | str | None = None,
               ignore_index: int = IGNORE_INDEX) -> float:
    """``PPL = exp( Σ_tokens NLL / N_tokens )`` over all scored tokens of all batches.

    See :func:`nll_sum_and_count` for the batch format. Raises ``ValueError`` when no token
    was scored.
    """
    total, count = nll_sum_and_count(model, batches, device, ignore_index)
    if count == 0:
        raise ValueError("perplexity: no label token was scored (all labels ignored?)")
    return math.exp(total / count)


def bits_per_token(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
                   device: torch.device | str | None = None,
                   ignore_index: int = IGNORE_INDEX) -> float:
    """Mean next-token cross-entropy in bits: ``Σ NLL / (N_tokens · ln 2)`` = log2 PPL."""
    total, count = nll_sum_and_count(model, batches, device, ignore_index)
    if count == 0:
        raise ValueError("bits_per_token: no label token was scored (all labels ignored?)")
    return total / count / math.log(2)
