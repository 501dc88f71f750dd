"""Read what a run directory holds, for the report: JSON tables, `metrics.csv`, the saved config.

Every file is optional. A file that is absent is simply absent (its section says so); a file
that exists but cannot be read (bad JSON, bad CSV, wrong shape) becomes one line in
`RunArtifacts.problems` naming the file and the reason, and the rest of the run still loads.
Only artifacts that never hold secrets or canary text are read: metric tables, ROC rates,
histogram counts, the configuration and logged scalars — never models, data or checkpoints.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

JSON_FILES = {
    "summary": ("summary.json", dict), "sieve_table": ("sieve_table.json", list),
    "ptq_gap": ("ptq_gap.json", dict), "metrics_card": ("metrics_card.json", dict),
    "roc": ("roc.json", dict), "exposure_refs": ("exposure_refs.json", dict),
    "run_info": ("run_info.json", dict), "dp_table": ("dp_table.json", list),
    "separation": ("separation_table.json", dict), "hop_report": ("hop_report.json", dict),
    "relearning": ("relearning.json", (list, dict)),
}
UNSCRUBBED = ("roc", "hop_report")  # lists of rates / per-column errors, checked where drawn
_PERIODIC = re.compile(r"sieve_table_step(\d+)\.json")
# A key holding one of these words is a measurement: a number, or null where it was not measured.
_MEASURED = re.compile(r"rate|exposure|auc|ppl|bits|density|tpr|privleak|accuracy|verbmem|epsilon|seconds")
# Keys that name a measurement word but hold a record: PrivLeak's reference model (path and its
# AUC) or the reason PrivLeak was refused.
_RECORDS = ("privleak_reference", "privleak_refused")
_PERIODIC_PTQ = re.compile(r"ptq_gap_step(\d+)\.json")
STREAMS_DIR = "sieved_isolated"


@dataclass
class RunArtifacts:
    """Everything the report reads from one run directory (None/empty where absent)."""

    path: Path
    name: str
    problems: dict[str, str] = field(default_factory=dict)  # file name -> why it was not read
    config_text: str | None = None
    config: dict = field(default_factory=dict)  # config.yaml parsed ({} when absent or unreadable)
    summary: dict | None = None
    sieve_table: list | None = None
    periodic_tables: dict[int, list] = field(default_factory=dict)  # step -> rows
    periodic_ptq: dict[int, dict] = field(default_factory=dict)  # step -> PTQ measurement
    ptq_gap: dict | None = None
    metrics_card: dict | None = None
    roc: dict | None = None
    exposure_refs: dict | None = None
    run_info: dict | None = None
    dp_table: list | None = None  # DPTableCallback's rows
    separation: dict | None = None  # SeparationTableCallback's {step, rows, notes, eta}
    hop_report: dict | None = None  # SieveCallback(hop_report=true)'s per-column report
    relearning: list | dict | None = None  # the relearning table (rows, or a dict holding them)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metrics.csv columns
    streams: dict | None = None  # sizes of the saved base/ortho streams

    def model_setting(self, name: str):
        """`model.init_args.<name>` of the saved config, or None."""
        model = self.config.get("model")
        init = model.get("init_args") if isinstance(model, dict) else None
        return init.get(name) if isinstance(init, dict) else None

    def absent(self, filename: str) -> str:
        """The note a section shows when `filename` is missing or could not be read (the reason
        itself is shown once, at the top of the run)."""
        if filename in self.problems:
            return f"{filename} unreadable (see the problem noted at the top of this run)"
        return f"this run has no {filename}"


def _read_json(path: Path, kind: type | tuple[type, ...], problems: dict[str, str]):
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems[path.name] = f"{path.name} could not be read ({err}); its plots are left out"
        return None
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        problems[path.name] = (f"{path.name} holds a JSON {type(value).__name__}, not the expected "
                               f"{expected}; its plots are left out")
        return None
    return value


def _is_bad_measurement(key, item) -> bool:
    """A measurement key (`_MEASURED`) holding neither a number nor null (nor an ε of "none": the
    privacy table's word for a model without a DP guarantee)."""
    if key in _RECORDS or (key == "epsilon" and item == "none"):
        return False
    return bool(_MEASURED.search(str(key))) and item is not None and (
        isinstance(item, bool) or not isinstance(item, (int, float)))


def _drop_non_numbers(value, filename: str, problems: dict[str, str]):
    """Null every measurement of `value` (a dict, or a list of row dicts) that is not a number,
    and say so in one line naming the file and the first few values."""
    if isinstance(value, dict) and isinstance(value.get("rows"), list):  # a table with its notes
        _drop_non_numbers(value["rows"], filename, problems)
    rows = value if isinstance(value, list) else [value]
    bad = []
    for index, row in enumerate(rows):
        for key, item in (row.items() if isinstance(row, dict) else ()):
            if _is_bad_measurement(key, item):
                bad.append(f"{filename}{f'[{index}]' if isinstance(value, list) else ''}.{key} = {item!r}")
                row[key] = None
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        problems[filename] = f"{filename} holds values that are not numbers ({shown}); they are shown as –"
    return value


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Columns of a Lightning `metrics.csv` as `{column: [(step, value), ...]}`, blanks dropped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError("no 'step' column")
        for line, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError) as err:
                raise ValueError(f"line {line}: bad step {row['step']!r}") from err
            for column, cell in row.items():
                if column in ("step", "epoch") or column is None or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError as err:
                    raise ValueError(f"line {line}, column {column!r}: {cell!r} is not a number") from err
                if math.isfinite(value):
                    series.setdefault(column, []).append((step, value))
    return series


