"""Perplexity: token-weighted over all scored tokens, independent of batching and padding."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ortho_train.metrics.perplexity import bits_per_token, perplexity


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models are all OpenMP synchronisation: on a busy 2-core box one thread is 10x faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


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
