"""Perplexity: token-weighted over all scored tokens, independent of batching and padding."""
import math

import pytest
import torch
import torch.nn.functional as F

from ortho_train.metrics.perplexity import bits_per_token, perplexity
from tests.ortho_train.metric_helpers import one_thread, tiny_llama as _tiny_llama  # noqa: F401


def _padded_batch(seqs: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_perplexity_is_token_weighted_and_batching_invariant():
    model = _tiny_llama()
    torch.manual_seed(1)
    seqs = [torch.randint(1, 64, (n,)).tolist() for n in (9, 3, 6, 12)]
    # Reference: each sequence alone, unpadded; NLL summed over all tokens then divided once.
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            logits = model(ids).logits[0, :-1].double()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(s) - 1
    expected = math.exp(total / count)
    one_batch = perplexity(model, [_padded_batch(seqs)])
    two_batches = perplexity(model, [_padded_batch(seqs[:2]), _padded_batch(seqs[2:])])
    assert one_batch == pytest.approx(expected, rel=1e-5)
    assert two_batches == pytest.approx(expected, rel=1e-5)
    bits = bits_per_token(model, [_padded_batch(seqs)])
    assert bits == pytest.approx(math.log2(expected), rel=1e-5)


def test_perplexity_restores_training_mode_and_masks_without_labels():
    model = _tiny_llama().train()
    batch = _padded_batch([[1, 2, 3, 4], [5, 6]])
    with_labels = perplexity(model, [batch])
    assert model.training
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert perplexity(model, [no_labels]) == pytest.approx(with_labels, rel=1e-6)


def test_perplexity_refuses_empty():
    model = _tiny_llama()
    batch = _padded_batch([[1, 2, 3]])
    batch["labels"][:] = -100
    with pytest.raises(ValueError):
        perplexity(model, [batch])
