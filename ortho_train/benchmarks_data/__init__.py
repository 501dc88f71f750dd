"""Readers of the published unlearning benchmarks' data: TOFU (`tofu`) and MUSE (`muse`).

Each reads a split from the Hugging Face hub (`datasets.load_dataset`, when online) or, given a
directory, from local JSON / JSON Lines files laid out as the hub (TOFU) or the benchmark's own
download script (MUSE) stores them; docs/benchmarks.md gives both layouts. A missing file or
field raises `BenchmarkDataError` naming the path, the row and the field. Pure Python: no torch.
"""
from ortho_train.benchmarks_data.records import BenchmarkDataError

__all__ = ["BenchmarkDataError"]
