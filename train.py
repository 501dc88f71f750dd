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
from ortho_train.run_paths import check_model_dir, checkpoint_run_dir  # noqa: E402
from ortho_train.run_setup import RunDirectories, default_key_file  # noqa: E402
from ortho_train.resume_check import check_resume  # noqa: E402
from ortho_train.settings import check_trainer_settings  # noqa: E402
from ortho_train.threads import configure_threads  # noqa: E402


class OrthoTrainCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        self.run_dirs = RunDirectories()  # what this launch reserved (removed on a failed start)
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
        key_file = default_key_file(config)
        self.new_key_file = None if key_file is None or key_file.exists() else key_file
        model_args = config.model.get("init_args") if isinstance(config.model, Namespace) else None
        if model_args is not None and model_args.get("model_path") is not None:
            check_model_dir(model_args.model_path, "model.init_args.model_path")
        resumed = checkpoint_run_dir(config.get("ckpt_path"))  # --ckpt_path: continue in its run directory
        if resumed is not None:
            as_saved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
            check_resume(resumed, as_saved, str(config.get("ckpt_path")))
        self.run_dirs.assign(config.trainer, resumed)  # one version_N for every logger (ortho_train.run_setup)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:  # a setting refused while the classes are built: drop the reservation
            self.run_dirs.remove_reserved()
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
        """After a failure before the first optimiser step: the key file this launch created and
        the run directories holding nothing but logger files (rank zero; other ranks write none)."""
        trainer = self.trainer
        if trainer.global_step > 0 or not trainer.is_global_zero:
            return
        self._remove_new_key_file()
        self.run_dirs.remove_unstarted(trainer)


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
