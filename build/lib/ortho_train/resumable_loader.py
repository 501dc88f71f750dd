"""`ResumableLoader`: a shuffled DataLoader whose pass seed and position go into the checkpoint.

Uninterrupted, it is `DataLoader(dataset, shuffle=...)` to the bit: the same batches, and the
same draws from torch's global generator at the same moments, so everything drawn after them
(dropout, sampled secrets, calibration batches) is unchanged too. torch's `RandomSampler`
(no generator) draws one int64 seed from the global generator when its iterator is first
advanced and orders the pass by `randperm(n)` under that seed; `PassSampler` does the same
(`draw_seed`). The DataLoader's own iterator, built on every `iter()`, draws its `_base_seed`
from the global generator before that; `ResumableLoader` keeps DataLoader's iterator, so that
draw is unchanged as well.

What a plain loader cannot do is continue: resumed, it would draw a new order and start at its
first batch. `state_dict()` holds the pass under way, its seed and the number of batches the
loader has handed out in it; after `load_state_dict()` the next `iter()` continues that pass
with that seed at that batch (the sampler starts at index batches · batch_size of the pass's
order; no batch is loaded to be skipped) and draws nothing for it. The passes after it draw their
seeds from the global generator as the uninterrupted run did, so the global generator must be
set back to its state at the checkpoint before the resumed run fetches its first batch (the
training modules do so in `on_train_start`, `ortho_train.rng_state`). A state saved at the end of
a pass continues with an empty pass, after which the next one starts as it would have.

Lightning saves and restores the state of every training loader that has `state_dict` /
`load_state_dict` (`CombinedLoader`); with map-style datasets it does not prefetch, so the
batches handed out are exactly the batches trained on. The count is kept by the loader, not by
the sampler, so worker prefetching (`num_workers > 0`) does not shift it.

A checkpoint written at the end of an epoch: Lightning's resumed loop starts the next epoch
without calling `iter()` on the loaders again (it already did, before the checkpoint was
restored), where the uninterrupted run starts a new pass of every loader. The loader learns of
the new epoch from its sampler's `set_epoch` (called by Lightning before the epoch's first batch,
after `on_train_start`): it drops the saved position and makes the draw the uninterrupted run's
`iter()` made, so the epoch goes on as it would have (with `num_workers = 0`: workers would have
started the saved pass already).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One int64 from `generator` (None: torch's global generator), drawn as `RandomSampler`
    draws its seed and the DataLoader iterator its `_base_seed`."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class PassSampler(RandomSampler):
    """`RandomSampler(range(length))` (or the dataset order) that can continue a saved pass.

    `seed` is the seed of the pass under way (None until drawn, and when not shuffled). It is a
    `RandomSampler` so that Lightning, under DDP, replaces it with a `DistributedSampler` over the
    dataset exactly as it replaces a plain shuffled loader's sampler (a sampler of any other class
    it would wrap, drawing this sampler's order first and splitting that).
    """

    def __init__(self, length: int, shuffle: bool):
        super().__init__(range(length))
        self.length, self.shuffle = length, shuffle
        self.seed: int | None = None
        self._continue: tuple[int | None, int] | None = None  # (seed, start) for the next iterator
        self.epoch_listener = None  # called with Lightning's epoch (`set_epoch`)

    def order(self, seed: int | None) -> torch.Tensor:
        """The order of a pass over `range(length)` under `seed` (the identity when not shuffled)."""
        if seed is None:
            return torch.arange(self.length)
        generator = torch.Generator()
        generator.manual_seed(seed)
        return torch.randperm(self.length, generator=generator)

    def continue_pass(self, seed: int | None, start: int) -> None:
        """The next iterator continues the pass of `seed` at index `start` and draws nothing."""
        self._continue = (seed, start)

    def new_pass(self) -> None:
        """The next iterator (or the one made and not yet advanced) starts a new pass."""
        self._continue = None
        self.seed = None

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch's first batch."""
        if self.epoch_listener is not None:
            self.epoch_listener(epoch)

    def __iter__(self) -> Iterator[int]:
        # A generator: like RandomSampler's, its body (the seed draw) runs at the first next().
        if self._continue is not None:
            (seed, start), self._continue = self._continue, None
        else:
            seed, start = (draw_seed() if self.shuffle else None), 0
        self.seed = seed
        yield from self.order(seed)[start:].tolist()

    def __len__(self) -> int:
        return self.length


