"""TOFU and MUSE evaluations of a local model: `tofu_eval`, `muse_eval` (the benchmarks' metrics
from `ortho_train.metrics.tofu` / `.muse` / `.rouge` on data from `ortho_train.benchmarks_data`),
`text_io` (prompt encoding and greedy text answers), `report` (atomic JSON + markdown) and the
command line in `cli` (`python -m ortho_train.measurement.benchmarks`; docs/benchmarks.md).
"""
