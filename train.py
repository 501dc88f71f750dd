"""ortho-train entry point: `python train.py fit --config configs/quickstart.yaml`.

Any LightningModule of the toolkit is selected by `model.class_path` in the config; the data
module is always `CanaryDataModule`. `--print_config` prints a complete, editable config.

Threads: torch uses as many as the cores this process may run on (its CPU affinity and cgroup
quota; `OMP_NUM_THREADS` overrides), and they wait passively (`OMP_WAIT_POLICY=PASSIVE` unless
set): beside another busy process a 2-thread run then slows ~1.5×, not ~2.7×
(`python -m ortho_train.threads_bench`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ortho_train.threads import set_passive_wait

set_passive_wait()  # before torch loads OpenMP: its threads sleep, not spin, beside other processes

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from ortho_train.datamodule import CanaryDataModule  # noqa: E402
from ortho_train.run_paths import remove_if_unstarted, reserve_version  # noqa: E402
from ortho_train.threads import configure_threads  # noqa: E402


class OrthoTrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the model's: a local model directory brings its own, a model built
        # from a config uses bytes.
        parser.link_arguments(
            "model.init_args.model_path", "data.tokenizer", compute_fn=lambda path: path or "byte"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        if loggers is False:
            # Without a logger Lightning writes into default_root_dir itself, and every such run
            # would replace the previous one's artifacts: give it its own version directory.
            root = Path(config.trainer.default_root_dir or ".")
            config.trainer.default_root_dir = str(root / f"version_{reserve_version(root)}")
            _drop_callbacks_needing_a_logger(config.trainer)
            return
        # TensorBoard and CSV loggers each pick "the next free version" and so land in
        # different directories; give all of them the first one's, so a run has one log dir.
        if not isinstance(loggers, list) or len(loggers) < 2:
            return
        first = loggers[0].init_args
        if first.get("version") is None:
            first.version = reserve_version(Path(first.save_dir) / (first.get("name") or ""))
            # The directory is new; the other loggers' files in it are this run's own, and
            # CSVLogger would only remove a metrics.csv that does not exist yet.
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        for logger in loggers[1:]:
            if logger.init_args.get("version") is None:
                logger.init_args.version = first.version

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_unstarted_run_dirs()
            raise

    def _remove_unstarted_run_dirs(self) -> None:
        """After a failure before the first optimiser step, drop run directories holding
        nothing but logger files (rank zero; other ranks write none)."""
        trainer = self.trainer
        if trainer.global_step > 0 or not trainer.is_global_zero:
            return
        candidates = {Path(trainer.default_root_dir)} if not trainer.loggers else set()
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir is not None:
                candidates.add(Path(log_dir))
        for run_dir in candidates:
            remove_if_unstarted(run_dir)


def _drop_callbacks_needing_a_logger(trainer_config) -> None:
    """LearningRateMonitor refuses a Trainer without a logger; with `logger=false` it has nothing
    to write to, so it is left out (with a warning) instead of failing the run at start-up."""
    callbacks = trainer_config.get("callbacks") or []
    kept = [c for c in callbacks if not str(c.get("class_path", "")).endswith("LearningRateMonitor")]
    if len(kept) != len(callbacks):
        warnings.warn("trainer.logger=false: LearningRateMonitor left out (it needs a logger)", stacklevel=2)
        trainer_config.callbacks = kept


def cli_main(args=None, run: bool = True) -> OrthoTrainCLI:
    return OrthoTrainCLI(
        model_class=None,
        datamodule_class=CanaryDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    configure_threads()  # the cores this process may use (OMP_NUM_THREADS overrides), not the machine's
    cli_main()
