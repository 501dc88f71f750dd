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

Closed choices are `typing.Literal[...]` in the constructor signatures, so jsonargparse refuses
a value outside them while parsing and `--help` / `--print_config` list them. A class built
in plain Python checks them once with `check_choices` (or `choice_rule` inside a rule list),
from the same Literal: `data.forget_target='bogus': must be one of 'secret', 'secret_suffix', 'full'`.
An open registry (`UPDATE_MODES`, `LOSSES`, …: an `ortho_train.registry.Registry`, where a new entry
is one line, possibly at run time) stays `str` in the signature and is checked against its current
names by the same helper or by `Registry.get`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, get_args

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


def choices(literal: Any) -> tuple:
    """The values a `Literal[...]` type (or `Literal[...] | None`, without the None) allows; an
    open registry (a dict or tuple of names, extended at run time) is its own list of values."""
    if isinstance(literal, (dict, tuple, list, set, frozenset)) or callable(getattr(literal, "names", None)):
        return tuple(literal)  # an `ortho_train.registry.Registry` iterates over its names
    flat = []
    for arg in get_args(literal):
        if arg is type(None):
            continue
        flat.extend(choices(arg) if get_args(arg) else [arg])
    return tuple(flat)


def choice_rule(setting: str, value: Any, literal: Any) -> Rule:
    """The `Rule` "`value` is one of the `literal` type's values" (None passes where it allows None);
    `literal` may be a registry's names instead (`choices`)."""
    allowed = choices(literal)
    ok = value in allowed or (value is None and type(None) in get_args(literal))
    return (setting, value, ok, "must be one of " + ", ".join(show(a) for a in allowed))


def check_choices(prefix: str, **settings: tuple[Any, Any]) -> None:
    """`check_settings` of closed choices given as `setting=(value, Literal[...])`."""
    check_settings(prefix, [choice_rule(name, value, allowed) for name, (value, allowed) in settings.items()])


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
