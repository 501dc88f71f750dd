"""The run directory of one `train.py` launch, chosen from its parsed config before any class is built.

`ortho_train.run_paths` knows run directories (`<save_dir>/<name>/version_N`, `latest`,
reservations); this module applies it to a launch's config:

- every logger writes into one `version_N` (TensorBoard and CSV loggers would each pick "the next
  free version" and land apart), reserved atomically so concurrent launches never share one;
- a resumed run (`--ckpt_path` inside `version_N`) continues in that directory, its `metrics.csv`
  set aside first (the CSV logger would delete the rows logged before the stop);
- `trainer.logger=false` gets its own `version_N` under `default_root_dir` (Lightning would write
  every such run into the same directory) and drops LearningRateMonitor, which needs a logger;
- the canary key file defaults to `<run root>/<name>/canary.key` beside the run directories;
- a failed start removes what it reserved (`RunDirectories.remove_unstarted`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from jsonargparse import Namespace

from ortho_train.run_paths import check_writable, remove_if_unstarted, reserve_run_dir, set_aside_metrics_csv

SAVE_DIR = "trainer.logger.init_args.save_dir"


class RunDirectories:
    """The run directories one launch reserved; `assign` writes the chosen one into the config."""

    def __init__(self):
        self.reserved: list[Path] = []  # removed again on a failed start

    def reserve(self, root: Path, setting: str) -> Path:
        """Reserve `root/version_N` for this run; `setting` is named if `root` cannot be written."""
        run_dir = reserve_run_dir(root, setting)
        self.reserved.append(run_dir)
        return run_dir

    def assign(self, trainer_config, resumed: Path | None) -> None:
        """Point every logger of `trainer_config` (or `default_root_dir` without one) at this
        run's directory: the resumed one, or a newly reserved `version_N`."""
        loggers = trainer_config.logger
        if loggers is False:
            self._assign_without_logger(trainer_config, resumed)
            return
        loggers = loggers if isinstance(loggers, list) else [loggers]
        loggers = [logger for logger in loggers if isinstance(logger, Namespace) and "init_args" in logger]
        if not loggers or loggers[0].init_args.get("save_dir") is None:
            return
        if len(loggers) < 2 and resumed is None:  # the logger picks its version itself
            check_writable(loggers[0].init_args.save_dir, SAVE_DIR)
            return
        first = loggers[0].init_args
        root = Path(first.save_dir) / (first.get("name") or "")
        if first.get("version") is None:
            if resumes_in(resumed, root):
                first.version = int(resumed.name.removeprefix("version_"))
                set_aside_metrics_csv(resumed)
            else:
                first.version = int(self.reserve(root, SAVE_DIR).name.removeprefix("version_"))
            own_log_dir()
        elif resumed is not None and resumed == (root / f"version_{first.version}").resolve():
            set_aside_metrics_csv(resumed)  # resumed with the run's own config.yaml, which names its version
            own_log_dir()
        for logger in loggers[1:]:
            if logger.init_args.get("version") is None:
                logger.init_args.version = first.version

    def _assign_without_logger(self, trainer_config, resumed: Path | None) -> None:
        """`logger=false`: Lightning writes into `default_root_dir` itself, and every such run would
        replace the previous one's artifacts: give it its own version directory."""
        root = Path(trainer_config.default_root_dir or ".")
        if resumed is not None and root.resolve() == resumed:
            run_dir = resumed  # the run's own config.yaml names its version directory as the root
        else:
            run_dir = resumed if resumes_in(resumed, root) else self.reserve(root, "trainer.default_root_dir")
        trainer_config.default_root_dir = str(run_dir)
        drop_callbacks_needing_a_logger(trainer_config)

    def remove_reserved(self) -> None:
        """After a setting was refused while the classes were built: drop the reservations."""
        for run_dir in self.reserved:
            remove_if_unstarted(run_dir)

    @staticmethod
    def remove_unstarted(trainer) -> None:
        """After a failure before the first optimiser step, drop run directories holding nothing
        but logger files (rank zero; other ranks write none)."""
        candidates = {Path(trainer.default_root_dir)} if not trainer.loggers else set()
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir is not None:
                candidates.add(Path(log_dir))
        for run_dir in candidates:
            remove_if_unstarted(run_dir)


def default_key_file(config) -> Path | None:
    """The canary key file of this run: `data.canary_key_file`, or, when the config leaves it unset
    in the key-file mode, `<run root>/<name>/canary.key` beside the run directories (the first
    logger's save_dir/name, else trainer.default_root_dir), written into the config. None in the
    seed-only mode (`data.canary_secrets=seed`)."""
    data = config.data
    if data.get("canary_secrets", "key_file") != "key_file":
        return None
    if data.get("canary_key_file") is None:
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        first = next((lg.init_args for lg in loggers if isinstance(lg, Namespace) and "init_args" in lg
                      and lg.init_args.get("save_dir") is not None), None)
        root = (Path(first.save_dir) / (first.get("name") or "")) if first is not None \
            else Path(config.trainer.default_root_dir or ".")
        data.canary_key_file = str(root / "canary.key")
    return Path(data.canary_key_file)


def resumes_in(run_dir: Path | None, root: Path) -> bool:
    """The checkpoint's run directory is a `version_N` of `root` (else the run gets a new one)."""
    if run_dir is None:
        return False
    if run_dir.parent != root.resolve():
        warnings.warn(f"--ckpt_path lies in {run_dir}, not in a run directory of {root}: the resumed run "
                      "writes into a new version directory", stacklevel=3)
        return False
    return True


def own_log_dir() -> None:
    """The log directory is this run's own (new, or the one it resumes): the other loggers' files
    in it are its own, and CSVLogger finds no metrics.csv there to remove."""
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def drop_callbacks_needing_a_logger(trainer_config) -> None:
    """LearningRateMonitor refuses a Trainer without a logger; with `logger=false` it has nothing
    to write to, so it is left out (with a warning) instead of failing the run at start-up."""
    callbacks = trainer_config.get("callbacks") or []
    kept = [c for c in callbacks if not str(c.get("class_path", "")).endswith("LearningRateMonitor")]
    if len(kept) != len(callbacks):
        warnings.warn("trainer.logger=false: LearningRateMonitor left out (it needs a logger)", stacklevel=2)
        trainer_config.callbacks = kept