def _streams(run_dir: Path, problems: dict[str, str]) -> dict | None:
    """Sizes (bytes) of the saved base and ortho stream files and their metadata."""
    directory = run_dir / STREAMS_DIR
    config = _read_json(directory / "sieve_config.json", dict, problems)
    if config is None:
        return None
    sizes = {f.name: f.stat().st_size for f in directory.glob("*.safetensors")}
    return {"files": sizes, "metadata": config.get("metadata", {})}


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Read every report input of `run_dir` (see the module docstring)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    name = path.name if path.parent.name in ("", ".") else f"{path.parent.name}/{path.name}"
    run = RunArtifacts(path=path, name=name)
    for attribute, (filename, kind) in JSON_FILES.items():
        value = _read_json(path / filename, kind, run.problems)
        if value is not None and attribute not in UNSCRUBBED:
            value = _drop_non_numbers(value, filename, run.problems)
        setattr(run, attribute, value)
    for table in sorted(path.glob("sieve_table_step*.json")):
        match = _PERIODIC.fullmatch(table.name)
        rows = _read_json(table, list, run.problems) if match else None
        if rows is not None:
            run.periodic_tables[int(match.group(1))] = rows
    for measurement in sorted(path.glob("ptq_gap_step*.json")):
        match = _PERIODIC_PTQ.fullmatch(measurement.name)
        values = _read_json(measurement, dict, run.problems) if match else None
        if values is not None:
            run.periodic_ptq[int(match.group(1))] = values
    config = path / "config.yaml"
    if config.is_file():
        run.config_text = config.read_text(encoding="utf-8", errors="replace")
        try:
            parsed = yaml.safe_load(run.config_text)
        except yaml.YAMLError as err:
            run.problems["config.yaml"] = f"config.yaml could not be parsed ({err}); shown as text only"
        else:
            run.config = parsed if isinstance(parsed, dict) else {}
    metrics_csv = path / "metrics.csv"
    if metrics_csv.is_file():
        try:
            run.series = read_metrics_csv(metrics_csv)
        except (ValueError, csv.Error, UnicodeDecodeError) as err:
            run.problems["metrics.csv"] = f"metrics.csv could not be read ({err}); its plots are left out"
    run.streams = _streams(path, run.problems)
    return run
