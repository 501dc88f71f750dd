"""`ResumableLoader`: each pass's order follows from the seed and the pass; a loaded state
continues the pass where the saved loader stopped."""
import pytest
import torch
from torch.utils.data import TensorDataset

from ortho_train.resumable_loader import ResumableLoader

DATA = TensorDataset(torch.arange(23))  # 23 items, batches of 4: 5 per pass with drop_last


def _loader(seed=11, **kwargs):
    return ResumableLoader(DATA, batch_size=4, seed=seed, drop_last=True, name="public", **kwargs)


def _passes(loader, count):
    return [[batch[0].tolist() for batch in loader] for _ in range(count)]


def test_each_pass_is_a_fresh_seeded_permutation():
    first, again = _passes(_loader(), 3), _passes(_loader(), 3)
    assert first == again  # the order is a function of the seed and the pass, nothing global
    assert first[0] != first[1] and len(first[0]) == 5
    for batches in first:
        items = [i for batch in batches for i in batch]
        assert len(set(items)) == 20 and set(items) <= set(range(23))
    assert _passes(_loader(seed=12), 1) != first[:1]
    assert _passes(_loader(shuffle=False), 1)[0][0] == [0, 1, 2, 3]


def test_a_loaded_state_continues_the_pass_and_the_passes_after_it():
    reference = _passes(_loader(), 3)
    saved = _loader()
    _passes(saved, 1)
    batches = iter(saved)
    taken = [next(batches)[0].tolist() for _ in range(2)]  # killed two batches into pass 1
    assert taken == reference[1][:2]
    resumed = _loader(seed=99)  # the seed comes from the state
    resumed.load_state_dict(saved.state_dict())
    assert _passes(resumed, 2) == [reference[1][2:], reference[2]]


def test_a_state_at_the_end_of_a_pass_continues_with_the_next():
    saved = _loader()
    _passes(saved, 1)
    resumed = _loader()
    resumed.load_state_dict(saved.state_dict())
    assert _passes(resumed, 2) == [[], _passes(_loader(), 2)[1]]  # Lightning re-iterates an empty pass


def test_a_state_of_another_loader_is_refused():
    other = ResumableLoader(DATA, batch_size=2, seed=11, name="public")
    with pytest.raises(ValueError, match="resume with the data settings"):
        _loader().load_state_dict(other.state_dict())
