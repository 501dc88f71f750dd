"""The benchmark result files: `<name>.json` (every number) and `<name>.md` (a table), each written
atomically (temp file, then rename), so a reader never sees half a file."""
from __future__ import annotations

from pathlib import Path

from ortho_train.artifacts import write_json_atomic, write_text_atomic
from ortho_train.measurement.formatting import format_value, markdown_table

TOFU_SETS = (("forget", "forget"), ("retain", "retain"), ("real_authors", "RA"), ("world_facts", "WF"))
TOFU_METRICS = (("probability", "prob"), ("rouge_l_recall", "ROUGE-L R"), ("truth_ratio", "TR"))


def tofu_table(rows: dict[str, dict], notes: list[str]) -> str:
    """One line per model: forget quality, model utility, then {prob, ROUGE-L recall, truth-ratio
    score} of each set."""
    head = "| model | forget quality | model utility | " + " | ".join(
        f"{short} {label}" for _, short in TOFU_SETS for _, label in TOFU_METRICS) + " |"
    cells = []
    for name, summary in rows.items():
        line = [name, format_value(summary["forget_quality"], 4), format_value(summary["model_utility"])]
        line += [format_value(summary["sets"][s][m]) for s, _ in TOFU_SETS for m, _ in TOFU_METRICS]
        cells.append(line)
    return markdown_table(head, cells, notes)


MUSE_COLUMNS = (("verbmem_f", "VerbMem forget"), ("knowmem_f", "KnowMem forget"), ("knowmem_r", "KnowMem retain"),
                ("privleak_auc", "Min-K% AUC (holdout vs forget)"), ("privleak", "PrivLeak %"))


def muse_table(rows: dict[str, dict], notes: list[str]) -> str:
    head = "| model | " + " | ".join(label for _, label in MUSE_COLUMNS) + " |"
    cells = [[name] + [format_value(summary.get(key)) for key, _ in MUSE_COLUMNS] for name, summary in rows.items()]
    return markdown_table(head, cells, notes)


def write_results(out_dir: str | Path, name: str, record: dict, table: str) -> tuple[Path, Path]:
    """`out_dir/<name>.json` and `out_dir/<name>.md`, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out_dir / f"{name}.json", record)
    md_path = write_text_atomic(out_dir / f"{name}.md", table)
    return json_path, md_path
