"""Benchmark: the posthoc sieve per layer against plain GPTQ on the same layer and Hessian.

    python benchmarks/sieve_time.py                         # synthetic Llama-ish shapes
    python benchmarks/sieve_time.py --model runs/.../hf_model --rho 0.01 --json out.json

With `--model` the layers and their Hessians come from a saved Hugging Face model and
public calibration text (the quickstart's Shakespeare windows); otherwise from random
weights and correlated random inputs. Each layer is timed in interleaved rounds (GPTQ,
sieve, GPTQ, sieve, …) and the median is reported, with the ratio sieve / GPTQ. The sieve
time is everything the posthoc sieve does for the layer: RTN pre-pass for the threshold,
the GPTQ sweep with in-sweep outlier selection, trimming to the budget and building the
sparse stream (no diagnostics). Run with OMP_NUM_THREADS set and report the machine load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

import torch  # noqa: E402

from ortho_train.quantisation import QuantConfig, quantise_weight  # noqa: E402
from ortho_train.sieve.core import SieveConfig, sieve_posthoc  # noqa: E402

SYNTHETIC_SHAPES = [(256, 256), (688, 256), (256, 688), (1024, 1024), (4096, 4096)]


def synthetic_layer(n: int, k: int, seed: int = 0, tokens: int = 4096):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix  # (tokens, K) correlated inputs
    return torch.randn(n, k, generator=g) * 0.02, 2 * x.T @ x / tokens


def model_layers(path: str, batches: int, seq_len: int, batch_size: int):
    from ortho_train.corpus import load_corpus
    from ortho_train.curvature import collect_hessians
    from ortho_train.models import linear_layers, load_causal_lm
    from ortho_train.tokenization import encode_text, load_tokenizer

    model = load_causal_lm(path).eval()
    tokens = encode_text(load_tokenizer(path), load_corpus("shakespeare", 0.05).train)
    windows = tokens[: batches * batch_size * seq_len].view(batches, batch_size, seq_len)  # (B, b, T)
    calibration = [{"input_ids": w} for w in windows]
    hessians = collect_hessians(model, calibration)
    return [(name, m.weight.detach().float(), hessians[name]) for name, m in linear_layers(model).items()]


def time_layer(w: torch.Tensor, h: torch.Tensor, spec: SieveConfig, rounds: int) -> dict:
    gptq_times, sieve_times = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        quantise_weight(w, spec.quant, h)
        gptq_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        layer = sieve_posthoc(w, h, spec)
        sieve_times.append(time.perf_counter() - start)
    gptq, sieve = statistics.median(gptq_times), statistics.median(sieve_times)
    return {"gptq_s": gptq, "sieve_s": sieve, "ratio": sieve / gptq, "density": layer.ortho.density}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory (default: synthetic layers)")
    parser.add_argument("--rho", type=float, default=0.01)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", default=None, help="e.g. 256x256,4096x4096 (synthetic only)")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    spec = SieveConfig(QuantConfig("gptq", args.bits, args.group_size), rho=args.rho)
    if args.model:
        layers = model_layers(args.model, args.calibration_batches, 128, 16)
    else:
        shapes = SYNTHETIC_SHAPES if args.shapes is None else [
            tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
        layers = [(f"synthetic_{n}x{k}", *synthetic_layer(n, k, i)) for i, (n, k) in enumerate(shapes)]
    rows = []
    for name, w, h in layers:
        result = {"layer": name, "shape": list(w.shape), **time_layer(w, h, spec, args.rounds)}
        rows.append(result)
        print(f"{name:>40} {tuple(w.shape)!s:>12}: GPTQ {result['gptq_s'] * 1e3:8.1f} ms, sieve "
              f"{result['sieve_s'] * 1e3:8.1f} ms, ratio {result['ratio']:.2f}, density {result['density']:.4f}",
              flush=True)
    total_gptq = sum(r["gptq_s"] for r in rows)
    total_sieve = sum(r["sieve_s"] for r in rows)
    summary = {
        "rho": args.rho, "bits": args.bits, "group_size": args.group_size, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": os.getloadavg(), "layers": rows, "total_gptq_s": total_gptq,
        "total_sieve_s": total_sieve, "total_ratio": total_sieve / total_gptq,
        "max_ratio": max(r["ratio"] for r in rows),
    }
    print(f"total: GPTQ {total_gptq:.3f} s, sieve {total_sieve:.3f} s, ratio {summary['total_ratio']:.2f} "
          f"(max per layer {summary['max_ratio']:.2f}); load {summary['load_average']}")
    if args.json:
        from ortho_train.artifacts import write_json_atomic

        write_json_atomic(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
