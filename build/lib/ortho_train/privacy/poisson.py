"""Poisson sampling of the private examples, as the DP-SGD accountant assumes.

Each step, every one of the n members joins the batch independently with probability q, so
the batch size is Binomial(n, q): E|B| = q·n, and a batch may be empty. Shuffling into
fixed-size batches would be a different mechanism (sampling without replacement), for which
the accountant's bound does not hold as stated.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class PoissonCanarySampler(Sampler[list[int]]):
    """Batch sampler yielding, for each of `steps` steps, the indices of the members drawn.

        sampler = PoissonCanarySampler(num_members=20, sample_rate=0.25, steps=100, seed=0)
        for indices in sampler:              # list[int], possibly empty
            batch = collate([members[i] for i in indices])

    Usable as a `DataLoader(batch_sampler=...)` only with a collate function that accepts an
    empty list; iterating twice gives the same draws (the generator is re-seeded).

    Args:
        num_members: n, the size of the private set.
        sample_rate: q ∈ (0, 1], each member's inclusion probability per step.
        steps: batches per pass.
        seed: seed of the sampling generator (independent of the noise generator).
    """

    def __init__(self, num_members: int, sample_rate: float, steps: int, seed: int = 0):
        if num_members < 1:
            raise ValueError(f"dp sampling needs at least one member, got num_members={num_members}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"dp sample_rate must lie in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"dp steps must be ≥ 1, got {steps}")
        self.num_members = num_members
        self.sample_rate = sample_rate
        self.steps = steps
        self.seed = seed

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_members

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            draws = torch.rand(self.num_members, generator=generator)  # (n,)
            yield (draws < self.sample_rate).nonzero().squeeze(1).tolist()
