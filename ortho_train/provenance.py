"""Which canaries a model was fine-tuned on: recorded in the SFT run's summary, checked later.

The fine-tuning run writes `canary_fingerprint` (`ortho_train.canaries.canary_fingerprint`: a
hash, never the secrets) and `canary_settings` (the data settings that shape the canaries) to
its `summary.json`. A later stage that loads `<run>/hf_model` reads `<run>/summary.json` and
refuses a data module whose canaries differ: unlearning canaries the model never saw would
report success without removing anything. It also refuses the model of a run that was stopped
before its end (`status: interrupted`, `ortho_train.interruption`): a half-trained model would
give numbers that look like the finished run's.
"""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from ortho_train.canaries import CanarySet, canary_fingerprint, key_fingerprint

# CanaryConfig field -> the data module setting that sets it
SPEC_SETTINGS = {"template": "canary_template", "alphabet": "secret_alphabet", "secret_length": "secret_length",
                 "num_members": "num_member_canaries", "num_holdout": "num_holdout_canaries",
                 "seed": "canary_seed"}


class CanaryMismatchError(ValueError):
    """The data module's canaries are not the ones the model was fine-tuned on."""


class UnfinishedRunError(ValueError):
    """The model comes from a fine-tuning run that was stopped before its end."""


def canary_record(canaries: CanarySet) -> dict:
    """`{"canary_fingerprint", "canary_settings"}` for a run's summary (no secret, no key in it:
    the key appears as its fingerprint)."""
    settings = {name: getattr(canaries.spec, field) for field, name in SPEC_SETTINGS.items()}
    fingerprint = key_fingerprint(canaries.spec.key)
    settings["canary_key_file"] = f"key {fingerprint}" if fingerprint else None
    return {"canary_fingerprint": canary_fingerprint(canaries), "canary_settings": settings}


def check_same_canaries(model_path: str | Path, record: dict) -> None:
    """Refuse `record` (this run's `canary_record`) if the run that wrote `model_path` used other canaries
    (`CanaryMismatchError`) or was stopped before its end (`UnfinishedRunError`).

    The fine-tuning run's summary is `<model_path>/../summary.json`; without one (a model from
    elsewhere) nothing can be checked, and a warning says so.
    """
    summary_path = Path(model_path).parent / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if summary.get("status") == "interrupted":
        resume = summary.get("resume_command") or "its resume command"
        raise UnfinishedRunError(f"{model_path} is the model of a run stopped at step {summary.get('step')} of "
                                 f"{summary.get('max_steps')} ({summary.get('reason')}; {summary_path}): finish "
                                 f"that run first ({resume}), or pass another model_path")
    recorded = summary.get("canary_fingerprint")
    if recorded is None:
        rank_zero_warn(f"cannot check that the canaries match the fine-tuning run's: no canary_fingerprint in "
                       f"{summary_path} (a model not trained by ortho-train's canary SFT?)")
        return
    if recorded == record["canary_fingerprint"]:
        return
    theirs, ours = summary.get("canary_settings", {}), record["canary_settings"]
    differ = [f"data.{name} is {ours.get(name)!r} here but {theirs.get(name)!r} there"
              for name in sorted(set(theirs) | set(ours)) if theirs.get(name) != ours.get(name)]
    why = "; ".join(differ) if differ else "the settings agree, so the secrets were drawn from another key"
    raise CanaryMismatchError(f"these canaries are not the ones {model_path} was fine-tuned on ({summary_path}): "
                              f"{why}. Use the fine-tuning run's data settings.")
