"""Masked next-token log-probabilities: the one helper every metric and unlearning loss shares.

Conventions (Hugging Face causal LM): ``labels`` is aligned with ``input_ids`` and uses
``ignore_index`` (-100) for tokens that must not be scored (prompt, padding). The shift
happens here: the logits at position ``t`` predict ``labels[:, t + 1]``, so every output has
``T - 1`` positions. All maths is done in float32 whatever the dtype of the logits, and the
functions stay differentiable (unlearning losses back-propagate through them).

Departure from the textbook ``log_softmax(...).gather(...)``: the label log-prob is computed as
``logit[label] - logsumexp(logits)``, which never materialises the full (B, T, V) log-softmax.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100


LOGIT_BUDGET_BYTES = 512 * 2**20


def batch_within_logit_budget(batch_size: int, positions: int, vocab_size: int | None, copies: int = 2) -> int:
    """At most `batch_size` sequences, and few enough that `copies` float32 (positions, V) tensors
    per sequence (logits, log-softmax, …) stay within `LOGIT_BUDGET_BYTES`: a 262k-token vocabulary
    holds 1 MiB per token position, so 1,024 six-token candidates would take 12 GiB."""
    if not vocab_size:
        return batch_size
    per_candidate = max(positions, 1) * vocab_size * 4 * copies  # float32
    return max(1, min(batch_size, LOGIT_BUDGET_BYTES // per_candidate))


def vocab_size_of(model) -> int | None:
    """The output vocabulary of a Hugging Face model (its text config's `vocab_size`), or None."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


def shifted_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX,
                   attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Next-token targets and scored mask: ``target[b, t] = labels[b, t + 1]`` (B, T-1), with
    ignored positions set to 0 (a valid id for gather), and ``mask`` (B, T-1) bool."""
    target = labels[:, 1:]  # (B, T-1)
    mask = target != ignore_index
    if attention_mask is not None:
        # Belt and braces for callers that pass labels = input_ids with padding left in.
        mask = mask & attention_mask[:, 1:].bool()
    safe_target = torch.where(mask, target, torch.zeros_like(target))  # gather needs valid ids
    return safe_target, mask


def _shift(logits: Tensor, labels: Tensor, ignore_index: int, attention_mask: Tensor | None):
    """Align logits with the next label and build the boolean mask of scored positions."""
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    safe_target, mask = shifted_labels(labels, ignore_index, attention_mask)
    return logits[:, :-1, :].float(), safe_target, mask  # logits (B, T-1, V)


def label_logprob(logits: Tensor, target: Tensor) -> Tensor:
    """``log p(target) = logits[target] − logsumexp(logits)`` over the last axis, in float32.

    logits (..., V) any float dtype, target (...) ids; returns (...) float32.
    """
    logits = logits.float()
    picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                   attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Log-probability of every next label token.

    ``logp[b, t] = log softmax(logits[b, t])[labels[b, t + 1]]``, and 0 where the label is
    ``ignore_index`` (or where ``attention_mask[b, t + 1] == 0`` if a mask is given).

    Args:
        logits: (B, T, V) model outputs, any float dtype.
        labels: (B, T) token ids aligned with ``input_ids``; ``ignore_index`` = not scored.
        ignore_index: label value that is skipped.
        attention_mask: optional (B, T); zero entries are not scored either.

    Returns:
        ``(logp, mask)``: ``logp`` (B, T-1) float32 with zeros at masked positions and
        ``mask`` (B, T-1) bool, True where a token was scored.
    """
    logits, target, mask = _shift(logits, labels, ignore_index, attention_mask)
    logp = label_logprob(logits, target)  # (B, T-1)
    return logp.masked_fill(~mask, 0.0), mask


def sequence_logprob(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                     attention_mask: Tensor | None = None) -> Tensor:
    """Sequence log-likelihood ``log p(y | x) = Σ_t mask_t · log p(y_t | y_<t, x)`` (nats).

    Returns a (B,) float32 tensor; a sequence without scored tokens gives 0.
    """
    logp, _ = token_logprobs(logits, labels, ignore_index, attention_mask)
    return logp.sum(dim=-1)


def sequence_nll_mean(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                      attention_mask: Tensor | None = None) -> Tensor:
    """Per-sequence mean token negative log-likelihood ``−(1/n_b) Σ_t mask_t log p_t`` (nats).

    Returns (B,) float32. A sequence without scored tokens gives 0 (the count is clamped at
    1 so that losses built on this never see NaN); metrics that must flag such sequences
    check the mask themselves.
    """
    logp, mask = token_logprobs(logits, labels, ignore_index, attention_mask)
    count = mask.sum(dim=-1).clamp(min=1)
    return -logp.sum(dim=-1) / count


class TokenDistributionStats(NamedTuple):
    """Per-position statistics of log p under the model's own next-token distribution."""

    logp: Tensor  # (B, T-1) log p(x_t) of the actual next token, 0 where masked
    mu: Tensor  # (B, T-1) μ_t = E_{z~p_t}[log p_t(z)], 0 where masked
    sigma: Tensor  # (B, T-1) σ_t = sqrt(Var_{z~p_t}[log p_t(z)]) ≥ sigma_min, 1 where masked
    mask: Tensor  # (B, T-1) bool


def token_distribution_stats(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                             attention_mask: Tensor | None = None,
                             sigma_min: float = 1e-6) -> TokenDistributionStats:
    """Mean and standard deviation of the next-token log-probability, for Min-K%++.

    Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training Data from
    Large Language Models":

        μ_t = Σ_v p_t(v) log p_t(v),    σ_t² = Σ_v p_t(v) (log p_t(v))² − μ_t².

    σ_t² is evaluated in the equivalent centred form ``Σ_v p (log p − μ)²`` in float32, which
    cannot go negative through cancellation; σ_t is clamped at ``sigma_min`` so a (near)
    one-hot distribution does not divide by zero. Vocabulary entries with p = 0 (logit −inf)
    contribute 0, not NaN.

    Returns:
        :class:`TokenDistributionStats` ``(logp, mu, sigma, mask)``, each (B, T-1); masked
        positions hold logp = mu = 0 and sigma = 1.
    """
    logits, target, mask = _shift(logits, labels, ignore_index, attention_mask)
    logp, mu, sigma = distribution_stats(logits, target, sigma_min)  # (B, T-1) each
    return TokenDistributionStats(
        logp=logp.masked_fill(~mask, 0.0),
        mu=mu.masked_fill(~mask, 0.0),
        sigma=sigma.masked_fill(~mask, 1.0),
        mask=mask,
    )


def distribution_stats(logits: Tensor, target: Tensor, sigma_min: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p(target), μ, σ)`` over the last axis of logits (..., V): the maths of
    :func:`token_distribution_stats` at every position, unmasked; each (...) float32."""
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    p = log_p.exp()
    # p == 0 (log p = −inf, or underflow) contributes nothing to either sum; zeroing log p
    # first (rather than masking p·log p afterwards) keeps NaN out of the backward pass too.
    finite = p > 0
    log_p_safe = torch.where(finite, log_p, 0.0)  # (..., V)
    mu = (p * log_p_safe).sum(-1)  # (...)
    centred = torch.where(finite, log_p_safe - mu.unsqueeze(-1), 0.0)  # (..., V)
    var = (p * centred.square()).sum(-1)  # (...)
    sigma = var.clamp(min=sigma_min**2).sqrt()  # clamp first: sqrt'(0) = inf would NaN the grads
    logp = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (...)
    return logp, mu, sigma
