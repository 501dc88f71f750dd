"""Start-up checks of settings, with messages that name the setting as a config writes it.

Every check is a `Rule`: (setting, value, ok, reason). `check_settings` raises one
`SettingError` listing every rule that failed, each as `<setting>=<value>: <reason>`, e.g.

    check_settings("model.init_args", [
        ("lr", lr, lr > 0, "learning rates must be > 0"),
        ("min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "the cosine floor is a fraction of the peak"),
    ])
    # SettingError: model.init_args.lr=0.0: learning rates must be > 0

The prefix is where the owner sits in a config (`model.init_args`, `data`,
`model.init_args.isolation.quant`, …); a class that is set in one place only names it itself.
`train.py` prints the message of a `SettingError` as the last line of a failed start.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

Rule = tuple[str, Any, bool, str]  # (setting, value, ok, reason)


class SettingError(ValueError):
    """A setting refused at start-up; the message starts with the setting and its value."""


def show(value: Any) -> str:
    """A value as a config writes it: strings quoted, lists in brackets, numbers as they are."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def check_settings(prefix: str, rules: Iterable[Rule]) -> None:
    """Raise a `SettingError` naming every rule whose `ok` is false (`prefix.setting=value: reason`)."""
    failed = [f"{prefix}.{setting}={show(value)}: {reason}" if prefix else f"{setting}={show(value)}: {reason}"
              for setting, value, ok, reason in rules if not ok]
    if failed:
        raise SettingError("; ".join(failed))


def is_finite(value: Any) -> bool:
    """A real number that is not NaN or ±inf (a YAML `.nan` passes every comparison check)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_trainer_settings(trainer) -> None:
    """Trainer settings Lightning accepts and then fails on at the first step (a modulo by zero),
    or runs with silently (a negative clipping threshold clips nothing), and a run length the
    toolkit's phases need (`max_steps` bounds every run: its schedules and phase switch use it)."""
    accumulate, interval = trainer.get("accumulate_grad_batches"), trainer.get("val_check_interval")
    number = isinstance(interval, (int, float)) and not isinstance(interval, bool)
    clip, max_steps = trainer.get("gradient_clip_val"), trainer.get("max_steps")
    check_settings("trainer", [
        ("max_steps", max_steps, max_steps is None or max_steps >= 1,
         "must be ≥ 1: every run of the toolkit is bounded by its number of optimiser steps"),
        ("gradient_clip_val", clip, clip is None or clip >= 0,
         "must be ≥ 0 (null or 0: no clipping); a negative threshold would silently clip nothing"),
        ("accumulate_grad_batches", accumulate, accumulate is None or accumulate >= 1,
         "must be ≥ 1 (batches per optimiser step)"),
        ("val_check_interval", interval,
         not number or (interval >= 1 if isinstance(interval, int) else 0 < interval <= 1),
         "must be an int ≥ 1 (training batches between validations) or a float in (0, 1] (a share of an epoch)"),
    ])
