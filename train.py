"""ortho-train entry point: `python train.py fit --config configs/quickstart.yaml`.

Any LightningModule of the toolkit is selected by `model.class_path` in the config; the data
module is always `CanaryDataModule`. `--print_config` prints a complete, editable config.
"""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from ortho_train.datamodule import CanaryDataModule


class OrthoTrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the model's: a local model directory brings its own, a model built
        # from a config uses bytes.
        parser.link_arguments(
            "model.init_args.model_path", "data.tokenizer", compute_fn=lambda path: path or "byte"
        )


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
