"""TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"): question–answer
pairs about 200 fictitious authors, read from the hub (`locuslab/TOFU`) or from local files.

Hub: every config has one split, ``train``. Configs: ``full``, ``forget01/05/10`` (1/5/10% of
the authors) with ``retain99/95/90`` (the rest: a retain-only model trains on these), the
evaluation sets ``forget01/05/10_perturbed``, ``retain_perturbed``, ``real_authors_perturbed``
and ``world_facts_perturbed``, and ``real_authors`` / ``world_facts`` / ``holdout01/05/10``.
Local: the hub's own files, ``<dir>/<config>.json`` (JSON Lines or a JSON array), as the hub
repository stores them.

Fields (`question`, `answer` everywhere; the perturbed sets add `perturbed_answer`, a list of
false answers, and the forget / retain ones `paraphrased_answer` and `paraphrased_question`).
Checked against the dataset card and TOFU's and open-unlearning's evaluation configs
(docs/benchmarks.md); the names are the constants below, so a renamed field is a one-line change.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ortho_train.benchmarks_data.records import (BenchmarkDataError, first, hub_records, read_records, text_field,
                                                 text_list_field)

HUB_PATH = "locuslab/TOFU"
HUB_SPLIT = "train"
QUESTION = "question"
ANSWER = "answer"
PARAPHRASED_ANSWER = "paraphrased_answer"
PERTURBED_ANSWER = "perturbed_answer"
PARAPHRASED_QUESTION = "paraphrased_question"

FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
CONFIGS = frozenset({"full", *FORGET_SPLITS, *RETAIN_OF.values(), "real_authors", "world_facts",
                     *(f"{s}_perturbed" for s in FORGET_SPLITS), "retain_perturbed", "real_authors_perturbed",
                     "world_facts_perturbed", "holdout01", "holdout05", "holdout10"})
# The evaluation sets: (config, the field holding the answer the truth ratio compares against).
# On Real Authors / World Facts the true answer plays the paraphrase's part (TOFU's evaluation config).
EVAL_SETS = ("forget", "retain", "real_authors", "world_facts")


def eval_config(eval_set: str, forget: str) -> tuple[str, str]:
    """(hub config, reference-answer field) of one evaluation set for the forget split `forget`."""
    return {"forget": (f"{forget}_perturbed", PARAPHRASED_ANSWER),
            "retain": ("retain_perturbed", PARAPHRASED_ANSWER),
            "real_authors": ("real_authors_perturbed", ANSWER),
            "world_facts": ("world_facts_perturbed", ANSWER)}[eval_set]


@dataclass(frozen=True)
class TofuQA:
    """One TOFU question. `reference` is the answer the truth ratio sets against the perturbed
    ones (the paraphrase on forget / retain, the answer itself on Real Authors / World Facts);
    None for training configs."""
    question: str
    answer: str
    reference: str | None = None
    perturbed: tuple[str, ...] = ()


def _source(config: str, data_dir: str | Path | None) -> tuple[list, str]:
    if config not in CONFIGS:
        raise BenchmarkDataError(f"TOFU has no config {config!r}; choose one of {', '.join(sorted(CONFIGS))}")
    if data_dir is None:
        return hub_records(HUB_PATH, config, HUB_SPLIT), f"{HUB_PATH}:{config}"
    path = Path(data_dir) / f"{config}.json"
    return read_records(path), str(path)


def load_tofu(config: str, data_dir: str | Path | None = None, limit: int | None = None,
              reference_field: str | None = None) -> list[TofuQA]:
    """The rows of one TOFU config: from `data_dir/<config>.json`, or the hub when `data_dir` is None.

    With `reference_field`, every row must also hold it and a `perturbed_answer` list (an
    evaluation set); an error names the file, the row and the missing field.
    """
    rows, where = _source(config, data_dir)
    items = []
    for i, row in enumerate(first(rows, limit)):
        question, answer = text_field(row, QUESTION, where, i), text_field(row, ANSWER, where, i)
        if reference_field is None:
            items.append(TofuQA(question, answer))
            continue
        items.append(TofuQA(question, answer, text_field(row, reference_field, where, i),
                            text_list_field(row, PERTURBED_ANSWER, where, i)))
    return items


def load_tofu_eval_sets(forget: str = "forget10", data_dir: str | Path | None = None,
                        limit: int | None = None) -> dict[str, list[TofuQA]]:
    """The four evaluation sets of a forget split: {"forget", "retain", "real_authors",
    "world_facts"} → their questions with reference and perturbed answers."""
    if forget not in FORGET_SPLITS:
        raise BenchmarkDataError(f"TOFU forget split {forget!r}: choose one of {', '.join(FORGET_SPLITS)}")
    sets = {}
    for name in EVAL_SETS:
        config, field = eval_config(name, forget)
        sets[name] = load_tofu(config, data_dir, limit, reference_field=field)
    return sets
