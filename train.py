"""ortho-train entry point: `python train.py fit --config configs/quickstart.yaml`.

Any LightningModule of the toolkit is selected by `model.class_path` in the config; the data
module is always `CanaryDataModule`. `--print_config` prints a complete, editable config.

Threads: torch uses as many as the cores this process may run on (its CPU affinity and cgroup
quota; `OMP_NUM_THREADS` overrides), and they wait passively (`OMP_WAIT_POLICY=PASSIVE` unless
set): beside another busy process a 2-thread run then slows ~1.5×, not ~2.7×
(`python benchmarks/cpu_threads.py`).

Errors: a failed start ends with one line naming the setting to change, e.g.
`error: model.init_args.lr=0.0: learning rates must be > 0` (exit status 2 for a refused setting
or file, 1 for any other failure). `ORTHO_TRAIN_TRACEBACK=1 python train.py …` shows the full
traceback instead; `--print_config` prints the config as parsed, before anything is built.

Resume: the same command with `--ckpt_path <run>/version_N/checkpoints/<file>.ckpt` continues that
run in its own `version_N` (README, "Resume"), as does `--config <run>/version_N/config.yaml`.

Stopped runs: SIGTERM or Ctrl-C ends a run after the current step with a checkpoint, the model, a
`summary.json` marked interrupted and the resume command printed, exit 143 / 130; a full disk
likewise, with the newest checkpoint on disk (`ortho_train.interruption`). Checkpoints are written
atomically in their own directory, and an unreadable `--ckpt_path` is refused with a message
naming it (`ortho_train.checkpoint_io`).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ortho_train.threads import set_passive_wait

set_passive_wait()  # before torch loads OpenMP: its threads sleep, not spin, beside other processes

import yaml  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from ortho_train.checkpoint_io import (LOAD_ERRORS, UnreadableCheckpointError, check_checkpoint_file,  # noqa: E402
                                       use_atomic_checkpoints)
from ortho_train.cli_errors import run_reporting_errors  # noqa: E402
from ortho_train.console import add_step_progress_bar, quiet_library_chatter  # noqa: E402
from ortho_train.datamodule import CanaryDataModule  # noqa: E402
from ortho_train.interruption import InterruptionCallback  # noqa: E402
from ortho_train.run_paths import (check_model_dir, check_writable,  # noqa: E402
                                   checkpoint_run_dir, remove_if_unstarted, reserve_run_dir,
                                   set_aside_metrics_csv)
from ortho_train.resume_check import check_resume  # noqa: E402
from ortho_train.settings import check_trainer_settings  # noqa: E402
from ortho_train.threads import configure_threads  # noqa: E402


SAVE_DIR = "trainer.logger.init_args.save_dir"


class OrthoTrainCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        self.reserved: list[Path] = []  # run directories this launch reserved (removed on a failed start)
        self.new_key_file: Path | None = None  # a canary key this launch may create (removed on a failed start)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the model's: a local model directory brings its own, a model built
        # from a config uses bytes.
        parser.link_arguments(
            "model.init_args.model_path", "data.tokenizer", compute_fn=lambda path: path or "byte"
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads the checkpoint's hyperparameters: torch.load's message on a
        # file of another kind would be the last line otherwise.
        if self.config.get("subcommand"):
            check_checkpoint_file(self.config[self.config.subcommand].get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's read of the checkpoint's hyper-parameters, with a damaged or foreign file
        named (torch's own message for it suggests `weights_only=False`, which runs its code)."""
        try:
            super()._parse_ckpt_path()
        except LOAD_ERRORS as error:
            config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
            raise UnreadableCheckpointError.for_file(config.get("ckpt_path"), error) from None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        add_step_progress_bar(config.trainer)
        check_trainer_settings(config.trainer)
        key_file = _default_key_file(config)
        self.new_key_file = None if key_file is None or key_file.exists() else key_file
        model_args = config.model.get("init_args") if isinstance(config.model, Namespace) else None
        if model_args is not None and model_args.get("model_path") is not None:
            check_model_dir(model_args.model_path, "model.init_args.model_path")
        resumed = checkpoint_run_dir(config.get("ckpt_path"))  # --ckpt_path: continue in its run directory
        if resumed is not None:
            as_saved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
            check_resume(resumed, as_saved, str(config.get("ckpt_path")))
        loggers = config.trainer.logger
        if loggers is False:
            # Without a logger Lightning writes into default_root_dir itself, and every such run
            # would replace the previous one's artifacts: give it its own version directory.
            root = Path(config.trainer.default_root_dir or ".")
            if resumed is not None and root.resolve() == resumed:
                run_dir = resumed  # the run's own config.yaml names its version directory as the root
            else:
                run_dir = resumed if _resumes_in(resumed, root) else self._reserve(root, "trainer.default_root_dir")
            config.trainer.default_root_dir = str(run_dir)
            _drop_callbacks_needing_a_logger(config.trainer)
            return
        loggers = loggers if isinstance(loggers, list) else [loggers]
        loggers = [logger for logger in loggers if isinstance(logger, Namespace) and "init_args" in logger]
        if not loggers or loggers[0].init_args.get("save_dir") is None:
            return
        if len(loggers) < 2 and resumed is None:  # the logger picks its version itself
            check_writable(loggers[0].init_args.save_dir, SAVE_DIR)
            return
        # TensorBoard and CSV loggers each pick "the next free version" and so land in
        # different directories; give all of them the first one's, so a run has one log dir.
        first = loggers[0].init_args
        root = Path(first.save_dir) / (first.get("name") or "")
        if first.get("version") is None:
            if _resumes_in(resumed, root):
                first.version = int(resumed.name.removeprefix("version_"))
                set_aside_metrics_csv(resumed)  # CSVLogger would delete the rows logged before the kill
            else:
                first.version = int(self._reserve(root, SAVE_DIR).name.removeprefix("version_"))
            _own_log_dir()
        elif resumed is not None and resumed == (root / f"version_{first.version}").resolve():
            set_aside_metrics_csv(resumed)  # resumed with the run's own config.yaml, which names its version
            _own_log_dir()
        for logger in loggers[1:]:
            if logger.init_args.get("version") is None:
                logger.init_args.version = first.version

    def _reserve(self, root: Path, setting: str) -> Path:
        """Reserve `root/version_N` for this run (kept in `self.reserved` for a failed start);
        `setting` is named if `root` cannot be written."""
        run_dir = reserve_run_dir(root, setting)
        self.reserved.append(run_dir)
        return run_dir

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:  # a setting refused while the classes are built: drop the reservation
            for run_dir in self.reserved:
                remove_if_unstarted(run_dir)
            self._remove_new_key_file()
            raise
        # first: a stopped run's checkpoint and model are saved before any other callback reacts
        self.trainer.callbacks.insert(0, InterruptionCallback())
        use_atomic_checkpoints(self.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_unstarted_run_dirs()
            raise

    def _remove_new_key_file(self) -> None:
        """A key file this launch created is removed when the run fails before its first step: a
        failed start leaves no secret behind."""
        if self.new_key_file is not None and self.new_key_file.is_file():
            self.new_key_file.unlink()

    def _remove_unstarted_run_dirs(self) -> None:
        """After a failure before the first optimiser step, drop run directories holding
        nothing but logger files (rank zero; other ranks write none)."""
        trainer = self.trainer
        if trainer.global_step > 0 or not trainer.is_global_zero:
            return
        self._remove_new_key_file()
        candidates = {Path(trainer.default_root_dir)} if not trainer.loggers else set()
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir is not None:
                candidates.add(Path(log_dir))
        for run_dir in candidates:
            remove_if_unstarted(run_dir)


def _default_key_file(config) -> Path | None:
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


def _resumes_in(run_dir: Path | None, root: Path) -> bool:
    """The checkpoint's run directory is a `version_N` of `root` (else the run gets a new one)."""
    if run_dir is None:
        return False
    if run_dir.parent != root.resolve():
        warnings.warn(f"--ckpt_path lies in {run_dir}, not in a run directory of {root}: the resumed run "
                      "writes into a new version directory", stacklevel=3)
        return False
    return True


def _own_log_dir() -> None:
    """The log directory is this run's own (new, or the one it resumes): the other loggers' files
    in it are its own, and CSVLogger finds no metrics.csv there to remove."""
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def _drop_callbacks_needing_a_logger(trainer_config) -> None:
    """LearningRateMonitor refuses a Trainer without a logger; with `logger=false` it has nothing
    to write to, so it is left out (with a warning) instead of failing the run at start-up."""
    callbacks = trainer_config.get("callbacks") or []
    kept = [c for c in callbacks if not str(c.get("class_path", "")).endswith("LearningRateMonitor")]
    if len(kept) != len(callbacks):
        warnings.warn("trainer.logger=false: LearningRateMonitor left out (it needs a logger)", stacklevel=2)
        trainer_config.callbacks = kept


def cli_main(args=None, run: bool = True, exit_on_error: bool = True) -> OrthoTrainCLI:
    """The LightningCLI of the toolkit. `exit_on_error=False`: a parse error raises (for `main`)
    instead of printing the usage and exiting."""
    parser_kwargs = {"exit_on_error": exit_on_error}
    parser_kwargs |= {name: {"exit_on_error": exit_on_error} for name in OrthoTrainCLI.subcommands()}
    return OrthoTrainCLI(
        model_class=None,
        datamodule_class=CanaryDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        parser_kwargs=parser_kwargs,
        save_config_kwargs={"overwrite": True},
    )


def main(args=None) -> int:
    """`cli_main` for a person: a failure ends with `error: <setting>: <message>` on stderr
    (`ortho_train.cli_errors`); returns the exit status."""
    return run_reporting_errors(lambda: cli_main(args, exit_on_error=False))


if __name__ == "__main__":
    quiet_library_chatter()  # progress, tables and paths on the console; not Lightning's tips
    configure_threads()  # the cores this process may use (OMP_NUM_THREADS overrides), not the machine's
    sys.exit(main())
