"""4-bit formats of one model side by side: perplexity and bits per weight of RTN, GPTQ (each option),
NF4 and FP4 against the float model, on held-out public text.

    python benchmarks/ptq_formats.py --model /path/to/model.gguf_or_hf_dir --json ptq_formats.json \\
        [--seq-len 512] [--calibration-segments 8 64] [--eval-windows 32] [--threads 2] \\
        [--true-sequential] [--sieve-rho 0.005]

What the α = 0 model of the sieve and of isolation costs is the cost of its INT4 base, so this
measures the base quantisers as GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Frantar et al.) runs them: calibration Hessians H = Σ x xᵀ of every
linear's inputs over `segments × seq_len` tokens of the training split (the paper: 128 segments of
2,048 tokens; here what fits the machine, reported), dampening as a fraction of mean(diag H),
groups of 32 / 128, act-order (static groups). Every linear but the LM head is quantised (a tied head
is the embedding, kept in float, as in the toolkit's tables); embeddings and norms stay float32.
Bits per weight count the codes and one fp16 scale and zero per group (INT4) or one fp32 absmax per
block (NF4/FP4, bitsandbytes, no double quantisation). Perplexity is over `eval_windows` windows of
the validation split, the same windows for every row.

GPTQ's Hessians come from the float model in one pass; with `--true-sequential` the GPTQ g128 rows
(and the sieve's) are repeated quantised true-sequentially (the paper's §5: block by block, q/k/v → o →
gate/up → down, each Hessian from inputs through the layers already quantised;
`ortho_train.quantisation.sequential`). The sieve's rows are the kill switch's two deployments of a
post-hoc sieve of the float model (GPTQ g128 act-order base, ortho fraction ρ = `--sieve-rho` per
layer, the largest calibration set): α = 0 is the base alone (its bits), α = 1 base + ortho stream
(bits of both: codes, scales, 48-bit COO entries).

Runs on the toolkit's public API; prints one line per row and writes the table as JSON.
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from ortho_kernels import effective_bits  # noqa: E402
from ortho_train.artifacts import write_json_atomic  # noqa: E402
from ortho_train.corpus import load_corpus  # noqa: E402
from ortho_train.curvature import collect_hessians  # noqa: E402
from ortho_train.metrics import perplexity  # noqa: E402
from ortho_train.models import linear_layers, load_causal_lm  # noqa: E402
from ortho_train.ortho_linear import set_alpha  # noqa: E402
from ortho_train.quantisation import PTQConfig, QuantConfig, quantise_layers, quantised_copy  # noqa: E402
from ortho_train.sieve import SieveConfig, build_dual_stream_model, sieve_model, stream_stats  # noqa: E402
from ortho_train.token_datasets import PublicWindows  # noqa: E402
from ortho_train.tokenization import encode_text, leading_bos_id, load_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One model of the table: a base quantiser (`spec`, with `segments` calibration segments
    when it is GPTQ), with `alpha` the sieve at that α (base `spec`, ortho fraction `rho`), a
    bitsandbytes format (`bnb`), or none of them (the float model)."""

    name: str
    spec: QuantConfig | None = None
    segments: int = 0
    bnb: str | None = None
    alpha: float | None = None
    rho: float = 0.0


