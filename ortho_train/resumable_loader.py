"""`ResumableLoader`: a DataLoader whose position and shuffling seed go into the checkpoint.

A resumed run (`--ckpt_path`) must see the batches the uninterrupted run would have seen. A
plain shuffled DataLoader draws a fresh permutation from the global RNG every time it is
iterated, and restarts from its first batch on resume; this one does neither:

- pass `p` (0, 1, 2, …: every `iter()` starts the next pass) is ordered by the permutation
  π_p = randperm(n, generator seeded with blake2b(seed, p)), a function of the seed and the
  pass alone (the identity when not shuffled);
- `state_dict()` holds the seed, the pass and the number of batches the loader has handed out
  in it; after `load_state_dict()` the next `iter()` continues that pass at that batch (the
  sampler starts at index batches · batch_size of π_p, no batch is loaded to be skipped) and the
  passes after it follow as they would have.

Lightning saves and restores the state of every training loader that has `state_dict` /
`load_state_dict` (`CombinedLoader`); with map-style datasets it does not prefetch, so the
batches handed out are exactly the batches trained on. The count is kept by the loader, not by
the sampler, so worker prefetching (`num_workers > 0`) does not shift it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def derive_seed(seed: int, label: int | str) -> int:
    """A 63-bit seed for `label` (a pass index, a loader's name): blake2b of `seed:label`."""
    digest = hashlib.blake2b(f"{seed}:{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class PassSampler(Sampler[int]):
    """Indices of pass `pass_index` from position `start` on (see the module docstring)."""

    def __init__(self, length: int, seed: int, shuffle: bool):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.pass_index = 0
        self.start = 0

    def order(self, pass_index: int) -> torch.Tensor:
        """π_p: the order of pass `pass_index` over `range(length)`."""
        if not self.shuffle:
            return torch.arange(self.length)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, pass_index))
        return torch.randperm(self.length, generator=generator)

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.pass_index)[self.start:].tolist()

    def __len__(self) -> int:
        return self.length


class ResumableLoader(DataLoader):
    """A DataLoader over `dataset` with `PassSampler` order and a checkpointable position.

    Args:
        dataset: a map-style dataset.
        batch_size: items per batch.
        seed: seed of the pass permutations (saved in the state).
        shuffle: permute each pass (False: dataset order every pass).
        name: shown in the error when a state of another loader is loaded.
        sampler: only for Lightning, which rebuilds the loader around a distributed sampler under
            DDP (the position is then counted but the order is the distributed sampler's).
        **kwargs: further DataLoader arguments (collate_fn, drop_last, num_workers, …).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, name: str = "loader",
                 sampler: Sampler | None = None, **kwargs):
        self.pass_sampler = PassSampler(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size,
                         sampler=sampler if sampler is not None else self.pass_sampler, **kwargs)
        self.name = name
        self._pass = -1  # the pass under way (-1: none yet)
        self._handed_out = 0  # batches handed out in it
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator:
        if self._resume_at is not None:
            self._pass, self._handed_out = self._resume_at
            self._resume_at = None
        else:
            self._pass, self._handed_out = self._pass + 1, 0
        self.pass_sampler.pass_index = self._pass
        self.pass_sampler.start = self._handed_out * self.batch_size
        return self._count(super().__iter__())

    def _count(self, batches: Iterator) -> Iterator:
        for batch in batches:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict:
        """Seed, pass and batches handed out in it (what the next `iter()` after a load continues)."""
        return {"name": self.name, "seed": self.pass_sampler.seed, "pass": self._pass, "batches": self._handed_out,
                "length": len(self.dataset), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`'s pass and batch with its seed, at the next `iter()`."""
        expected = {"name": self.name, "length": len(self.dataset), "batch_size": self.batch_size}
        found = {key: state.get(key) for key in expected}
        if found != expected:
            raise ValueError(f"the checkpoint's data loader state {found} does not fit this run's loader {expected}: "
                             "resume with the data settings of the run that wrote the checkpoint")
        self.pass_sampler.seed = int(state["seed"])
        if state["pass"] >= 0:
            self._resume_at = (int(state["pass"]), int(state["batches"]))
