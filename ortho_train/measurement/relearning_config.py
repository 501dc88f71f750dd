"""What the relearning attack runs (`RelearningConfig`) and how the forget set is split (`split_forget`).

The split is the attack's data: a seeded share of the forget canaries is handed to the attacker
(the *relearn* part), and only the rest (the *measured* part) is scored, so a secret is never
measured after it was fine-tuned on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from ortho_train.settings import SettingError, check_settings, is_finite, show

Condition = Literal["public", "forget"]
CONDITIONS: tuple[str, ...] = get_args(Condition)
START, PRE_CANARY = "start", "pre_canary"  # the named references; anything else is a model directory


@dataclass
class RelearningConfig:
    """The relearning attack (`RelearningCallback(relearning=…)`).

    Args:
        steps: fine-tuning steps after which each copy is measured, cumulative (0: the model as it
            is, no fine-tuning); e.g. [0, 10, 25] measures one copy after 0, 10 and 25 steps.
        lr: AdamW learning rate of the relearning (no weight decay, no schedule).
        batch_size: sequences per step (public windows; or relearn canaries, at most all of them).
        seed: seeds the forget split and the order of every batch (the same batches for every model).
        relearn_fraction: share of the forget canaries the attacker fine-tunes on, in (0, 1); the rest
            are measured (at least one canary on each side).
        conditions: 'public' (public training windows only: benign relearning) and/or 'forget' (the
            relearn part of the forget set, every token labelled).
        references: the models relearnt beside the unlearned one: 'start' (the model unlearning began
            from, reloaded from `model_path`), 'pre_canary' (the `hf_model_pre_canary` beside
            `model_path`: the public model of its canary fine-tune, which never saw a canary) or a
            model directory; [] for none.
    """

    steps: list[int] = field(default_factory=lambda: [0, 10, 25])
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    relearn_fraction: float = 0.5
    conditions: list[Condition] = field(default_factory=lambda: ["public", "forget"])
    references: list[str] = field(default_factory=lambda: [START])

    def __post_init__(self) -> None:
        steps, conditions = list(self.steps), list(self.conditions)
        check_settings("relearning", [
            ("steps", steps, bool(steps) and all(isinstance(s, int) and s >= 0 for s in steps),
             "needs at least one step count, each an integer ≥ 0 (0: the model before relearning)"),
            ("steps", steps, len(set(steps)) == len(steps), "lists a step count twice"),
            ("lr", self.lr, is_finite(self.lr) and self.lr > 0, "learning rates must be > 0"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "must be ≥ 1"),
            ("relearn_fraction", self.relearn_fraction,
             is_finite(self.relearn_fraction) and 0 < self.relearn_fraction < 1,
             "the attacker's share of the forget canaries must lie in (0, 1): the rest are measured"),
            ("conditions", conditions, bool(conditions) and set(conditions) <= set(CONDITIONS)
             and len(set(conditions)) == len(conditions),
             f"must be a non-empty list of distinct conditions from {show(list(CONDITIONS))}"),
            ("references", self.references, all(isinstance(r, str) and r for r in self.references)
             and len(set(self.references)) == len(self.references),
             f"each reference is {START!r}, {PRE_CANARY!r} or a model directory, listed once"),
        ])
        self.steps = sorted(steps)

    def describe(self) -> dict:
        """The settings as `relearning.json` records them."""
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed,
                "relearn_fraction": self.relearn_fraction, "conditions": list(self.conditions),
                "references": list(self.references)}


def split_forget(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(relearn, measured): disjoint sorted positions in the forget set, together all `count` of them.

    A permutation drawn from a generator seeded by `seed`; its first k = round(fraction · count),
    clipped to [1, count − 1], are the attacker's.
    """
    if count < 2:
        raise SettingError(f"relearning.relearn_fraction: the forget set has {count} canary(ies); splitting it "
                           "into a relearn part and a measured part needs at least 2 (data.forget_members)")
    k = min(max(round(fraction * count), 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:k]), sorted(order[k:])
