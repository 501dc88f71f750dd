"""ortho-train entry point: `python train.py fit --config configs/quickstart.yaml`.

Any LightningModule of the toolkit is selected by `model.class_path` in the config; the data
module is always `CanaryDataModule`. `--print_config` prints a complete, editable config.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from ortho_train.datamodule import CanaryDataModule


def _next_version(save_dir: str, name: str) -> int:
    root = Path(save_dir) / (name or "")
    taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(taken, default=-1) + 1


class OrthoTrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the model's: a local model directory brings its own, a model built
        # from a config uses bytes.
        parser.link_arguments(
            "model.init_args.model_path", "data.tokenizer", compute_fn=lambda path: path or "byte"
        )

    def before_instantiate_classes(self) -> None:
        # TensorBoard and CSV loggers each pick "the next free version" and so land in
        # different directories; give all of them the first one's, so a run has one log dir.
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        if not isinstance(loggers, list) or len(loggers) < 2:
            return
        first = loggers[0].init_args
        if first.get("version") is None:
            first.version = _next_version(first.save_dir, first.get("name", ""))
            # The directory is new; the other loggers' files in it are this run's own, and
            # CSVLogger would only remove a metrics.csv that does not exist yet.
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        for logger in loggers[1:]:
            if logger.init_args.get("version") is None:
                logger.init_args.version = first.version


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
    cli_main()
