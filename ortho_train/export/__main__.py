"""Command line: `python -m ortho_train.export <sieved dir> --format F --alpha 0|1 -o OUT`.

Reads the directory `save_sieved` wrote (at α = 0 the base file only), writes OUT in format F
(`EXPORTERS`), prints one line per rounded tensor and a summary, and with `--report FILE` writes
the per-tensor report as JSON. Exit status 2 with a one-line error when the input is missing or
damaged, the format refuses the model, or the α does not fit the format.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ortho_train.export import EXPORTERS, export, read_sieved
from ortho_train.export.gguf_vocab import TokenizerExportError
from ortho_train.export.gptq_checkpoint import CHECKPOINT_FORMATS
from ortho_train.sieve.artifacts import SieveArtifactError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ortho_train.export",
        description="Export a sieved model (save_sieved's directory) for llama.cpp (GGUF) or GPTQ loaders. "
                    "α = 0 writes the public base stream only: the ortho file is never read.")
    p.add_argument("sieved", type=Path,
                   help="directory written by save_sieved (sieve_config.json, base.safetensors…)")
    p.add_argument("--format", required=True, choices=sorted(EXPORTERS),
                   help="gguf-q4_0/q4_1: α = 0, exact from a q4_0/q4_1 base; gguf-q8_0/f16: α = 0 or 1 merged; "
                        "gptq: α = 0 GPTQ checkpoint directory, exact from any 4-bit base (docs/deploy.md)")
    p.add_argument("--alpha", type=float, default=0.0, choices=(0.0, 1.0),
                   help="0: the public base stream alone (default); 1: base + ortho merged into dense weights")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .gguf file, or the GPTQ directory")
    p.add_argument("--checkpoint-format", default="gptq", choices=CHECKPOINT_FORMATS,
                   help="gptq only: 'gptq' (AutoGPTQ v1, stored zeros minus one) or 'gptq_v2' (gptqmodel)")
    p.add_argument("--vocab-from", type=Path,
                   help="GGUF only: copy the tokenizer.ggml.* keys of this GGUF file (e.g. the Gemma 3 GGUF the "
                        "model was loaded from) instead of writing the saved tokenizer (needed for SentencePiece)")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the sieved files")
    p.add_argument("--report", type=Path, help="write the per-tensor report (type, exact, max |error|) as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.vocab_from is not None and not args.format.startswith("gguf"):
        print(f"error: --vocab-from applies to the GGUF formats, not {args.format}", file=sys.stderr)
        return 2
    try:
        source = read_sieved(args.sieved, alpha=args.alpha, verify=not args.no_verify)
        report = export(source, args.format, args.output, checkpoint_format=args.checkpoint_format,
                        vocab_from=args.vocab_from)
    except (SieveArtifactError, TokenizerExportError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, entry in report.tensors.items():
        if not entry["exact"]:
            print(f"  rounded {name}: {entry['type']}, max |error| {entry['max_abs_error']:.3g}")
    print(report.summary())
    if args.report:
        args.report.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
