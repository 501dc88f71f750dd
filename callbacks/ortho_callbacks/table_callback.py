"""`TableCallback`: the skeleton every measurement-table callback shares (kill-switch, privacy, separation).

A subclass names its table (`name`: the files `<run>/<name>.json` / `.md`, `<name>_step<N>.*` for
periodic tables; `title`: its progress lines) and says how to build it (`build`: a table object of
`ortho_train.measurement` whose `run()` returns the rows), what its notes are (`notes`) and how its
rows become markdown (`to_markdown`). The base does the rest:

- when: every `every_n_steps` optimiser steps of the canary phase (`periodic_table_due`) and/or in
  `on_fit_end` (Lightning runs callbacks' `on_train_end` *before* the module's, which saves the
  model and the summary; a failing table loses neither), on rank zero only;
- calibration: `calibration_batches` public training batches, their Hessians of every linear
  (`collect_hessians`), drawn under `fork_rng` so the table never shifts the training RNG;
- cost: a `RowMeter` prints `[<title>] row i/n: …` on stderr as each row is computed and adds
  to every row its `seconds` and the process's peak RSS (`peak_rss_mib`, from
  `resource.getrusage(RUSAGE_SELF).ru_maxrss`), which land in the JSON and in a markdown note;
- writing: the JSON and the markdown atomically (`ortho_train.artifacts`), the rows to
  TensorBoard (`log_rows`), the final markdown printed.

Reads only public attributes of the module (each subclass lists its own).
"""
from __future__ import annotations

import copy
import time
from itertools import islice
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ortho_train.artifacts import write_json_atomic, write_text_atomic
from ortho_train.curvature import collect_hessians
from ortho_train.measurement.attacks import needs_reference
from ortho_train.measurement.progress import RowMeter
from ortho_train.model_support import require_linear_only
from ortho_train.models import linear_layers


def periodic_table_due(trainer, pl_module, every_n_steps: int) -> bool:
    """A periodic table is due: every N steps of the canary phase, before the final step, rank zero."""
    step = trainer.global_step
    started = pl_module.pre_canary_state_dict is not None  # the canary phase has begun
    before_final = trainer.max_steps < 0 or step < trainer.max_steps  # max_steps -1: epoch-bounded
    return bool(every_n_steps and step % every_n_steps == 0 and started and before_final
                and trainer.is_global_zero)


