"""Mean log-probability of answer tokens given their prompt: ``ℓ(a) = (1/|a|) Σ_t log p(a_t | q, a_<t)``.

The per-answer number behind TOFU's probability, truth ratio and forget quality
(`ortho_train.metrics.tofu`). Each sequence is a prompt followed by its answer; only the answer's
tokens are scored. Sequences are right-padded into batches of similar length (sorted by length,
so a batch wastes little on padding), and scored with `metrics.scoring.label_logprobs`, which
never holds a large vocabulary's logits whole.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ortho_train.metrics.logprobs import IGNORE_INDEX
from ortho_train.metrics.scoring import label_logprobs
from ortho_train.models import eval_mode


def _batch(sequences: list[Tensor], answer_starts: list[int], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (B, T) input ids, labels (prompt and padding = IGNORE_INDEX) and attention mask."""
    width = max(s.numel() for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full_like(ids, IGNORE_INDEX)  # (B, T)
    mask = torch.zeros_like(ids)  # (B, T)
    for row, (seq, start) in enumerate(zip(sequences, answer_starts)):
        n = seq.numel()
        ids[row, :n] = seq
        labels[row, start:n] = seq[start:]
        mask[row, :n] = 1
    return ids, labels, mask


@torch.no_grad()
def answer_mean_logprobs(model: nn.Module, sequences: list[Tensor], answer_starts: list[int],
                         batch_size: int = 16, pad_id: int = 0) -> Tensor:
    """ℓ(a) of each sequence's answer, the tokens from `answer_starts[i]` on.

    Args:
        sequences: N 1-D token-id tensors, prompt then answer.
        answer_starts: N positions of the first answer token, each in [1, len(sequence)).
        pad_id: any valid id (padding is masked from attention and labels).

    Returns:
        (N,) float64 mean log-probabilities, in the order given.
    """
    if len(sequences) != len(answer_starts):
        raise ValueError(f"{len(sequences)} sequences but {len(answer_starts)} answer starts")
    for i, (seq, start) in enumerate(zip(sequences, answer_starts)):
        if not 1 <= start < seq.numel():
            raise ValueError(f"sequence {i}: answer start {start} outside [1, {seq.numel()}): "
                             "an empty prompt or an empty answer cannot be scored")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: sequences[i].numel())
    out = torch.empty(len(sequences), dtype=torch.float64)
    with eval_mode(model):
        for begin in range(0, len(order), batch_size):
            chunk = order[begin:begin + batch_size]
            ids, labels, mask = _batch([sequences[i] for i in chunk], [answer_starts[i] for i in chunk], pad_id)
            logp, scored = label_logprobs(model, ids.to(device), labels.to(device), mask.to(device))  # (b, T-1) each
            means = logp.double().sum(dim=1) / scored.sum(dim=1)  # (b,)
            out[torch.tensor(chunk)] = means.cpu()
    return out
