"""Build the report of one or more run directories and write it atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ortho_train.artifacts import write_text_atomic
from ortho_train.report.comparison import comparison_section
from ortho_train.report.html import render_page
from ortho_train.report.kill_switch import kill_switch_section
from ortho_train.report.load import RunArtifacts, load_run
from ortho_train.report.memorisation import memorisation_section
from ortho_train.report.over_training import over_training_section
from ortho_train.report.privacy import privacy_section
from ortho_train.report.privleak import privleak_section
from ortho_train.report.relearning import relearning_section
from ortho_train.report.roc import deployments_roc_section
from ortho_train.report.run_section import run_section
from ortho_train.report.section import Section
from ortho_train.report.seeds import seeds_section
from ortho_train.report.separation import separation_section
from ortho_train.report.training import training_section
from ortho_train.report.unlearning import unlearning_section

RUN_SECTIONS: tuple[tuple[str, str, Callable[[RunArtifacts], Section]], ...] = (
    ("run", "Run", run_section),
    ("training", "Training", training_section),
    ("memorisation", "Memorisation", memorisation_section),
    ("deployments_roc", "MIA ROC per deployment", deployments_roc_section),
    ("kill_switch", "Kill switch", kill_switch_section),
    ("privacy", "Privacy (ε vs utility and MIA)", privacy_section),
    ("separation", "Separation (LMC, η, SVD split, pruning)", separation_section),
    ("unlearning", "Unlearning and the PTQ gap", unlearning_section),
    ("privleak", "PrivLeak", privleak_section),
    ("relearning", "Relearning", relearning_section),
    ("over_training", "Over training", over_training_section),
)
CROSS_RUN_SECTIONS: tuple[tuple[str, str, Callable[[list[RunArtifacts]], Section]], ...] = (
    ("comparison", "Comparison", comparison_section),
    ("seeds", "Seeds: mean and 95% interval per configuration", seeds_section),
)


def _guarded(key: str, title: str, build: Callable[[], Section]) -> Section:
    """A section, or its one skip line when its files hold something unexpected."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        return Section(key, title, skipped=f"could not be drawn from this run's files "
                                           f"({type(err).__name__}: {err})")


def run_sections(run: RunArtifacts) -> list[Section]:
    """Every per-run section of `run`, in report order."""
    return [_guarded(key, title, lambda b=build: b(run)) for key, title, build in RUN_SECTIONS]


def build_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the HTML report of `run_dirs` to `out`; returns its path."""
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    blocks = [(run.name, list(run.problems.values()), run_sections(run)) for run in runs]
    extra = [_guarded(key, title, lambda b=build: b(runs)) for key, title, build in CROSS_RUN_SECTIONS]
    title = "ortho-train report: " + ", ".join(run.name for run in runs)
    page = render_page(title, blocks, extra,
                       footer=f"built by ortho_train.report from {', '.join(str(r.path) for r in runs)}")
    return write_text_atomic(out, page)
