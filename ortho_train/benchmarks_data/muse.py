"""MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"):
the News (BBC articles) and Books (Harry Potter) corpora, read from the hub
(`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`) or from local files.

Hub configs and splits (the dataset cards): ``raw`` (forget / retain1 / retain2 / holdout, field
`text`), ``verbmem`` (forget: `prompt`, `gt` — a forget-set excerpt and its true continuation),
``knowmem`` (forget_qa / retain_qa and their few-shot examples forget_qa_icl / retain_qa_icl:
`question`, `answer`) and ``privleak`` (forget / retain / holdout, field `text`). Local: the layout
MUSE's own download script writes, ``<dir>/<config>/<split>.json`` — a JSON array (of objects, or
of bare strings for the text-only configs) or JSON Lines. The field names are the constants below.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ortho_train.benchmarks_data.records import (BenchmarkDataError, first, hub_records, plain_text, read_records,
                                                 text_field)

Corpus = Literal["news", "books"]
HUB_PATHS: dict[str, str] = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
SPLITS: dict[str, tuple[str, ...]] = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "privleak": ("forget", "retain", "holdout"),
}
TEXT = "text"
PROMPT = "prompt"
GROUND_TRUTH = "gt"
QUESTION = "question"
ANSWER = "answer"


@dataclass(frozen=True)
class VerbMemItem:
    """A forget-set excerpt (`prompt`) and its true continuation (`gt`)."""
    prompt: str
    gt: str


@dataclass(frozen=True)
class KnowMemItem:
    question: str
    answer: str


def _rows(corpus: str, config: str, split: str, data_dir: str | Path | None) -> tuple[list, str]:
    if corpus not in HUB_PATHS:
        raise BenchmarkDataError(f"MUSE corpus {corpus!r}: choose one of {', '.join(HUB_PATHS)}")
    if split not in SPLITS.get(config, ()):
        raise BenchmarkDataError(f"MUSE config {config!r} has no split {split!r} "
                                 f"(configs and splits: {SPLITS})")
    if data_dir is None:
        return hub_records(HUB_PATHS[corpus], config, split), f"{HUB_PATHS[corpus]}:{config}/{split}"
    path = Path(data_dir) / config / f"{split}.json"
    return read_records(path), str(path)


def load_verbmem(corpus: Corpus = "news", data_dir: str | Path | None = None,
                 limit: int | None = None) -> list[VerbMemItem]:
    """VerbMem's (prompt, gt) pairs: `data_dir/verbmem/forget.json`, or the hub without `data_dir`."""
    rows, where = _rows(corpus, "verbmem", "forget", data_dir)
    return [VerbMemItem(text_field(r, PROMPT, where, i), text_field(r, GROUND_TRUTH, where, i))
            for i, r in enumerate(first(rows, limit))]


def load_knowmem(split: str, corpus: Corpus = "news", data_dir: str | Path | None = None,
                 limit: int | None = None) -> list[KnowMemItem]:
    """KnowMem's (question, answer) pairs of `split` (forget_qa, retain_qa, or their *_icl examples)."""
    rows, where = _rows(corpus, "knowmem", split, data_dir)
    return [KnowMemItem(text_field(r, QUESTION, where, i), text_field(r, ANSWER, where, i))
            for i, r in enumerate(first(rows, limit))]


def load_texts(config: str, split: str, corpus: Corpus = "news", data_dir: str | Path | None = None,
               limit: int | None = None) -> list[str]:
    """The texts of a text-only config (`raw`, `privleak`): bare strings or objects' `text`."""
    rows, where = _rows(corpus, config, split, data_dir)
    return [plain_text(r, TEXT, where, i) for i, r in enumerate(first(rows, limit))]
