"""MUSE metrics: ROUGE-L F1 on hand examples, VerbMem/KnowMem on a tiny model, PrivLeak."""
import math

import pytest
import torch

from ortho_train.metrics.extraction import greedy_continuation
from ortho_train.metrics.muse import knowmem, lcs_length, privleak, rouge_l_f1, verbmem
from tests.ortho_train.metric_helpers import one_thread, tiny_llama as _tiny_llama  # noqa: F401


def test_rouge_l_f1_hand_examples():
    assert rouge_l_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l_f1([1, 2, 3], [4, 5]) == 0.0
    # LCS([1,2,3,4], [1,3,5]) = [1,3]: P = 2/4, R = 2/3, F1 = 4/7.
    assert lcs_length([1, 2, 3, 4], [1, 3, 5]) == 2
    assert rouge_l_f1([1, 2, 3, 4], [1, 3, 5]) == pytest.approx(4 / 7)
    # Lin (2004): "police killed the gunman" vs "police kill the gunman": LCS 3 of 4 each.
    assert rouge_l_f1("police killed the gunman".split(), "police kill the gunman".split()) == 0.75
    assert rouge_l_f1(torch.tensor([7, 8, 9]), torch.tensor([9, 7, 8])) == pytest.approx(2 / 3)
    assert rouge_l_f1([], [1]) == 0.0 and rouge_l_f1([1], []) == 0.0


def test_lcs_is_symmetric_and_order_aware():
    a, b = [3, 1, 4, 1, 5, 9, 2, 6], [1, 1, 5, 2, 6, 3]
    assert lcs_length(a, b) == lcs_length(b, a) == 5  # 1 1 5 2 6


def test_verbmem_on_own_greedy_continuation_is_one_and_mixes_lengths():
    model = _tiny_llama()
    prefixes = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6]), torch.tensor([7, 8, 9, 10])]
    own = [greedy_continuation(model, p.unsqueeze(0), 5)[0] for p in prefixes]
    assert verbmem(model, prefixes, own, batch_size=2) == pytest.approx(1.0)
    # Replace the middle continuation by tokens never generated there: that one scores 0.
    other = [t for t in range(64) if t not in own[1].tolist()][:5]
    mixed = [own[0], torch.tensor(other), own[2]]
    assert verbmem(model, prefixes, mixed) == pytest.approx(2 / 3)
    # Equal-length prefixes can come as one (B, P) tensor.
    stacked = torch.stack([prefixes[0], prefixes[2]])
    assert verbmem(model, stacked, torch.stack([own[0], own[2]])) == pytest.approx(1.0)


def test_knowmem_stops_at_stop_token():
    model = _tiny_llama()
    question = torch.tensor([[1, 2, 3]])
    answer = greedy_continuation(model, question, 4)[0]
    assert knowmem(model, question, [answer]) == pytest.approx(1.0)
    # Stopping at the second generated token keeps 1 of 4: P = 1, R = 1/4, F1 = 0.4.
    stop = int(answer[1])
    assert stop != int(answer[0]), "fixture precondition: the first token is not the stop token"
    assert knowmem(model, question, [answer], stop_ids=[stop]) == pytest.approx(0.4)


def test_privleak_value_and_refusal():
    assert privleak(0.6, 0.5) == pytest.approx(20.0)
    assert privleak(0.45, 0.5) == pytest.approx(-10.0)
    for missing in (None, math.nan, 0.0):
        with pytest.raises(ValueError, match="reference"):
            privleak(0.6, missing)
    with pytest.raises(ValueError):
        privleak(math.nan, 0.5)
