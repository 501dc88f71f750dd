"""Shared maths of every unlearning loss: masked answer-token NLLs and the retain KL.

All functions are pure: they take logits (B, T, V) and labels (B, T) in the Hugging Face
causal-LM convention (labels aligned with ``input_ids``, −100 = not scored: prompt tokens and
padding) and never see a model. The next-token shift and masking are done once, by
:func:`ortho_train.metrics.token_logprobs`, which the memorisation metrics share, so a loss and
the metric that judges it score exactly the same tokens.

"Answer tokens" for a canary are the tokens the data module labels: by default the secret only
(the prefix is the prompt); see ``CanaryDataModule(forget_target=...)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ortho_train.metrics import IGNORE_INDEX, token_logprobs


def _require_tokens(mask: Tensor, what: str) -> Tensor:
    count = mask.sum()
    if count.item() == 0:
        raise ValueError(f"{what}: no answer token is labelled (every label is {IGNORE_INDEX}); "
                         "check the prompt masking of the batch")
    return count


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Sequence NLL over answer tokens, ``NLL(y|x) = −Σ_t mask_t · log p(y_t | y_<t, x)`` (nats).

    Returns (B,) float32. NPO compares these *sums* (sequence log-likelihood ratios), not
    per-token means and never raw logits.
    """
    logp, mask = token_logprobs(logits, labels)
    _require_tokens(mask, "sequence_nll")
    return -logp.sum(dim=-1)


def token_mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy ``CE = −Σ_{b,t} mask·log p / Σ_{b,t} mask``: token-weighted over the batch."""
    logp, mask = token_logprobs(logits, labels)
    count = _require_tokens(mask, "token_mean_nll")
    return -logp.sum() / count


def masked_kl(ref_logits: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean ``KL(p_ref ‖ p_θ) = Σ_v p_ref(v) (log p_ref(v) − log p_θ(v))`` at scored positions.

    Positions are those :func:`token_logprobs` scores (the label of the *next* token is not
    −100); the KL uses the whole next-token distributions there. Zero iff the two
    distributions agree at every scored position.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"reference logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} differ")
    _, mask = token_logprobs(logits, labels)  # (B, T-1) positions predicting a labelled token
    count = _require_tokens(mask, "masked_kl")
    log_p = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    log_ref = F.log_softmax(ref_logits[:, :-1].float().detach(), dim=-1)  # (B, T-1, V)
    kl = (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)  # (B, T-1)
    return (kl * mask).sum() / count


def prompt_masked_labels(input_ids: Tensor, answer_start: Tensor, attention_mask: Tensor) -> Tensor:
    """Labels = ``input_ids`` with −100 before ``answer_start[b]`` (the prompt) and on padding.

    Args:
        input_ids: (B, T); answer_start: (B,) index of the first answer token of each row;
        attention_mask: (B, T), 0 on padding.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
    keep = (positions >= answer_start.unsqueeze(1)) & attention_mask.bool()  # (B, T)
    return input_ids.masked_fill(~keep, IGNORE_INDEX)
