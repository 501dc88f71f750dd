"""`RelearningCallback`: does the forgetting survive quantisation *and* a little relearning?

After unlearning, copies of the unlearned model (LoRA merged, float32) and of each configured
reference (the model unlearning began from, or one that never saw a canary) are fine-tuned for a
few steps on public text only and on a seeded part of the forget set, then the rest of the forget
set is measured in full precision and in every 4-bit format the PTQ gap measures
(`ortho_train.measurement.relearning`, which documents the procedure and the JSON schema).
Writes `<run>/relearning.json` and `<run>/relearning.md` (rows model × condition × steps ×
deployment; columns extraction of the held-out forget secrets and their mean NLL) and prints the table.

It runs in `on_fit_end`, after the module's `on_train_end` and the model export
(`AdapterExportCallback.on_train_end`), so the trained model is on disk first; the run's model is
never modified (every relearned model is a copy). Placed after `PTQGapCallback` in a config, it
does not run when that callback fails the run (`fail_on_gap`): forgetting that quantisation
already undoes needs no relearning attack.

Formats and their settings are the `PTQGapCallback`'s of the same trainer unless given here; a
run with neither is refused at start-up, as are a forget set too small to split and a reference
directory that does not exist; `pre_canary` where the start model has no `hf_model_pre_canary`
beside it (a model not written by ortho-train's canary SFT) is skipped with a warning, and
`relearning.json` says so (`skipped`). Reads the module's public attributes `model`, `model_path`,
`forget_probe`, `run_dir`; public windows from the datamodule's `public_train_dataloader()`. Rank zero only.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_train.artifacts import write_json_atomic, write_text_atomic
from ortho_train.measurement.relearning import RelearningTable, to_markdown
from ortho_train.measurement.relearning_config import PRE_CANARY, START, RelearningConfig, split_forget
from ortho_train.model_support import merged_copy
from ortho_train.models import load_causal_lm
from ortho_train.quantisation import PTQConfig, canonical_format, deployment_formats
from ortho_train.settings import SettingError, check_settings, show


class RelearningCallback(L.Callback):
    """The relearning table at the end of an unlearning fit (see the module docstring).

    Args:
        relearning: the attack (`RelearningConfig`: steps, lr, batch size, seed, relearn fraction,
            conditions, reference models).
        formats: 4-bit deployment formats of the relearned copies (None: the `PTQGapCallback`'s).
        quant: their settings (None: the `PTQGapCallback`'s, else `PTQConfig()`).
    """

    name = "relearning"

    def __init__(self, relearning: RelearningConfig | None = None, formats: list[str] | None = None,
                 quant: PTQConfig | None = None):
        super().__init__()
        self.config = relearning if relearning is not None else RelearningConfig()
        if formats is not None:
            check_settings("RelearningCallback", [
                ("formats", formats, bool(formats) and all(canonical_format(f) in deployment_formats() for f in formats),
                 f"needs at least one 4-bit deployment format from {show(list(deployment_formats()))} "
                 "(or null: the PTQGapCallback's)")])
        self._formats, self._quant = formats, quant
        self.formats: list[str] = []
        self.settings = PTQConfig()
        self.references: dict[str, Path] = {}
        self.skipped: dict[str, str] = {}  # reference -> why it was not relearnt
        self.rows: list[dict] | None = None
        self.markdown: str | None = None

    # ------------------------------------------------------------ start-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Resolve the deployments and references, and check the forget set splits, before training."""
        ptq = next((c for c in trainer.callbacks if isinstance(c, PTQGapCallback)), None)
        if self._formats is None and ptq is None:
            raise SettingError("RelearningCallback.formats=None: no 4-bit deployment to measure the relearned "
                               "copies in: add a PTQGapCallback (its formats are used) or list formats")
        self.formats = list(self._formats if self._formats is not None else ptq.formats)
        self.settings = self._quant or (ptq.settings if ptq is not None else PTQConfig())
        split_forget(len(trainer.datamodule.forget_probe.members), self.config.relearn_fraction, self.config.seed)
        self.references, self.skipped = {}, {}
        for name in self.config.references:
            path = self.reference_path(pl_module, name)
            if path is None:  # `pre_canary` of a model that no canary SFT of ortho-train wrote
                self.skipped[name] = f"no hf_model_pre_canary beside {pl_module.model_path}"
                rank_zero_warn(f"RelearningCallback: reference {name!r} skipped: {self.skipped[name]}")
            else:
                self.references[name] = path

    @staticmethod
    def reference_path(pl_module, name: str) -> Path | None:
        """The directory a reference names: `start` → `model_path`, `pre_canary` → the
        `hf_model_pre_canary` beside it (None where there is none), anything else → itself;
        refused when it holds no model."""
        model_path = Path(pl_module.model_path)
        path = {START: model_path, PRE_CANARY: model_path.parent / "hf_model_pre_canary"}.get(name, Path(name))
        if (path / "config.json").is_file() or (path.suffix == ".gguf" and path.is_file()):
            return path
        if name == PRE_CANARY:
            return None
        raise SettingError(f"RelearningCallback.relearning.references: {name!r} names {str(path)!r}, which holds "
                           "no model (no config.json); drop it or give a model directory")

    # ---------------------------------------------------------------- work
    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.write_table(pl_module, trainer.datamodule)

    def write_table(self, pl_module, datamodule) -> list[dict]:
        """Relearn, measure, write `relearning.json` / `.md` atomically, print the table; the rows."""
        rank_zero_info(f"RelearningCallback: relearning {1 + len(self.references)} model(s), conditions "
                       f"{self.config.conditions}, steps {self.config.steps}, deployments fp + {self.formats}…")
        models = {"unlearned": lambda: merged_copy(pl_module.model)}
        models |= {name: (lambda path=path: load_causal_lm(path)) for name, path in self.references.items()}
        probe = pl_module.forget_probe
        table = RelearningTable(self.config, models, probe.members, datamodule.public_train_dataloader().dataset,
                                probe.pad_token_id, self.formats, self.settings)
        rows = table.run()
        described = {"unlearned": "the run's model at the end of unlearning (LoRA merged), float32"}
        described |= {name: str(path) for name, path in self.references.items()}
        quantisation = {fmt: self.settings.describe(fmt) for fmt in self.formats}
        notes = table.notes() + [f"reference {name!r} skipped: {why}" for name, why in self.skipped.items()]
        markdown = to_markdown(rows, notes)
        payload = table.payload(described, quantisation) | {"notes": notes, "skipped": self.skipped}
        write_json_atomic(pl_module.run_dir / f"{self.name}.json", payload)
        write_text_atomic(pl_module.run_dir / f"{self.name}.md", markdown)
        self.rows, self.markdown = rows, markdown
        print(f"\nrelearning table ({self.name}.md):\n" + markdown, flush=True)
        return rows
