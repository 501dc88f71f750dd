"""Run directories: `<save_dir>/<name>/version_N`, and `latest` for the newest run of a name.

A config that consumes an earlier stage's output names it as `runs/<name>/latest/<artifact>`
(e.g. `runs/quickstart/latest/hf_model`): `latest` resolves to the highest `version_N` of that
name holding the artifact, so no config hard-codes `version_0`. A literal directory named
`latest` wins over the lookup.

At start-up a run root that cannot be written and a `model_path` that names nothing are refused
naming the setting (`reserve_run_dir`, `check_writable`, `check_model_dir`; an unreadable
`--ckpt_path` is `ortho_train.checkpoint_io`'s).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ortho_train.settings import SettingError, show

LATEST = "latest"
RESERVED_ENV = "ORTHO_TRAIN_RESERVED_RUN"  # "<root>|<N>": the launcher's reservation, read by DDP ranks
# What loggers write into a run directory before the first step (nothing a run produces).
LOGGER_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", "events.out.tfevents.*")
_VERSION = re.compile(r"version_(\d+)")
CKPT_ALIASES = ("last", "best", "hpc")  # `--ckpt_path` values Lightning resolves itself


def versions(root: str | Path) -> list[Path]:
    """The `version_N` directories of `root`, oldest (lowest N) first."""
    found = [(int(m.group(1)), p) for p in Path(root).glob("version_*") if (m := _VERSION.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def next_version(root: str | Path) -> int:
    """The first free N after every `version_N` of `root`."""
    taken = versions(root)
    return int(_VERSION.fullmatch(taken[-1].name).group(1)) + 1 if taken else 0


def reserve_version(root: str | Path) -> int:
    """Create `<root>/version_N` for the first free N and return N; safe against concurrent runs.

    Choosing "the next free N" and creating it later lets two runs started together take the
    same directory; `mkdir` either creates the directory or fails, so each run owns the one it
    made. The choice is exported in the environment, so DDP ranks that Lightning re-launches
    from this process (LOCAL_RANK or NODE_RANK > 0) reuse it instead of reserving their own;
    the launching process itself reserves anew on every call (runs in one process, e.g. tests). An unused reservation is empty
    and is removed with the failed start (`remove_if_unstarted`).
    """
    root = Path(root)
    inherited = os.environ.get(RESERVED_ENV, "")
    where, _, number = inherited.rpartition("|")
    if _launched_rank() and where == str(root.resolve()) and number.isdigit():
        return int(number)
    root.mkdir(parents=True, exist_ok=True)
    n = next_version(root)
    while True:
        try:
            (root / f"version_{n}").mkdir()
            break
        except FileExistsError:
            n += 1
    os.environ[RESERVED_ENV] = f"{root.resolve()}|{n}"
    return n


def reserve_run_dir(root: str | Path, setting: str) -> Path:
    """`reserve_version` for the run root a config's `setting` names; a root that cannot be
    written (read-only, a file in the way, no permission) is refused naming the setting."""
    root = Path(root)
    try:
        return root / f"version_{reserve_version(root)}"
    except OSError as err:
        raise _unwritable(setting, root, err) from None


def check_writable(root: str | Path, setting: str) -> None:
    """Refuse, at start-up, a run root where nothing can be written (Lightning would fail later
    with a bare `OSError`); creates the root as Lightning would."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as err:
        raise _unwritable(setting, root, err) from None


def _unwritable(setting: str, root: Path, err: OSError) -> SettingError:
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(root) else ""
    return SettingError(f"{setting}: no run directory can be written under {root}: {reason}{where}; "
                        "choose a writable directory")


def check_model_dir(path: str | Path, setting: str) -> None:
    """`path` (`runs/<name>/latest/…` resolved) is an existing directory; else a `SettingError`
    naming `setting`, before any class is built (the tokenizer, linked to it, fails first otherwise)."""
    try:
        found = resolve_latest(path)
    except FileNotFoundError as err:
        raise SettingError(f"{setting}={show(str(path))}: {err}") from None
    if found.suffix.lower() == ".gguf" and found.is_file():
        return  # a GGUF file is a model too (ortho_train.gguf_checkpoint)
    if not found.is_dir():
        raise SettingError(f"{setting}={show(str(path))}: "
                           f"{'not a directory' if found.exists() else 'no such directory'}; pass a local "
                           "Hugging Face model directory (config.json, weights, tokenizer files) or a .gguf file")


def _launched_rank() -> bool:
    """True in a process Lightning launched as a further DDP rank."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))


def checkpoint_run_dir(ckpt_path: str | Path | None) -> Path | None:
    """The `version_N` directory a checkpoint file lies in (its nearest such ancestor), or None
    (no path, a Lightning alias such as 'last', or a file outside any run directory)."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None
    for parent in Path(ckpt_path).resolve().parents:
        if _VERSION.fullmatch(parent.name):
            return parent
    return None


def set_aside_metrics_csv(run_dir: str | Path) -> Path | None:
    """Before a resumed run writes into `run_dir`: rename its `metrics.csv` (which the CSV logger
    would delete) to `metrics_before_resume_<i>.csv`, the first free i; returns the new path."""
    current = Path(run_dir) / "metrics.csv"
    if not current.is_file():
        return None
    i = 0
    while (target := current.with_name(f"metrics_before_resume_{i}.csv")).exists():
        i += 1
    return current.rename(target)


def resolve_latest(path: str | Path) -> Path:
    """`<root>/latest/<rest>` → `<root>/version_N/<rest>` for the highest N where it exists.

    Raises:
        FileNotFoundError: no run of `<root>` holds `<rest>`; the message names the path to pass.
    """
    path = Path(path)
    if path.exists() or LATEST not in path.parts:
        return path
    at = path.parts.index(LATEST)
    root, rest = Path(*path.parts[:at]), path.parts[at + 1:]
    for run in reversed(versions(root)):
        if run.joinpath(*rest).exists():
            return run.joinpath(*rest)
    example = root.joinpath("version_0", *rest)
    raise FileNotFoundError(
        f"{path}: no run under {root} holds {Path(*rest) if rest else 'anything'} (looked for {root}/version_N): "
        f"run the stage that writes it first, or pass the exact path, e.g. model_path={example}"
    )


def remove_if_unstarted(run_dir: str | Path) -> bool:
    """Remove `run_dir` (a `version_N`) if it holds nothing but logger files; True if removed.

    Called after a run failed before its first step, so failed starts leave no empty version.
    """
    run_dir = Path(run_dir)
    if not (run_dir.is_dir() and _VERSION.fullmatch(run_dir.name)):
        return False
    if not all(p.is_file() and any(p.match(pattern) for pattern in LOGGER_FILES) for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True
