"""The saved tokenizer as GGUF metadata (`tokenizer.ggml.*`), the way llama.cpp's converter writes it.

Two tokenizers are supported, both as llama.cpp's byte-level BPE (`tokenizer.ggml.model = "gpt2"`):

- a byte-level BPE `tokenizer.json` (GPT-2 / Llama-3 style): `tokens` by id from the vocabulary,
  `token_type` NORMAL, CONTROL for special added tokens, USER_DEFINED for other added tokens,
  UNUSED `[PAD{i}]` up to the model's vocab_size; `merges` and the bos/eos/unk/pad ids from the
  tokenizer files (`gguf.SpecialVocab`, as the converter does). Byte-level BPE has no scores.
  Pre-tokenizer (`tokenizer.ggml.pre`): `"gpt-2"` — llama.cpp splits with GPT-2's regex — when the
  tokenizer splits exactly so (no normalizer, a lone `ByteLevel` with `use_regex` and no prefix
  space); `"default"` otherwise (llama.cpp's default regex, which also splits punctuation runs and
  digits: such a tokenizer may tokenise some text differently in llama.cpp).
- the toolkit's byte tokenizer (ByT5: 0 `<pad>`, 1 `</s>`, 2 `<unk>`, 3 + b the byte b): the byte
  tokens are written as GPT-2's printable stand-ins of the bytes (`bytes_to_unicode`), so
  llama.cpp's byte-level BPE maps every input byte to its own token. llama.cpp requires a merges
  list (the `gguf` writer cannot store an empty one), so one merge that can never apply
  (`"<pad> </s>"`: control tokens are never merge candidates) is written. transformers' GGUF
  tokenizer reader refuses such a merge (its BPE wants every merge result in the vocabulary):
  it still reads the weights of such a file, the tokenizer comes from the sieved directory.

A SentencePiece / Unigram / WordPiece tokenizer is refused by name (llama.cpp's `"llama"` model
needs the SentencePiece scores, which this exporter does not read yet). Such a model's vocabulary
can be taken from a GGUF file instead (`copy_vocab`, `--vocab-from`): every `tokenizer.ggml.*` key
of that file is copied as stored (read with `gguf.GGUFReader`, memory-mapped; no tensor is read),
e.g. from the Gemma 3 270M GGUF the model was loaded from; its token count must equal the model's
vocab_size.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import TokenType

BYTE_OFFSET = 3  # ByT5: ids 0..2 are pad/eos/unk, bytes follow
UNUSED_MERGE = "<pad> </s>"


class TokenizerExportError(ValueError):
    """The saved tokenizer cannot be written as GGUF metadata."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (what byte-level BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _declared_class(directory: Path) -> str | None:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("tokenizer_class")


def _bpe_tokens(spec: dict, directory: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their types from a byte-level BPE tokenizer.json (module docstring)."""
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise TokenizerExportError(
            f"{directory / 'tokenizer.json'}: a {model.get('type')} tokenizer without a ByteLevel pre-tokenizer; "
            "GGUF export supports byte-level BPE tokenizers and the toolkit's byte tokenizer only")
    by_id = {int(i): (text, TokenType.NORMAL) for text, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"],
                                   TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise TokenizerExportError(f"the tokenizer in {directory} has token id {max(by_id)} but the model's "
                                   f"vocab_size is {vocab_size}")
    tokens = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in tokens], [int(kind) for _, kind in tokens]


def bpe_pre_tokenizer(spec: dict) -> str:
    """`tokenizer.ggml.pre` for a byte-level BPE tokenizer.json (module docstring)."""
    pre = spec.get("pre_tokenizer") or {}
    gpt2 = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and not spec.get("normalizer"))
    return "gpt-2" if gpt2 else "default"


def _write_byte_vocab(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """The toolkit's ByT5 byte tokenizer as GGUF byte-level BPE (module docstring)."""
    if vocab_size < BYTE_OFFSET + 256:
        raise TokenizerExportError(f"a byte tokenizer needs vocab_size ≥ {BYTE_OFFSET + 256}, got {vocab_size}")
    table = bytes_to_unicode()
    tokens = ["<pad>", "</s>", "<unk>"] + [table[b] for b in range(256)]
    types = [TokenType.CONTROL] * 3 + [TokenType.NORMAL] * 256
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [TokenType.UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges([UNUSED_MERGE])
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_add_bos_token(False)


def copy_vocab(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> str:
    """Copy every `tokenizer.ggml.*` key of the GGUF file `path` (module docstring); returns its model name."""
    reader = gguf.GGUFReader(str(path))
    fields = {key: field for key, field in reader.fields.items() if key.startswith("tokenizer.ggml.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise TokenizerExportError(f"--vocab-from {path}: the file holds no tokenizer.ggml.tokens")
    count = len(fields["tokenizer.ggml.tokens"].data)
    if count != vocab_size:
        raise TokenizerExportError(f"--vocab-from {path}: {count} tokens, but the model's vocab_size is {vocab_size}")
    for key, field in fields.items():
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    return str(fields["tokenizer.ggml.model"].contents()) if "tokenizer.ggml.model" in fields else "?"


def write_vocab(writer: gguf.GGUFWriter, directory: Path, vocab_size: int) -> str:
    """Write the tokenizer saved in `directory`; returns which kind it was ('bpe' or 'byte')."""
    if _declared_class(directory) == "ByT5Tokenizer":
        _write_byte_vocab(writer, vocab_size)
        return "byte"
    if not (directory / "tokenizer.json").is_file():
        raise TokenizerExportError(
            f"{directory} holds no tokenizer.json (nor the toolkit's byte tokenizer): GGUF needs the vocabulary; "
            "save the model with save_sieved(..., tokenizer=tokenizer)")
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = _bpe_tokens(spec, directory, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise TokenizerExportError(f"{directory / 'tokenizer.json'} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
    return "bpe"
