"""Next-token statistics from final hidden states, the LM head applied a few positions at a time.

For hidden rows h_i (N, H) and the head z_i = head(h_i) (V logits), every statistic here only
needs one row of logits at a time, so at most `rows` × V float32 logits exist at once instead of
N × V:

    log p(y | h_i) = z_i[y] − logsumexp(z_i)                          (:func:`head_logprobs`)
    μ_i, σ_i of log p_i under p_i, argmax_v z_i[v]                    (:func:`head_distribution_stats`)

With autograd on, each chunk of :func:`head_logprobs` runs under activation checkpointing: the
forward keeps only the chunk's inputs and its (m,) outputs, and the backward recomputes the
chunk's logits, so a training step's peak is one chunk of logits and their gradient, not
(N, V) of each. Gradients are those of the unchunked expression (the same sums, regrouped).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ortho_train.metrics.logprobs import distribution_stats

DEFAULT_LOGIT_BYTES = 256 * 2**20  # float32 logits held at once: 256 rows at V = 262,144

Head = Callable[[Tensor], Tensor]  # hidden (n, H) -> logits (n, V)


def rows_per_chunk(vocab_size: int, logit_bytes: int = DEFAULT_LOGIT_BYTES) -> int:
    """Rows of float32 logits that fit `logit_bytes`: ``max(1, ⌊bytes / (4 V)⌋)``."""
    return max(1, logit_bytes // (4 * vocab_size))


def _chunk_logprobs(head: Head, hidden: Tensor, local: Tensor, target: Tensor) -> Tensor:
    """``z[local_m, target_m] − logsumexp(z[local_m])`` for z = head(hidden) (n, V); (m,) float32."""
    logits = head(hidden).float()  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    return logits[local, target] - lse[local]


def head_logprobs(head: Head, hidden: Tensor, position: Tensor, target: Tensor, rows: int) -> Tensor:
    """``logp_m = log softmax(head(hidden[position_m]))[target_m]`` for m = 1..M, chunked.

    Args:
        head: hidden (n, H) → logits (n, V), as the model's forward applies it.
        hidden: (N, H) final hidden states.
        position: (M,) row of `hidden` each target is scored at (repeats allowed).
        target: (M,) token ids.
        rows: hidden rows per chunk (:func:`rows_per_chunk`).

    Returns:
        (M,) float32, differentiable in `hidden` and the head's weights.
    """
    grad = torch.is_grad_enabled()
    found, values = [], []
    for start in range(0, hidden.shape[0], rows):
        stop = min(start + rows, hidden.shape[0])
        chosen = ((position >= start) & (position < stop)).nonzero().squeeze(1)  # (m,)
        if chosen.numel() == 0:
            continue
        args = (head, hidden[start:stop], position[chosen] - start, target[chosen])
        values.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad
                      else _chunk_logprobs(*args))
        found.append(chosen)
    out = hidden.new_zeros(position.shape[0], dtype=torch.float32)
    if not found:
        return out
    return out.index_put((torch.cat(found),), torch.cat(values))


def head_distribution_stats(head: Head, hidden: Tensor, target: Tensor, rows: int,
                            sigma_min: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row i of hidden (N, H) with target (N,): ``(log p_i(y_i), μ_i, σ_i, argmax_v z_i)``.

    μ_i = Σ_v p_i(v) log p_i(v), σ_i² = Σ_v p_i(v) (log p_i(v) − μ_i)² (Min-K%++, see
    `logprobs.distribution_stats`), chunk by chunk; the first three (N,) float32, argmax (N,) long.
    For scoring (no activation checkpointing: call it under `torch.no_grad`).
    """
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start:start + rows]).float()  # (n, V)
        logp, mu, sigma = distribution_stats(logits, target[start:start + rows], sigma_min)
        parts.append((logp, mu, sigma, logits.argmax(dim=-1)))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty, torch.zeros(0, dtype=torch.long, device=hidden.device)
    logp, mu, sigma, argmax = (torch.cat(column) for column in zip(*parts))
    return logp, mu, sigma, argmax
