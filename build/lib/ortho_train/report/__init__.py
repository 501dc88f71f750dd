"""A self-contained HTML report of run directories (`python -m ortho_train.report RUN_DIR ...`).

`load` reads a run's artifacts, one module per section draws its figures with matplotlib
(Agg, no pyplot state), `html` embeds them as PNG data URIs, `build` ties them together.
"""
from ortho_train.report.build import build_report
from ortho_train.report.load import RunArtifacts, load_run

__all__ = ["RunArtifacts", "build_report", "load_run"]
