"""GGUF export (llama.cpp): a sieved model at α = 0 (or merged at α = 1) as one `.gguf` file.

GGUF v3 as the `gguf` package's `GGUFWriter` writes it: key/value metadata, then tensor infos and
32-byte-aligned tensor data. What this exporter puts in it, following llama.cpp's converter
(`convert_hf_to_gguf.py`, classes LlamaModel, Qwen2Model and Gemma3Model):

- metadata `general.architecture` (`llama` / `qwen2` / `gemma3`) and the family's hyper-parameters
  (`gguf_architectures`: context length, widths, heads, RMS epsilon, RoPE bases; Gemma 3's sliding
  window), `general.file_type`; `ortho_train.alpha` and `ortho_train.source_format` record the provenance;
- the tokenizer (`gguf_vocab`);
- tensors under the converter's names (`gguf.get_tensor_name_map`: `token_embd`, `blk.N.attn_q`,
  …, `output_norm`, `output`; no `output` when the head is tied to the embedding; Qwen2's q/k/v
  biases as `blk.N.attn_q.bias`, …). For Llama, rows of `attn_q` / `attn_k` (weights and biases)
  are permuted as the converter permutes them for llama.cpp's RoPE: per head, (2, d_head/2) →
  (d_head/2, 2) (Qwen2 and Gemma 3 are stored unpermuted). A row permutation leaves each row's 32-weight blocks
  unchanged, so it is exact. Gemma 3's norm weights are stored as 1 + weight, as the converter does.

Tensor types: the sieved linears get the target type (`gguf_blocks.encode`: code for code from a
base on llama.cpp's grid, llama.cpp's rounding otherwise), except those whose rows are not whole
32-weight blocks (the tiny 688-wide MLP): F32 beside Q4 (exact), F16 beside Q8_0 (as llama.cpp's
converter falls back); 1-D tensors (norms, biases) are F32;
other 2-D tensors (embedding, an unsieved head) keep their saved dtype in a Q4 export (exact) and
take the target type in a Q8_0 / F16 export. Other architectures are refused by name.
A GPTQ / RTN base with groups of 128 written as Q4_0 / Q4_1 is *lossy* (re-rounded to 32-blocks;
bounds in `gguf_blocks`; measured on the tests' tiny Llama: max |error| 7.9e-3 (Q4_0) and 4.5e-3
(Q4_1) for weights up to 0.089, docs/deploy.md); a q4_0 / q4_1 base is written exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType

from ortho_train.artifacts import atomic_artifacts
from ortho_train.export.gguf_architectures import GGUF_ARCHITECTURES, GGUFArchitecture
from ortho_train.export.gguf_blocks import BLOCK, Q4_TYPES, Encoded, as_stored, encode
from ortho_train.export.gguf_vocab import copy_vocab, write_vocab
from ortho_train.export.report import ExportReport
from ortho_train.export.source import SievedSource
from ortho_train.sieve.artifacts import FORMAT

FILE_TYPES = {QType.Q4_0: LlamaFileType.MOSTLY_Q4_0, QType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
              QType.Q8_0: LlamaFileType.MOSTLY_Q8_0, QType.F16: LlamaFileType.MOSTLY_F16}
ROTARY_ROWS = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


def rotary_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives attn_q / attn_k: out row r holds source row perm[r]."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    index = np.arange(rows).reshape(n_head, 2, rows // n_head // 2)  # (N,) → (heads, 2, d_head/2)
    return index.swapaxes(1, 2).reshape(rows)  # (heads, d_head/2, 2) → (N,)


def _write_metadata(writer: gguf.GGUFWriter, source: SievedSource, spec: GGUFArchitecture, qtype: QType) -> None:
    """The family's hyper-parameters (`gguf_architectures`), the file type and the provenance keys."""
    writer.add_name(source.directory.name)
    spec.write_metadata(writer, source.model_config)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_float32("ortho_train.alpha", source.alpha)
    writer.add_string("ortho_train.source_format", FORMAT)


