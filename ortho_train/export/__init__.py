"""Export a sieved model where people deploy it: the α = 0 public model (or α = 1 merged).

    source = read_sieved("runs/x/sieved", alpha=0)          # base.safetensors only at α = 0
    report = export(source, "gguf-q4_0", "model.gguf")      # or EXPORTERS[...] directly
    python -m ortho_train.export runs/x/sieved --format gguf-q4_0 --alpha 0 -o model.gguf

Who owns what (one format per file; a new format is one file plus one line in `EXPORTERS`):
- `source.py`: reading a sieved directory at α = 0 / 1 (`SievedSource`, dense W(α)).
- `gguf_blocks.py`: one weight as GGML blocks (exact from a base on llama.cpp's grid, or rounded).
- `gguf_vocab.py`: the saved tokenizer as GGUF metadata.
- `gguf_architectures.py`: the model families in llama.cpp's layout (Llama, Qwen2, Gemma 3: hyper-parameters,
  q/k permutation, Gemma's 1 + w norms), one `GGUF_ARCHITECTURES` entry each.
- `gguf_file.py`: the GGUF file (metadata, tensor names and types, the write).
- `gptq_checkpoint.py`: the GPTQ checkpoint directory (AutoGPTQ / gptqmodel / transformers).
- `report.py`: what an export wrote, tensor by tensor (exact, or the max error of the rounding).
- `__main__.py`: the command line.

What is exact and what is lossy is in each format's docstring and in docs/deploy.md.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType as QType

from ortho_train.export.gguf_file import GGUFExporter
from ortho_train.export.gptq_checkpoint import GPTQExporter
from ortho_train.export.report import ExportReport
from ortho_train.export.source import SievedSource, read_sieved
from ortho_train.registry import Registry

EXPORTERS: Registry = Registry("export format", setting="--format")
EXPORTERS.add("gguf-q4_0", GGUFExporter(QType.Q4_0))   # llama.cpp Q4_0 (α = 0; exact from a q4_0 base)
EXPORTERS.add("gguf-q4_1", GGUFExporter(QType.Q4_1))   # llama.cpp Q4_1 (α = 0; exact from a q4_0 / q4_1 base)
EXPORTERS.add("gguf-q8_0", GGUFExporter(QType.Q8_0))   # llama.cpp Q8_0 (α = 0 or 1 merged; rounded)
EXPORTERS.add("gguf-f16", GGUFExporter(QType.F16))     # llama.cpp F16 (α = 0 or 1 merged; rounded to fp16)
EXPORTERS.add("gptq", GPTQExporter())                  # GPTQ checkpoint (α = 0; exact from any 4-bit base)


def export(source: SievedSource, format_name: str, out: str | Path, **options) -> ExportReport:
    """Write `source` in the registered format `format_name` at `out`; options go to the exporter."""
    exporter = EXPORTERS.get(format_name)  # an unknown name: a ValueError listing the formats
    if source.alpha not in exporter.alphas:
        raise ValueError(f"{format_name} exports α ∈ {[f'{a:g}' for a in exporter.alphas]}, got α = "
                         f"{source.alpha:g} (α = 1 merges the fp16 ortho stream: use gguf-q8_0 or gguf-f16)")
    return exporter.run(source, Path(out), format_name, **options)


__all__ = ["EXPORTERS", "ExportReport", "SievedSource", "export", "read_sieved"]