def windows(ids: torch.Tensor, seq_len: int, count: int, bos_id: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`count` consecutive non-overlapping windows (1, seq_len) of a 1-D token stream, as batches; with
    `bos_id`, each is that token and the next seq_len − 1 tokens (`ortho_train.token_datasets.PublicWindows`)."""
    usable = len(PublicWindows(ids, seq_len, count, bos_id=bos_id))
    if usable < count:
        raise ValueError(f"the text holds {len(ids)} tokens: {usable} windows of {seq_len}, {count} asked for")
    rows = PublicWindows(ids, seq_len, count, bos_id=bos_id).windows  # (count, seq_len)
    return [{"input_ids": row[None], "attention_mask": torch.ones(1, seq_len, dtype=torch.long),
             "labels": row[None]} for row in rows]


class Calibration:
    """The calibration windows and, per segment count, the float model's Hessians (collected once)."""

    def __init__(self, model: torch.nn.Module, windows_: list[dict]):
        self.model, self.windows, self._hessians = model, windows_, {}

    def of(self, spec: QuantConfig, segments: int) -> dict:
        """What quantising under `spec` is given: the batches (true-sequential), Hessians (GPTQ) or nothing."""
        if spec.true_sequential:
            return {"calibration": self.windows[:segments]}
        if spec.method != "gptq":
            return {}
        if segments not in self._hessians:
            self._hessians[segments] = collect_hessians(self.model, self.windows[:segments])
        return {"hessians": self._hessians[segments]}


def int_quantised(model: torch.nn.Module, spec: QuantConfig, given: dict) -> torch.nn.Module:
    """A copy of `model` whose linears (not the head) hold dequant(quant(W)) under `spec`."""
    bases = quantise_layers(model, linear_layers(model), spec, **given)
    clone = copy.deepcopy(model)
    for name, layer in linear_layers(clone).items():
        layer.weight.data = bases[name].dequantise(layer.weight.dtype)
    return clone


def rows_to_run(segment_counts: list[int], true_sequential: bool = False, sieve_rho: float = 0.005) -> list[Row]:
    largest = max(segment_counts)
    g128_ao = QuantConfig("gptq", 4, 128, act_order=True)
    rows = [Row("fp32"), Row("rtn g128", QuantConfig("rtn", 4, 128)), Row("rtn g32", QuantConfig("rtn", 4, 32))]
    rows += [Row(f"gptq g128, {n} segments", QuantConfig("gptq", 4, 128), n) for n in sorted(segment_counts)]
    rows += [Row(f"gptq g128 act-order, {largest} segments", g128_ao, largest),
             Row(f"gptq g32, {largest} segments", QuantConfig("gptq", 4, 32), largest),
             Row(f"gptq g32 act-order, {largest} segments", QuantConfig("gptq", 4, 32, act_order=True), largest)]
    sieve_bases = [("", g128_ao)]
    if true_sequential:
        seq = replace(g128_ao, true_sequential=True)
        rows += [Row(f"gptq g128 true-sequential, {largest} segments",
                     QuantConfig("gptq", 4, 128, true_sequential=True), largest),
                 Row(f"gptq g128 act-order true-sequential, {largest} segments", seq, largest)]
        sieve_bases.append((" true-sequential", seq))
    for label, spec in sieve_bases:
        rows += [Row(f"sieve ρ={sieve_rho:.2%} α={alpha:g} (gptq g128 act-order{label}, {largest} segments)",
                     spec, largest, alpha=alpha, rho=sieve_rho) for alpha in (0.0, 1.0)]
    return rows + [Row("nf4 (bitsandbytes, block 64)", bnb="nf4"), Row("fp4 (bitsandbytes, block 64)", bnb="fp4")]


class Sieves:
    """The post-hoc sieve of the float model per (base spec, ρ), built once for both α."""

    def __init__(self, model: torch.nn.Module, calibration: Calibration):
        self.model, self.calibration, self._duals = model, calibration, {}

    def at(self, row: Row) -> tuple[torch.nn.Module, float]:
        """The dual-stream model at `row.alpha` and its bits per weight (α = 0: the base alone)."""
        key = (repr(row.spec), row.rho, row.segments)  # QuantConfig is mutable: not hashable
        if key not in self._duals:
            spec = SieveConfig(quant=row.spec, rho=row.rho)
            layers = sieve_model(self.model, "posthoc", spec, **self.calibration.of(row.spec, row.segments))
            dual = build_dual_stream_model(self.model, layers).eval()
            self._duals = {key: (dual, stream_stats(dual))}  # one sieve held at a time
        dual, stats = self._duals[key]
        set_alpha(dual, row.alpha)
        return dual, stats["base_bits_per_weight"] if row.alpha == 0 else stats["bits_per_weight"]


def bits_per_weight(row: Row, settings: PTQConfig) -> float:
    if row.spec is not None:
        return effective_bits(row.spec.bits, row.spec.group_size)
    return 32.0 if row.bnb is None else 4 + 32 / settings.blocksize


def quantised_model(row: Row, model: torch.nn.Module, calibration: Calibration, sieves: Sieves,
                    settings: PTQConfig) -> tuple[torch.nn.Module, float]:
    """The row's model and its bits per weight."""
    if row.alpha is not None:
        return sieves.at(row)
    if row.spec is not None:
        return int_quantised(model, row.spec, calibration.of(row.spec, row.segments)), bits_per_weight(row, settings)
    if row.bnb is not None:
        copy_ = quantised_copy(model, row.bnb, settings, include_lm_head=False, deployed_modules=False)
        return copy_, bits_per_weight(row, settings)
    return model, bits_per_weight(row, settings)


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
    parser.add_argument("--true-sequential", action="store_true",
                        help="also the GPTQ g128 rows and the sieve's quantised true-sequentially")
    parser.add_argument("--sieve-rho", type=float, default=0.005, help="ortho fraction ρ per layer of the sieve rows")
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
    settings, calibrated = PTQConfig(), Calibration(model, calibration)
    sieves = Sieves(model, calibrated)
    results, fp_ppl = [], None
    for row in rows_to_run(args.calibration_segments, args.true_sequential, args.sieve_rho):
        t = time.perf_counter()
        if row.spec is not None:
            row = replace(row, spec=replace(row.spec, damp=args.damp))
        quantised, bits = quantised_model(row, model, calibrated, sieves, settings)
        ppl = perplexity(quantised, evaluation)
        fp_ppl = fp_ppl or ppl
        del quantised
        result = {"row": row.name, "ppl": ppl, "ppl_ratio": ppl / fp_ppl, "bits_per_weight": bits,
                  "calibration_tokens": row.segments * args.seq_len, "seconds": round(time.perf_counter() - t, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        results.append(result)
        print(f"{row.name:>60}: PPL {ppl:9.3f} ({ppl / fp_ppl:.3f}× fp32), {result['bits_per_weight']:.2f} bits/weight, "
              f"{result['seconds']} s, peak RSS {result['peak_rss_mib']} MiB", flush=True)
    if args.json is not None:
        payload = {"model": str(args.model), "seq_len": args.seq_len, "damp": args.damp, "eval_windows": args.eval_windows,
                   "threads": args.threads, "true_sequential": args.true_sequential, "sieve_rho": args.sieve_rho,
                   "rows": results}
        write_json_atomic(args.json, payload)
    return results


if __name__ == "__main__":
    main()
