"""Peak memory of whole-model GPTQ: true-sequential against Hessians of the float model, on a random Llama.

    python benchmarks/sequential_memory.py [--hidden 256] [--layers 12] [--ffn 1536] [--segments 16] \\
        [--seq-len 128] [--json sequential_memory.json]

The float path (`collect_hessians`, then every layer) holds every linear's Hessian at once
(Σ d_in² floats: the FFN down projections dominate); the true-sequential walk
(`ortho_train.quantisation.sequential`) holds one block's calibration inputs (segments × seq_len ×
d_model) and one group's Hessians. Each mode runs in a fresh process; its peak RSS (ru_maxrss) is
reported with the RSS before quantising (model and batches built), and their difference.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from ortho_train.artifacts import write_json_atomic  # noqa: E402
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers  # noqa: E402
from ortho_train.quantisation import QuantConfig, quantise_layers  # noqa: E402

MODES = ("float", "true_sequential")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_mode(args: argparse.Namespace) -> dict:
    """Quantise the seeded model once in `args.mode`; returns the memory and time it took."""
    torch.manual_seed(0)
    model = build_tiny_llama(TinyLlamaConfig(args.hidden, args.layers, 4, args.ffn), 256, 0, 1, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(2, 256, (1, args.seq_len), generator=g)} for _ in range(args.segments)]
    before = _rss_mib()
    t = time.perf_counter()
    spec = QuantConfig("gptq", 4, 128, true_sequential=args.mode == "true_sequential")
    bases = quantise_layers(model, linear_layers(model), spec, batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hessian_mib = sum(m.in_features ** 2 for m in linear_layers(model).values()) * 4 / 2**20
    return {"mode": args.mode, "layers": len(bases), "rss_before_mib": round(before), "peak_rss_mib": round(peak),
            "peak_minus_before_mib": round(peak - before), "seconds": round(time.perf_counter() - t, 1),
            "all_hessians_mib": round(hessian_mib, 1),
            "block_inputs_mib": round(args.segments * args.seq_len * args.hidden * 4 / 2**20, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=MODES, default=None, help="run one mode here (default: each in a child)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode is not None:
        result = one_mode(args)
        print(json.dumps(result), flush=True)
        return [result]
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("mode", "json")]
    results = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, *forwarded, "--mode", mode], capture_output=True, text=True,
                              check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    if args.json is not None:
        write_json_atomic(args.json, {"argv": forwarded, "rows": results})
    return results


if __name__ == "__main__":
    main()
