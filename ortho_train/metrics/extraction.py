"""Training-data extraction: greedy decoding from a canary prefix and exact-match scoring.

Carlini et al. 2019, "The Secret Sharer", and Carlini et al. 2021, "Extracting Training Data
from Large Language Models": a secret counts as extracted when greedy decoding from its prefix
reproduces it exactly.

Greedy decoding is a plain argmax loop over the KV cache rather than ``model.generate``:
``generate`` stops at EOS, and ``min_new_tokens`` would avoid that only by banning EOS, which
changes the argmax. Here every step takes the unconstrained argmax, for exactly ``n_tokens``
steps. Only the last position's logits are asked for (`logits_to_keep=1` where the model takes
it): the prompt's other positions are never projected onto the vocabulary, so a step holds
(b, V) logits, not (b, P, V).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ortho_train.metrics.kv_cache import cache_kwargs, last_position_kwargs, returned_cache
from ortho_train.models import eval_mode


@torch.no_grad()
def greedy_continuation(model: nn.Module, prefix_ids: Tensor, n_tokens: int,
                        batch_size: int = 256) -> Tensor:
    """Greedy (argmax) continuation of equal-length, unpadded prefixes.

    ``y_i = argmax_v p(v | prefix, y_<i)`` for i = 1..n_tokens, using the model's KV cache
    (``cache``, ``past_key_values`` before transformers 5) so each step costs one token. No EOS stopping.

    Args:
        model: a Hugging Face style causal LM returning ``.logits`` and its KV cache.
        prefix_ids: (B, P) token ids, all the same length (no padding).
        n_tokens: number of tokens to generate (≥ 0).
        batch_size: prefixes decoded together.

    Returns:
        (B, n_tokens) LongTensor of generated ids (prefix not included), on the prefix's device.
    """
    if prefix_ids.ndim != 2:
        raise ValueError(f"prefix_ids must be (B, P), got {tuple(prefix_ids.shape)}")
    n_prefixes = prefix_ids.shape[0]
    if n_tokens <= 0 or n_prefixes == 0:
        return prefix_ids.new_empty((n_prefixes, max(n_tokens, 0)))
    param = next(model.parameters(), None)
    device = param.device if param is not None else prefix_ids.device
    with eval_mode(model):
        chunks = []
        for start in range(0, n_prefixes, batch_size):
            ids = prefix_ids[start:start + batch_size].to(device)  # (b, P)
            out = model(ids, use_cache=True, **last_position_kwargs(model))  # logits (b, 1, V)
            cache = returned_cache(out)
            step = out.logits[:, -1, :].argmax(dim=-1)  # (b,)
            generated = [step]
            for _ in range(n_tokens - 1):
                out = model(step.unsqueeze(-1), use_cache=True, **cache_kwargs(model, cache),
                            **last_position_kwargs(model))
                cache = returned_cache(out)
                step = out.logits[:, -1, :].argmax(dim=-1)
                generated.append(step)
            chunks.append(torch.stack(generated, dim=1))  # (b, n_tokens)
    return torch.cat(chunks, dim=0).to(prefix_ids.device)


def extraction_rate(generated: Tensor, secrets: Tensor) -> dict[str, float]:
    """Exact-match extraction rate and per-symbol accuracy.

    ``exact_match_rate = mean_b 1[generated_b == secret_b  (all S tokens)]`` and
    ``symbol_accuracy = mean_{b,s} 1[generated_{b,s} == secret_{b,s}]``; a "symbol" is one
    token of the secret (one digit for digit-tokenised secrets).

    Args:
        generated: (B, S) decoded ids (e.g. from :func:`greedy_continuation`).
        secrets: (B, S) true secret ids.
    """
    if generated.shape != secrets.shape or generated.ndim != 2:
        raise ValueError(f"generated {tuple(generated.shape)} and secrets {tuple(secrets.shape)} "
                         "must both be (B, S)")
    if generated.numel() == 0:
        raise ValueError("extraction_rate: empty input")
    hit = generated.to(secrets.device) == secrets  # (B, S)
    return {
        "exact_match_rate": hit.all(dim=1).double().mean().item(),
        "symbol_accuracy": hit.double().mean().item(),
    }
