"""Settings of the benchmark evaluations (typed; a refused value names its command-line option)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ortho_train.settings import SettingError

ForgetSplit = Literal["forget01", "forget05", "forget10"]
Corpus = Literal["news", "books"]
RougeStemmer = Literal["none", "porter"]
MuseMetric = Literal["verbmem_f", "knowmem_f", "knowmem_r", "privleak"]
MUSE_METRICS: tuple[str, ...] = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")


def _positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise SettingError(f"{name}={value!r}: must be a positive integer")


@dataclass(frozen=True)
class QAFormat:
    """How a question becomes a prompt: ``question_start + question + question_end``, and the
    scored answer ``answer_start + answer`` (TOFU scores the answer tag too). The defaults are
    TOFU's format for its base models (Phi-1.5, StableLM, Pythia); its Llama-2-chat format is
    ``question_start="[INST] "``, ``question_end=" [/INST]"``, ``answer_start=""``."""
    question_start: str = "Question: "
    question_end: str = "\n"
    answer_start: str = "Answer: "

    def prompt(self, question: str) -> str:
        return f"{self.question_start}{question}{self.question_end}"

    def answer(self, answer: str) -> str:
        return f"{self.answer_start}{answer}"


@dataclass(frozen=True)
class TofuEvalConfig:
    """TOFU: which forget split, how to prompt, how far to generate for ROUGE.

    Attributes:
        forget: the forget split; its `_perturbed` set and `retain_perturbed`, `real_authors_perturbed`,
            `world_facts_perturbed` are evaluated.
        max_new_tokens: greedy tokens generated per question for ROUGE-L recall (cut at EOS).
        answer_eos: score the tokenizer's EOS after each answer (TOFU's collator does).
        limit: evaluate the first `limit` questions of each set only (quick checks; the numbers
            are then not the benchmark's).
        rouge_stemmer: "porter" stems the words of ROUGE-L longer than 3 characters with the
            published Porter stemmer (`metrics.porter`), as TOFU's code does with `rouge-score`'s
            `use_stemmer=True`; "none" compares the words as written.
    """
    forget: ForgetSplit = "forget10"
    qa_format: QAFormat = field(default_factory=QAFormat)
    max_new_tokens: int = 128
    answer_eos: bool = True
    batch_size: int = 8
    limit: int | None = None
    rouge_stemmer: RougeStemmer = "none"

    def __post_init__(self):
        if self.forget not in ("forget01", "forget05", "forget10"):
            raise SettingError(f"--forget-split={self.forget!r}: choose forget01, forget05 or forget10")
        if self.rouge_stemmer not in ("none", "porter"):
            raise SettingError(f"--rouge-stemmer={self.rouge_stemmer!r}: choose none or porter")
        _positive("--max-new-tokens", self.max_new_tokens)
        _positive("--batch-size", self.batch_size)
        _positive("--limit", self.limit, allow_none=True)


@dataclass(frozen=True)
class MuseEvalConfig:
    """MUSE: which corpus and metrics, with the benchmark's generation lengths.

    Attributes:
        verbmem_max_new_tokens: greedy tokens continuing each VerbMem prompt; the ground truth is
            cut to as many tokens (MUSE: 128).
        knowmem_max_new_tokens: tokens per KnowMem answer (MUSE: 32), cut at a blank line or the
            next "Question".
        mink: the fraction k of Min-K% for PrivLeak (MUSE: 0.4).
        max_length: PrivLeak texts are scored on their first `max_length` tokens.
    """
    corpus: Corpus = "news"
    metrics: tuple[str, ...] = MUSE_METRICS
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    mink: float = 0.4
    max_length: int = 2048
    batch_size: int = 8
    limit: int | None = None

    def __post_init__(self):
        if self.corpus not in ("news", "books"):
            raise SettingError(f"--corpus={self.corpus!r}: choose news or books")
        unknown = [m for m in self.metrics if m not in MUSE_METRICS]
        if unknown or not self.metrics:
            raise SettingError(f"--metrics={','.join(self.metrics)!r}: choose among {', '.join(MUSE_METRICS)}")
        if not 0 < self.mink <= 1:
            raise SettingError(f"--mink={self.mink!r}: must lie in (0, 1]")
        for name in ("verbmem_max_new_tokens", "knowmem_max_new_tokens", "max_length", "batch_size"):
            _positive("--" + name.replace("_", "-"), getattr(self, name))
        _positive("--limit", self.limit, allow_none=True)
