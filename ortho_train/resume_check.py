"""A resumed run continues the run its checkpoint came from, with that run's settings, or not at all.

`--ckpt_path` puts the resumed run into the checkpoint's `version_N` directory (`train.py`). Two
things there must hold before anything is built:

- the run did not finish: a `summary.json` without `status: interrupted` marks a finished run,
  whose model, summary and config are final and never overwritten (fine-tune its `hf_model` in a new
  run instead);
- the settings that decide what is trained and measured — `seed_everything`, every `model.*` and
  `data.*` setting (the canaries among them) — equal those in the run's `config.yaml`. Training
  other canaries on top of a checkpoint and writing the result over the run's model would be a
  silent wrong result; the mismatch is refused, naming each differing setting with both values.
  Trainer settings (`max_steps`, callbacks, loggers) may differ.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ortho_train.settings import SettingError

COMPARED = ("seed_everything", "model", "data")
SHOWN = 8  # differing settings listed by name; the rest counted


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """`{"a.b.c": leaf}` of nested dicts (lists are leaves)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: value}


def differing_settings(saved: dict, current: dict) -> list[str]:
    """`"<setting>: <saved> in the run, <current> now"` for every compared setting that both
    configs hold and that differs (a setting only one of them holds was added or removed by a
    later version of the toolkit, not chosen by the user)."""
    before = {k: v for key in COMPARED for k, v in flatten(saved.get(key), key).items()}
    now = {k: v for key in COMPARED for k, v in flatten(current.get(key), key).items()}
    return [f"{name}: {before[name]!r} in the run, {now[name]!r} now"
            for name in sorted(before.keys() & now.keys()) if before[name] != now[name]]


def check_resume(run_dir: Path, current: dict, ckpt_path: str) -> None:
    """Refuse resuming `run_dir` when it finished or when `current` (the parsed config as a plain
    dict, as it would be saved) differs from its `config.yaml` in a compared setting."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            status = None
        if status != "interrupted":
            raise SettingError(f"ckpt_path={ckpt_path!r}: the run {run_dir} finished (its summary.json is final) "
                               "and a finished run is never overwritten; fine-tune its hf_model in a new run")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return  # killed before Lightning saved the config: nothing to compare with
    saved = yaml.safe_load(saved_path.read_text()) or {}
    differing = differing_settings(saved, current)
    if differing:
        shown = "; ".join(differing[:SHOWN]) + (f"; and {len(differing) - SHOWN} more" if len(differing) > SHOWN else "")
        raise SettingError(f"ckpt_path={ckpt_path!r}: the resumed run must keep the settings of {run_dir}, but "
                           f"{len(differing)} differ ({shown}); resume with --config {saved_path}")
