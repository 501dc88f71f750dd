"""extraction@k: hand-made hits, the greedy candidate, seeded reproducibility, the sampling step."""
import pytest
import torch

from ortho_train.metrics.extraction import greedy_continuation
from ortho_train.metrics.sampled_extraction import (SampledExtractionConfig, extracted_at_k, extraction_at_k,
                                                    sample_step, sampled_continuations)
from ortho_train.settings import SettingError
from tests.ortho_train.metric_helpers import one_thread, tiny_llama  # noqa: F401


def test_extracted_at_k_counts_any_exact_candidate():
    secrets = torch.tensor([[1, 2], [3, 4], [5, 6]])
    greedy = torch.tensor([[1, 2], [0, 0], [0, 0]])  # row 0 by greedy
    samples = torch.tensor([[[9, 9], [9, 9]],
                            [[3, 0], [3, 4]],     # row 1: the second sample is exact
                            [[5, 0], [0, 6]]])    # row 2: each symbol once, never both: not extracted
    assert extracted_at_k(greedy, samples, secrets).tolist() == [True, True, False]


def test_sample_step_top_1_is_argmax_and_top_k_never_leaves_the_top():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    assert sample_step(logits, 1.0, 1, g).tolist() == [1, 0]
    drawn = torch.stack([sample_step(logits, 5.0, 2, g) for _ in range(200)])  # (200, 2)
    assert set(drawn[:, 0].tolist()) == {1, 3} and set(drawn[:, 1].tolist()) == {0, 3}


def test_samples_are_seeded_and_extraction_at_k_is_at_least_greedy():
    model = tiny_llama()
    prefixes = torch.randint(0, 64, (6, 5), generator=torch.Generator().manual_seed(2))
    config = SampledExtractionConfig(k=4, temperature=1.0, top_k=0, batch_size=4)  # batches of 4 and 2

    def draw(seed):
        return sampled_continuations(model, prefixes, 3, config, torch.Generator().manual_seed(seed))

    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == (6, 4, 3) and torch.equal(first, again) and not torch.equal(first, other)
    greedy = greedy_continuation(model, prefixes, 3)
    secrets = torch.cat([greedy[:3], first[3:, 2]])  # rows 0–2: the greedy continuation; 3–5: a seed-0 sample
    hits = extraction_at_k(model, prefixes, secrets, config, torch.Generator().manual_seed(0))
    assert hits.all()  # the greedy rows by the greedy candidate, the others by their (reproduced) sample
    # top-1 sampling is greedy: a secret that is not the greedy continuation is never extracted
    argmax_only = SampledExtractionConfig(k=4, top_k=1)
    off = (greedy + 1) % 64
    assert not extraction_at_k(model, prefixes, off, argmax_only, torch.Generator().manual_seed(0)).any()


def test_bad_settings_name_the_setting():
    for bad, name in (({"k": 0}, "sampled_extraction.k"), ({"temperature": 0.0}, "sampled_extraction.temperature"),
                      ({"top_k": -1}, "sampled_extraction.top_k")):
        with pytest.raises(SettingError, match=name):
            SampledExtractionConfig(**bad)