class TableCallback(L.Callback):
    """Builds, times, writes and logs one measurement table (see the module docstring).

    Args:
        every_n_steps: also build a table every N optimiser steps of the canary phase (0: never).
        at_fit_end: build the table when fitting ends (after the module's model and summary).
        calibration_batches: public training batches for the Hessians (`calibration`).
    """

    name: ClassVar[str]   # file stem: <run>/<name>.json, <name>.md
    title: ClassVar[str]  # progress lines: [<title>] row i/n: …

    def __init__(self, every_n_steps: int = 0, at_fit_end: bool = True, calibration_batches: int = 8):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be ≥ 0, got {every_n_steps}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be ≥ 1, got {calibration_batches}")
        self.every_n_steps, self.at_fit_end = every_n_steps, at_fit_end
        self.calibration_batches = calibration_batches
        self.tables: dict[int, list[dict]] = {}  # step -> rows
        self.rows: list[dict] | None = None      # the final table's rows
        self.markdown: str | None = None         # the final table's markdown

    # ------------------------------------------------------------ subclass API
    def build(self, trainer, pl_module, model, meter: RowMeter):
        """The table object (its `run()` returns the rows) of `model`, a float32 copy of the module's."""
        raise NotImplementedError

    def notes(self, trainer, pl_module, table) -> list[str]:
        """The markdown notes of `table` (the base appends the cost note and the build time)."""
        return []

    def to_markdown(self, rows: list[dict], notes: list[str]) -> str:
        raise NotImplementedError

    def payload(self, trainer, table, rows: list[dict], notes: list[str]):
        """What `<name>.json` holds (default: the rows)."""
        return rows

    def log_rows(self, trainer, rows: list[dict]) -> None:
        """Write the rows to the loggers (TensorBoard)."""

    def after(self, trainer, pl_module, model, table, suffix: str, final: bool) -> None:
        """Anything else a table writes once it is built (default: nothing)."""

    def ready(self, trainer, pl_module) -> bool:
        """The final table can be built (default: always)."""
        return True

    @staticmethod
    def row_label(row: dict) -> str:
        """A row's name in the cost note."""
        return str(row.get("variant") or row.get("kind"))

    def needs_reference(self) -> bool:
        """The table's metrics need the pre-canary model as a reference (rmia, an RMIA audit)."""
        config = getattr(self, "config", None)
        attacks = getattr(config, "attacks", None)  # the separation table has none
        return attacks is not None and needs_reference(config.metrics, attacks)

    @staticmethod
    def pre_canary_model(pl_module):
        """A float32 copy of the module's model holding its pre-canary weights (None before the canary phase)."""
        state = getattr(pl_module, "pre_canary_state_dict", None)
        if state is None:
            return None
        pre_model = copy.deepcopy(pl_module.model)
        pre_model.load_state_dict(state)
        return pre_model.float().eval()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse, before any training, a model whose projections the table would skip (Conv1D), and
        reference attacks on a module that keeps no pre-canary model."""
        require_linear_only(pl_module.model, f"{type(self).__module__}.{type(self).__name__}")
        if self.needs_reference() and not hasattr(pl_module, "pre_canary_state_dict"):
            raise ValueError(f"{type(self).__name__}: table.metrics={self.config.metrics} asks for rmia (or an "
                             f"RMIA audit), which needs the pre-canary model; {type(pl_module).__name__} keeps "
                             "none: remove rmia/audit or set table.attacks.audit.score='loss'")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if periodic_table_due(trainer, pl_module, self.every_n_steps):
            self.write_table(trainer, pl_module, suffix=f"_step{trainer.global_step}")

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and trainer.is_global_zero and self.ready(trainer, pl_module):
            self.write_table(trainer, pl_module, suffix="", final=True)
            print(f"\n{self.title} ({self.name}.md):\n" + self.markdown, flush=True)

    # ------------------------------------------------------------------- work
    def calibration(self, trainer, model) -> dict[str, torch.Tensor]:
        """Hessians of every linear of `model` over `calibration_batches` public training batches."""
        modules = linear_layers(model, include_lm_head=True)
        with torch.random.fork_rng():  # drawing batches must not shift the training RNG
            return collect_hessians(model, trainer.datamodule.public_train_dataloader(), modules,
                                    self.calibration_batches)

    def calibration_batch_list(self, trainer) -> list[dict]:
        """The same `calibration_batches` public training batches themselves, for a true-sequential
        walk (`ortho_train.quantisation.sequential`), drawn under `fork_rng` as the Hessians are."""
        with torch.random.fork_rng():
            return list(islice(trainer.datamodule.public_train_dataloader(), self.calibration_batches))

    def write_table(self, trainer, pl_module, suffix: str, final: bool = False) -> list[dict]:
        """Build the table, write `<name><suffix>.json` / `.md`, log its rows; returns the rows."""
        start = time.perf_counter()
        rank_zero_info(f"{type(self).__name__}: building the {self.title} at step {trainer.global_step}…")
        # float32 copy: quantisers, sieves and metrics run in float32 whatever model.dtype is
        model = copy.deepcopy(pl_module.model).float().eval()
        meter = RowMeter(self.title)
        table = self.build(trainer, pl_module, model, meter)
        rows = table.run()
        notes = self.notes(trainer, pl_module, table) + [meter.note(self.row_label),
                                                        f"table built in {time.perf_counter() - start:.0f} s"]
        markdown = self.to_markdown(rows, notes)
        run_dir = pl_module.run_dir
        write_json_atomic(run_dir / f"{self.name}{suffix}.json", self.payload(trainer, table, rows, notes))
        write_text_atomic(run_dir / f"{self.name}{suffix}.md", markdown)
        self.tables[trainer.global_step] = rows
        if final:
            self.rows, self.markdown = rows, markdown
        self.after(trainer, pl_module, model, table, suffix, final)
        self.log_rows(trainer, rows)
        rank_zero_info(f"{type(self).__name__}: table written to {run_dir / f'{self.name}{suffix}.md'}")
        return rows
