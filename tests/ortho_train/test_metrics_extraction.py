"""Greedy decoding with the KV cache equals a cache-free argmax loop; extraction scoring."""
import pytest
import torch

from ortho_train.metrics.extraction import extraction_rate, greedy_continuation
from tests.ortho_train.metric_helpers import one_thread, tiny_llama as _tiny_llama  # noqa: F401


@torch.no_grad()
def _argmax_loop_without_cache(model, prefix_ids, n_tokens):
    ids = prefix_ids
    for _ in range(n_tokens):
        next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[:, prefix_ids.shape[1]:]


def test_greedy_continuation_matches_uncached_argmax_loop():
    model = _tiny_llama()
    torch.manual_seed(3)
    prefixes = torch.randint(0, 64, (5, 7))
    expected = _argmax_loop_without_cache(model, prefixes, 8)
    got = greedy_continuation(model, prefixes, 8, batch_size=2)  # chunks of 2, 2, 1
    assert got.shape == (5, 8) and got.dtype == torch.long
    assert torch.equal(got, expected), f"cached {got.tolist()} vs uncached {expected.tolist()}"


def test_greedy_continuation_does_not_stop_or_ban_eos():
    model = _tiny_llama()
    prefixes = torch.tensor([[3, 1, 4, 1, 5]])
    expected = _argmax_loop_without_cache(model, prefixes, 6)
    # Make the model's first greedy token its EOS: generate() would stop (or, with
    # min_new_tokens, ban it and change the argmax). The plain loop must do neither.
    model.config.eos_token_id = int(expected[0, 0])
    model.generation_config.eos_token_id = int(expected[0, 0])
    got = greedy_continuation(model, prefixes, 6)
    assert torch.equal(got, expected)
    assert greedy_continuation(model, prefixes, 0).shape == (1, 0)


def test_greedy_continuation_restores_train_mode():
    model = _tiny_llama().train()
    greedy_continuation(model, torch.tensor([[1, 2]]), 2)
    assert model.training


def test_extraction_rate_known_values():
    secrets = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [0, 1, 0, 1]])
    generated = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0], [9, 9, 9, 9], [1, 0, 1, 0]])
    result = extraction_rate(generated, secrets)
    assert result["exact_match_rate"] == pytest.approx(0.5)
    assert result["symbol_accuracy"] == pytest.approx(11 / 16)
    with pytest.raises(ValueError):
        extraction_rate(generated[:, :3], secrets)


def test_cached_decoding_and_exposure_raise_no_deprecation_warning():
    """The cache goes in under the name the installed transformers declares (`cache` in 5.x,
    `past_key_values` before): no deprecation warning on every decoding step."""
    import warnings

    from ortho_train.metrics.exposure import secret_log_perplexity

    model = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation warning fails the test
        greedy_continuation(model, torch.randint(0, 64, (3, 7)), 4)
        secret_log_perplexity(model, torch.randint(0, 64, (7,)), torch.randint(0, 10, (20, 4)))
