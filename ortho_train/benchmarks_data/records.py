"""Rows of a benchmark file, from a local JSON / JSON Lines file or from the Hugging Face hub.

A local file holds either one JSON array of rows or one JSON value per line (JSON Lines, the
format of TOFU's hub files); a row is an object, or a bare string for text-only splits (MUSE's
own download script writes those). Every failure names the file (or hub dataset) and, for a
missing or mistyped field, the row and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class BenchmarkDataError(ValueError):
    """A benchmark file or hub split is missing, unreadable, or lacks a field."""


def read_records(path: str | Path) -> list[Any]:
    """The rows of a local `.json` file: a JSON array, or JSON Lines (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: no such file (the expected layout is in docs/benchmarks.md)")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(f"{path}: not valid JSON ({err})") from None
        return list(rows)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BenchmarkDataError(f"{path}:{number}: not a JSON value ({err.msg})") from None
    if not rows:
        raise BenchmarkDataError(f"{path}: no rows")
    return rows


def hub_records(path: str, name: str, split: str) -> list[dict]:
    """The rows of `split` of the hub dataset `path`, config `name` (`datasets.load_dataset`)."""
    where = f"hub dataset {path!r} config {name!r} split {split!r}"
    try:
        import datasets
    except ImportError:
        raise BenchmarkDataError(f"{where}: reading from the hub needs the `datasets` package; or pass a "
                                 "local directory laid out as docs/benchmarks.md says") from None
    try:
        loaded = datasets.load_dataset(path, name, split=split)
    except Exception as err:  # offline, unknown config, auth: `datasets` raises many types
        raise BenchmarkDataError(f"{where}: could not be loaded ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}); offline, download its files "
                                 "and pass their directory (docs/benchmarks.md)") from err
    return [dict(row) for row in loaded]


def text_field(row: Any, field: str, where: str, index: int) -> str:
    """`row[field]` as a string; an error naming `where`, the row and the field otherwise."""
    if not isinstance(row, dict):
        raise BenchmarkDataError(f"{where}: row {index} is a {type(row).__name__}, expected an object "
                                 f"with a {field!r} field")
    if field not in row:
        raise BenchmarkDataError(f"{where}: row {index} has no field {field!r} (it has: {', '.join(sorted(row))})")
    value = row[field]
    if not isinstance(value, str):
        raise BenchmarkDataError(f"{where}: row {index} field {field!r} is a {type(value).__name__}, "
                                 "expected a string")
    return value


def text_list_field(row: Any, field: str, where: str, index: int) -> tuple[str, ...]:
    """`row[field]` as a non-empty tuple of strings (TOFU's `perturbed_answer`)."""
    if not isinstance(row, dict) or field not in row:
        text_field(row, field, where, index)  # raises the missing-field error
    value = row[field]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BenchmarkDataError(f"{where}: row {index} field {field!r} should be a non-empty list of strings")
    return tuple(value)


def plain_text(row: Any, field: str, where: str, index: int) -> str:
    """A text-only row: a bare string, or an object's `field`."""
    return row if isinstance(row, str) else text_field(row, field, where, index)


def first(rows: list, limit: int | None) -> list:
    """The first `limit` rows (all with None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be ≥ 1 or None, got {limit}")
    return rows if limit is None else rows[:limit]