class ResumableLoader(DataLoader):
    """A DataLoader over `dataset` in `PassSampler` order with a checkpointable position.

    Args:
        dataset: a map-style dataset.
        batch_size: items per batch.
        shuffle: permute each pass as `shuffle=True` does (False: dataset order every pass).
        name: shown in the error when a state of another loader is loaded.
        sampler: only for Lightning, which rebuilds the loader around a distributed sampler under
            DDP (the position is then counted but the order, and a resume, are the distributed
            sampler's).
        **kwargs: further DataLoader arguments (collate_fn, drop_last, num_workers, …).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, name: str = "loader",
                 sampler: Sampler | None = None, **kwargs):
        self.pass_sampler = PassSampler(len(dataset), shuffle)
        super().__init__(dataset, batch_size=batch_size,
                         sampler=sampler if sampler is not None else self.pass_sampler, **kwargs)
        self.pass_sampler.epoch_listener = self._set_epoch
        self.name = name
        self._pass = -1  # the pass under way (-1: none yet)
        self._handed_out = 0  # batches handed out in it
        self._epoch: int | None = None  # Lightning's epoch of the pass under way
        self._resume_at: tuple[int, int, int | None] | None = None  # (pass, batches, seed) after a load
        self._resumed_unstarted = False  # the iterator continuing a saved pass has not been advanced

    def __iter__(self) -> Iterator:
        if self._resume_at is not None:
            self._pass, self._handed_out, seed = self._resume_at
            self._resume_at = None
            if seed is not None or not self.pass_sampler.shuffle:
                self.pass_sampler.continue_pass(seed, self._handed_out * self.batch_size)
            else:  # saved before the pass drew its seed: it draws it at its first batch, as it would have
                self.pass_sampler.new_pass()
            self._resumed_unstarted = True
        else:
            self._pass, self._handed_out = self._pass + 1, 0
            self.pass_sampler.new_pass()
        return self._count(super().__iter__())

    def _set_epoch(self, epoch: int) -> None:
        """A saved pass not yet continued when Lightning begins another epoch than the one it
        was saved in (a checkpoint at the end of an epoch): the iterator already made starts the
        next pass instead, after the draw of the `iter()` the uninterrupted run made there."""
        if self._resumed_unstarted and self._epoch is not None and epoch != self._epoch:
            self._pass, self._handed_out = self._pass + 1, 0
            self.pass_sampler.new_pass()
            draw_seed(self.generator)  # the DataLoader iterator's _base_seed
        self._epoch = epoch

    def _count(self, batches: Iterator) -> Iterator:
        self._resumed_unstarted = False
        for batch in batches:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict:
        """The pass, its seed and the batches handed out in it (what the next `iter()` after a
        load continues)."""
        return {"name": self.name, "pass": self._pass, "seed": self.pass_sampler.seed, "batches": self._handed_out,
                "epoch": self._epoch, "length": len(self.dataset), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`'s pass and batch with its seed, at the next `iter()`."""
        expected = {"name": self.name, "length": len(self.dataset), "batch_size": self.batch_size}
        found = {key: state.get(key) for key in expected}
        if found != expected:
            raise ValueError(f"the checkpoint's data loader state {found} does not fit this run's loader {expected}: "
                             "resume with the data settings of the run that wrote the checkpoint")
        if "epoch" not in state or (self.pass_sampler.shuffle and state["batches"] > 0 and state["seed"] is None):
            raise ValueError(f"the checkpoint's state of loader {self.name!r} has no pass seed: it was written by "
                             "an earlier version of the loader, whose passes were ordered differently")
        self._epoch = state["epoch"]
        if state["pass"] >= 0:
            self._resume_at = (int(state["pass"]), int(state["batches"]), state["seed"])
