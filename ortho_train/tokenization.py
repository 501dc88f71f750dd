"""Tokenizers: byte-level for models built from a config, `AutoTokenizer` for local models and
GGUF files (`ortho_train.gguf_checkpoint`).

The byte-level tokenizer is transformers' `ByT5Tokenizer` without extra ids: 256 byte tokens
plus pad (0), eos (1) and unk (2), byte b ↦ id b + 3. It saves and loads through
`AutoTokenizer`, so a model directory written by ortho-train is self-describing — except that
transformers ≥ 5 replaces the declared tokenizer class by the model type's own for some types
(Qwen2's, Mistral's): a directory whose `tokenizer_config.json` declares `ByT5Tokenizer` is
therefore loaded as the byte tokenizer directly, whatever model sits beside it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from ortho_train.gguf_checkpoint import is_gguf_file, load_gguf_tokenizer
from ortho_train.loading import LOCAL_FILES_ONLY
from ortho_train.run_paths import resolve_latest

BYTE_TOKENIZER = "byte"
_BYTE_OFFSET = 3  # ByT5: ids 0..2 are pad/eos/unk, bytes follow
# Any of these makes a directory a tokenizer source for AutoTokenizer.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model",
                   "spiece.model", "vocab.txt")


def build_byte_tokenizer() -> ByT5Tokenizer:
    """Byte-level tokenizer with vocabulary 259 (256 bytes + pad/eos/unk)."""
    return ByT5Tokenizer(extra_ids=0)


def load_tokenizer(source: str | Path | None) -> PreTrainedTokenizerBase:
    """`"byte"`/None → the byte tokenizer; a local directory → `AutoTokenizer` (offline); a
    `.gguf` file → the tokenizer it holds (a copy: callers may set its pad token).

    Raises:
        FileNotFoundError: `source` is neither "byte" nor an existing directory, or the directory
            holds no tokenizer files.
    """
    if source is None or str(source) == BYTE_TOKENIZER:
        return build_byte_tokenizer()
    if is_gguf_file(source):
        return with_pad_token(copy.deepcopy(load_gguf_tokenizer(source)))
    path = resolve_latest(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer source {str(source)!r} is neither 'byte' nor an existing local model "
            "directory (ortho-train never downloads from the hub at run time)"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model directory {str(path)!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
            "save the tokenizer into it (tokenizer.save_pretrained) or copy them from the base model"
        )
    if _declared_class(path) == ByT5Tokenizer.__name__:
        tokenizer = ByT5Tokenizer.from_pretrained(path, **LOCAL_FILES_ONLY)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL_FILES_ONLY)
    return with_pad_token(tokenizer)


BosPolicy = Literal["auto", "always", "never"]
_BOS_PROBE = "The secret code"


def leading_bos_id(tokenizer: PreTrainedTokenizerBase, policy: BosPolicy = "auto") -> int | None:
    """The token id every sequence ortho-train builds starts with, or None for no leading token.

    'auto': the tokenizer's bos id when its own encoding with special tokens starts with it (the
    model was pretrained with a BOS first: Llama, Gemma, Mistral), else None (GPT-2, Qwen2 and the
    byte tokenizer add none); 'always': its bos id (an error if it has none); 'never': None.
    """
    if policy == "never":
        return None
    bos = tokenizer.bos_token_id
    if policy == "always":
        if bos is None:
            raise ValueError("data.add_bos=always: this tokenizer has no bos token; use 'auto' or 'never'")
        return int(bos)
    if policy != "auto":
        raise ValueError(f"data.add_bos={policy!r}: choose 'auto', 'always' or 'never'")
    if bos is None:
        return None
    ids = tokenizer(_BOS_PROBE, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Causal LMs often ship without a pad token; eos is the conventional stand-in and pads are
    masked everywhere in ortho-train, so its identity never reaches a loss."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _declared_class(path: Path) -> str | None:
    """`tokenizer_class` of the directory's tokenizer_config.json (None: absent or unreadable)."""
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of `text` without special tokens, as a 1-D int64 tensor.

    The byte tokenizer takes a vectorised path (ByT5's Python loop needs minutes for the
    5 MB corpus); `tests/` checks that both paths agree.
    """
    if isinstance(tokenizer, ByT5Tokenizer):
        raw = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        return raw.to(torch.int64) + _BYTE_OFFSET
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
