"""4-bit formats of one model side by side: perplexity and bits per weight of RTN, GPTQ (each option),
NF4 and FP4 against the float model, on held-out public text.

    python benchmarks/ptq_formats.py --model /path/to/model.gguf_or_hf_dir --json ptq_formats.json \\
        [--seq-len 512] [--calibration-segments 8 64] [--eval-windows 32] [--threads 2]

What the α = 0 model of the sieve and of isolation costs is the cost of its INT4 base, so this
measures the base quantisers as GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Frantar et al.) runs them: calibration Hessians H = Σ x xᵀ of every
linear's inputs over `segments × seq_len` tokens of the training split (the paper: 128 segments of
2,048 tokens; here what fits the machine, reported), dampening as a fraction of mean(diag H),
groups of 32 / 128, act-order (static groups). Every linear but the LM head is quantised (a tied head
is the embedding, kept in float, as in the toolkit's tables); embeddings and norms stay float32.
Bits per weight count the codes and one fp16 scale and zero per group (INT4) or one fp32 absmax per
block (NF4/FP4, bitsandbytes, no double quantisation). Perplexity is over `eval_windows` windows of
the validation split, the same windows for every row. Not measured: true-sequential GPTQ (Hessians of
each block taken after the blocks before it were quantised): the toolkit collects all Hessians from
the float model in one pass.

Runs on the toolkit's public API; prints one line per row and writes the table as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from ortho_kernels import effective_bits  # noqa: E402
from ortho_train.corpus import load_corpus  # noqa: E402
from ortho_train.curvature import collect_hessians  # noqa: E402
from ortho_train.metrics import perplexity  # noqa: E402
from ortho_train.models import linear_layers, load_causal_lm  # noqa: E402
from ortho_train.quantisation import PTQConfig, QuantConfig, quantise_weight, quantised_copy  # noqa: E402
from ortho_train.token_datasets import PublicWindows  # noqa: E402
from ortho_train.tokenization import encode_text, leading_bos_id, load_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One model of the table: a base quantiser (`spec`, with `segments` calibration segments
    when it is GPTQ), a bitsandbytes format (`bnb`), or neither (the float model)."""

    name: str
    spec: QuantConfig | None = None
    segments: int = 0
    bnb: str | None = None


def windows(ids: torch.Tensor, seq_len: int, count: int, bos_id: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`count` consecutive non-overlapping windows (1, seq_len) of a 1-D token stream, as batches; with
    `bos_id`, each is that token and the next seq_len − 1 tokens (`ortho_train.token_datasets.PublicWindows`)."""
    usable = len(PublicWindows(ids, seq_len, count, bos_id=bos_id))
    if usable < count:
        raise ValueError(f"the text holds {len(ids)} tokens: {usable} windows of {seq_len}, {count} asked for")
    rows = PublicWindows(ids, seq_len, count, bos_id=bos_id).windows  # (count, seq_len)
    return [{"input_ids": row[None], "attention_mask": torch.ones(1, seq_len, dtype=torch.long),
             "labels": row[None]} for row in rows]


def int_quantised(model: torch.nn.Module, spec: QuantConfig, hessians: dict | None) -> torch.nn.Module:
    """A copy of `model` whose linears (not the head) hold dequant(quant(W)) under `spec`."""
    clone = copy.deepcopy(model)
    for name, layer in linear_layers(clone).items():
        base = quantise_weight(layer.weight.data, spec, None if hessians is None else hessians[name])
        layer.weight.data = base.dequantise(layer.weight.dtype)
    return clone


def rows_to_run(segment_counts: list[int]) -> list[Row]:
    largest = max(segment_counts)
    rows = [Row("fp32"), Row("rtn g128", QuantConfig("rtn", 4, 128)), Row("rtn g32", QuantConfig("rtn", 4, 32))]
    rows += [Row(f"gptq g128, {n} segments", QuantConfig("gptq", 4, 128), n) for n in sorted(segment_counts)]
    rows += [Row(f"gptq g128 act-order, {largest} segments", QuantConfig("gptq", 4, 128, act_order=True), largest),
             Row(f"gptq g32, {largest} segments", QuantConfig("gptq", 4, 32), largest),
             Row(f"gptq g32 act-order, {largest} segments", QuantConfig("gptq", 4, 32, act_order=True), largest),
             Row("nf4 (bitsandbytes, block 64)", bnb="nf4"), Row("fp4 (bitsandbytes, block 64)", bnb="fp4")]
    return rows


def bits_per_weight(row: Row, settings: PTQConfig) -> float:
    if row.spec is not None:
        return effective_bits(row.spec.bits, row.spec.group_size)
    return 32.0 if row.bnb is None else 4 + 32 / settings.blocksize


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model directory or a .gguf file")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-segments", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--add-bos", choices=["auto", "always", "never"], default="auto",
                        help="lead every window with the BOS token (auto: where the tokenizer's own encoding does)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_causal_lm(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    corpus = load_corpus(args.corpus)
    largest = max(args.calibration_segments)
    calibration_text = corpus.train[: 8 * args.seq_len * largest]  # ≥ 1 token per 8 characters
    bos_id = leading_bos_id(tokenizer, args.add_bos)  # as the toolkit's data module: Gemma's <bos> first
    calibration = windows(encode_text(tokenizer, calibration_text), args.seq_len, largest, bos_id)
    evaluation = windows(encode_text(tokenizer, corpus.val), args.seq_len, args.eval_windows, bos_id)
    print(f"loaded in {time.perf_counter() - start:.0f} s: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; calibration up to {largest} × {args.seq_len} tokens, evaluation {args.eval_windows} × "
          f"{args.seq_len}", flush=True)
    hessians: dict[int, dict] = {}
    settings = PTQConfig()
    results, fp_ppl = [], None
    for row in rows_to_run(args.calibration_segments):
        t = time.perf_counter()
        if row.spec is not None and row.spec.method == "gptq" and row.segments not in hessians:
            hessians[row.segments] = collect_hessians(model, calibration[: row.segments])
        if row.spec is not None:
            spec = QuantConfig(row.spec.method, row.spec.bits, row.spec.group_size, damp=args.damp,
                               act_order=row.spec.act_order)
            quantised = int_quantised(model, spec, hessians.get(row.segments) if spec.method == "gptq" else None)
        elif row.bnb is not None:
            quantised = quantised_copy(model, row.bnb, settings, include_lm_head=False, deployed_modules=False)
        else:
            quantised = model
        ppl = perplexity(quantised, evaluation)
        fp_ppl = fp_ppl or ppl
        del quantised
        result = {"row": row.name, "ppl": ppl, "ppl_ratio": ppl / fp_ppl, "bits_per_weight": bits_per_weight(row, settings),
                  "calibration_tokens": row.segments * args.seq_len, "seconds": round(time.perf_counter() - t, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        results.append(result)
        print(f"{row.name:>36}: PPL {ppl:9.3f} ({ppl / fp_ppl:.3f}× fp32), {result['bits_per_weight']:.2f} bits/weight, "
              f"{result['seconds']} s, peak RSS {result['peak_rss_mib']} MiB", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(args.model), "seq_len": args.seq_len, "damp": args.damp,
                                         "eval_windows": args.eval_windows, "threads": args.threads,
                                         "rows": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