def _encode_tensor(source: SievedSource, spec: GGUFArchitecture, key: str, qtype: QType) -> Encoded:
    """The stored form of the state-dict tensor `key` (module docstring's type rule)."""
    module, kind = key.rsplit(".", 1)
    if module in source.bases and kind == "weight":
        w = source.weight(module)  # (N, K) float32 at α
        if qtype != QType.F16 and w.shape[1] % BLOCK:  # no whole blocks: the converter's F16 fallback,
            return encode(w, QType.F32 if qtype in Q4_TYPES else QType.F16)  # F32 (exact) beside Q4
        return encode(w, qtype, source.bases[module] if source.alpha == 0 else None)
    tensor = source.biases[module] if module in source.bases else source.tensors[key]
    if tensor.dim() == 1:
        return as_stored(spec.stored(key, tensor.float()))
    if qtype in Q4_TYPES:
        return as_stored(tensor)
    return encode(tensor.float(), qtype)


def _state_keys(source: SievedSource) -> list[str]:
    keys = [k for k in source.tensors if k.endswith((".weight", ".bias"))]
    keys += [f"{name}.weight" for name in source.bases] + [f"{name}.bias" for name in source.biases]
    if source.tied:
        keys = [k for k in keys if k != "lm_head.weight"]
    return sorted(keys)


def _add_tensors(writer: gguf.GGUFWriter, source: SievedSource, spec: GGUFArchitecture, qtype: QType,
                 report: ExportReport) -> None:
    c = source.model_config
    names = gguf.get_tensor_name_map(spec.arch, c["num_hidden_layers"])
    for key in _state_keys(source):
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"{key}: no GGUF name for this tensor in llama.cpp's {spec.name} layout")
        encoded = _encode_tensor(source, spec, key, qtype)
        report.add(target, encoded.qtype.name, encoded.exact, encoded.max_abs_error)
        data = encoded.data
        projection = key.rsplit(".", 2)[-2]
        if spec.permute_qk and projection in ROTARY_ROWS:
            n_head = c.get(ROTARY_ROWS[projection]) or c["num_attention_heads"]
            data = data[rotary_permutation(data.shape[0], n_head)]  # rows permuted, blocks intact
        writer.add_tensor(target, np.ascontiguousarray(data), raw_dtype=encoded.raw_dtype)


def write_gguf(source: SievedSource, out: Path, qtype: QType, format_name: str,
               vocab_from: Path | None = None) -> ExportReport:
    """Write `source` as a GGUF file at `out` (atomically: staged, then moved in); the vocabulary from
    the saved tokenizer, or copied from the GGUF file `vocab_from` (`gguf_vocab.copy_vocab`)."""
    model_type = source.model_config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF export supports the architectures {list(GGUF_ARCHITECTURES.names())}; "
                         f"{source.directory} holds a {model_type!r} model (others are not implemented yet)")
    spec = GGUF_ARCHITECTURES.get(model_type)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out, format_name, source.alpha)
    with atomic_artifacts(out.parent, [out.name]) as (staged,):
        writer = gguf.GGUFWriter(str(staged), spec.name)
        try:
            _write_metadata(writer, source, spec, qtype)
            if vocab_from is not None:
                copy_vocab(writer, Path(vocab_from), source.model_config["vocab_size"])
            else:
                write_vocab(writer, source.directory, source.model_config["vocab_size"])
            _add_tensors(writer, source, spec, qtype, report)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return report


@dataclass(frozen=True)
class GGUFExporter:
    """One GGUF target type; `run` writes the file (see the module docstring)."""

    qtype: QType

    @property
    def alphas(self) -> tuple[float, ...]:
        """α = 1 merges fp16 ortho values into dense weights: only Q8_0 / F16 keep them."""
        return (0.0,) if self.qtype in Q4_TYPES else (0.0, 1.0)

    def run(self, source: SievedSource, out: Path, format_name: str, vocab_from: Path | None = None,
            **_options) -> ExportReport:
        return write_gguf(source, out, self.qtype, format_name, vocab_from)
