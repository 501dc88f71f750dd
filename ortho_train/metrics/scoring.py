"""Scoring a causal LM's next tokens without holding its (B, T, V) logits when they are large.

Every function takes the model and token ids and returns what the metric needs per position.
When the model splits into body and head (`metrics.lm_head`: an audited `forward`, no hooks on
the head) and its logits would exceed `logit_bytes` (float32), the body runs once and the head is
applied to the scored positions only, a chunk of rows at a time (`metrics.chunked_head`);
otherwise the model's own forward gives the logits and the result is the plain computation of
`metrics.logprobs`. The two agree to float32 rounding (tests/ortho_train/test_metrics_scoring.py),
and so do their gradients (:func:`label_logprobs` is differentiable either way).

Memory at V = 262,144, B·T = 2048 tokens: the plain path holds 2 GiB of logits (and more for
their log-softmax or gradient); the chunked one ``rows · V · 4`` bytes (256 MiB by default).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ortho_train.metrics.chunked_head import (DEFAULT_LOGIT_BYTES, head_distribution_stats, head_logprobs,
                                              rows_per_chunk)
from ortho_train.metrics.kv_cache import cache_kwargs, returned_cache
from ortho_train.metrics.lm_head import SplitCausalLM, split_causal_lm
from ortho_train.metrics.logprobs import (IGNORE_INDEX, TokenDistributionStats, batch_within_logit_budget,
                                          shifted_labels, token_distribution_stats, token_logprobs, vocab_size_of)

STATS_COPIES = 5  # (n, V) float32 tensors `distribution_stats` holds at once


def chunked_split(model: nn.Module, positions: int, logit_bytes: int | None = None) -> SplitCausalLM | None:
    """The model's body/head split when `positions` × V float32 logits exceed `logit_bytes`
    (default `DEFAULT_LOGIT_BYTES`) and the split is exact and hook-free; else None."""
    split = split_causal_lm(model)
    budget = DEFAULT_LOGIT_BYTES if logit_bytes is None else logit_bytes
    if split is None or positions * split.vocab_size * 4 <= budget or split.head_has_hooks():
        return None
    return split


def batch_within_budget(model: nn.Module, batch_size: int, positions: int, copies: int = 2) -> int:
    """Sequences of `positions` tokens to score together: `batch_size` where the head can be
    chunked (its logits never exceed `DEFAULT_LOGIT_BYTES` per chunk, whatever the batch), else
    `logprobs.batch_within_logit_budget` (`copies` float32 (positions, V) tensors per sequence)."""
    split = split_causal_lm(model)
    if split is not None and not split.head_has_hooks():
        return batch_size
    return batch_within_logit_budget(batch_size, positions, vocab_size_of(model), copies)


def label_logprobs(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX, logit_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """`metrics.token_logprobs` of the model's logits on input_ids (B, T), computed from them:
    ``logp[b, t] = log p(labels[b, t+1] | input_ids[b, ≤t])`` (0 where unscored) and the mask,
    each (B, T-1). Differentiable (the training loss uses it)."""
    split = chunked_split(model, input_ids.numel(), logit_bytes)
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        return token_logprobs(logits, labels, ignore_index, attention_mask)
    target, mask = shifted_labels(labels, ignore_index, attention_mask)  # (B, T-1) each
    hidden, _ = split.hidden(input_ids, attention_mask)  # (B, T, H)
    scored = hidden[:, :-1][mask]  # (M, H): the positions predicting a scored label
    position = torch.arange(scored.shape[0], device=scored.device)  # (M,)
    rows = rows_per_chunk(split.vocab_size, logit_bytes or DEFAULT_LOGIT_BYTES)
    flat = head_logprobs(split.head, scored, position, target[mask], rows)  # (M,)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device)  # (B, T-1)
    return logp.masked_scatter(mask, flat), mask


def label_distribution_stats(model: nn.Module, input_ids: Tensor, labels: Tensor,
                             attention_mask: Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                             logit_bytes: int | None = None) -> tuple[TokenDistributionStats, Tensor]:
    """`metrics.token_distribution_stats` of the model's logits on input_ids (B, T), and the
    argmax token of every scored position ((B, T-1) long: position t predicts t + 1; −1 where
    unscored). For scoring only (run it under `torch.no_grad`)."""
    split = chunked_split(model, input_ids.numel() * STATS_COPIES, logit_bytes)  # all copies within budget
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
        stats = token_distribution_stats(logits, labels, ignore_index, attention_mask)
        return stats, logits[:, :-1].argmax(dim=-1).masked_fill(~stats.mask, -1)
    target, mask = shifted_labels(labels, ignore_index, attention_mask)  # (B, T-1) each
    hidden, _ = split.hidden(input_ids, attention_mask)  # (B, T, H)
    rows = rows_per_chunk(split.vocab_size, (logit_bytes or DEFAULT_LOGIT_BYTES) // STATS_COPIES)
    logp, mu, sigma, argmax = head_distribution_stats(split.head, hidden[:, :-1][mask], target[mask], rows)

    def spread(values: Tensor, fill: float) -> Tensor:  # (M,) -> (B, T-1)
        return torch.full(mask.shape, fill, dtype=values.dtype, device=values.device).masked_scatter(mask, values)

    stats = TokenDistributionStats(logp=spread(logp, 0.0), mu=spread(mu, 0.0), sigma=spread(sigma, 1.0), mask=mask)
    return stats, spread(argmax, -1)


def position_logprobs(model: nn.Module, input_ids: Tensor, position: Tensor, target: Tensor, cache=None,
                      logit_bytes: int | None = None) -> tuple[Tensor, object]:
    """``log p(target_m | the tokens up to flat position position_m)`` for input_ids (b, n),
    positions indexing the flattened (b·n) grid, after the KV `cache` if given (which the
    forward extends in place). Returns ((M,) float32, the cache or None)."""
    b, n = input_ids.shape
    use_cache = cache is not None
    split = chunked_split(model, b * n, logit_bytes)
    if split is None:
        extra = cache_kwargs(model, cache) if use_cache else {}
        out = model(input_ids, use_cache=use_cache, **extra)
        flat = out.logits.float().reshape(b * n, -1)  # (b, n, V) -> (b·n, V)
        lse = torch.logsumexp(flat, dim=-1)  # (b·n,)
        return flat[position, target] - lse[position], (returned_cache(out) if use_cache else None)
    hidden, cache = split.hidden(input_ids, cache=cache, use_cache=use_cache)  # (b, n, H)
    needed, local = torch.unique(position, return_inverse=True)  # (u,) rows scored, (M,) into them
    scored = hidden.reshape(b * n, -1)[needed]  # (b, n, H) -> (b·n, H) -> (u, H)
    rows = rows_per_chunk(split.vocab_size, logit_bytes or DEFAULT_LOGIT_BYTES)
    return head_logprobs(split.head, scored, local, target, rows), cache
