"""Benchmark: what a K-FAC refresh costs, beside a plain forward+backward of the same batch.

    OMP_NUM_THREADS=2 python benchmarks/kfac_collect.py                 # the quickstart's Llama
    python benchmarks/kfac_collect.py --batch-size 8 --seq-len 128 --rounds 5 --json out.json

The model is the quickstart's tiny Llama (`TinyLlamaConfig` defaults: hidden 256, 4 blocks,
SwiGLU 688, byte vocabulary 259), randomly initialised, on random tokens: timings do not
depend on the weights. Reported, as medians over `--rounds` interleaved rounds:

* whole model: forward+backward alone, and with a `KFACCollector` on every linear but the
  LM head (its `step()` included): the collection overhead per training step;
* per layer: the two Gram matrices of one batch (a aᵀ over d_in+bias, g gᵀ over d_out) as the
  hooks compute them, the float64 eigendecomposition of A and G (`KroneckerEigenbasis`), and
  one `project_out` of a weight-shaped matrix with the basis in float64 and in float32 (the
  per-step cost of an OGD projection).

`--hidden/--blocks/--intermediate` shrink the model (tests); the defaults are the quickstart's.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

import torch  # noqa: E402

from ortho_train.artifacts import write_json_atomic  # noqa: E402
from ortho_train.kfac.eigenbasis import KroneckerEigenbasis  # noqa: E402
from ortho_train.kfac.factors import KFACCollector, _gram  # noqa: E402
from ortho_train.kfac.subspace import SubspaceConfig, project_out  # noqa: E402
from ortho_train.metrics import token_logprobs  # noqa: E402
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers  # noqa: E402

VOCAB = 259  # byte tokenizer: 256 bytes + pad/eos/unk


def _median_time(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_pass(model, ids: torch.Tensor, collector: KFACCollector | None) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits  # (B, T, V)
    logp, scored = token_logprobs(logits, ids)
    if collector is not None:
        collector.set_num_loss_terms(int(scored.sum()))
    (-logp.sum() / scored.sum()).backward()
    if collector is not None:
        collector.step()


def whole_model(model, ids: torch.Tensor, rounds: int) -> tuple[dict, KFACCollector]:
    collector = KFACCollector(model)
    collector.set_token_mask(torch.ones_like(ids))
    plain_times, kfac_times = [], []
    _train_pass(model, ids, None)  # warm-up
    for _ in range(rounds):  # interleaved, so load changes hit both alike
        plain_times.append(_median_time(lambda: _train_pass(model, ids, None), 1))
        with collector:
            kfac_times.append(_median_time(lambda: _train_pass(model, ids, collector), 1))
    plain, kfac = statistics.median(plain_times), statistics.median(kfac_times)
    return {"fwd_bwd_s": plain, "fwd_bwd_kfac_s": kfac, "overhead": kfac / plain - 1}, collector


def per_layer(model, collector: KFACCollector, tokens: int, rounds: int) -> list[dict]:
    factors = collector.factors()
    rows = []
    for name, module in linear_layers(model).items():
        d_in = module.in_features + (module.bias is not None)
        a_rows, g_rows = torch.randn(tokens, d_in), torch.randn(tokens, module.out_features)  # (N, d)
        basis = KroneckerEigenbasis.from_factors(factors[name])
        mask = SubspaceConfig("flattest", fraction=0.5).mask(basis)
        basis32 = basis.to(dtype=torch.float32)
        grad = torch.randn(module.out_features, d_in)
        rows.append({
            "layer": name, "d_out": module.out_features, "d_in": d_in,
            "gram_s": _median_time(lambda: (_gram(a_rows), _gram(g_rows)), rounds),
            "eigh_s": _median_time(lambda: KroneckerEigenbasis.from_factors(factors[name]), rounds),
            "project_s": _median_time(lambda: project_out(grad, basis, mask), rounds),
            "project32_s": _median_time(lambda: project_out(grad, basis32, mask), rounds),
        })
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=TinyLlamaConfig.hidden_size)
    parser.add_argument("--blocks", type=int, default=TinyLlamaConfig.num_layers)
    parser.add_argument("--intermediate", type=int, default=TinyLlamaConfig.intermediate_size)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    config = TinyLlamaConfig(hidden_size=args.hidden, num_layers=args.blocks,
                             intermediate_size=args.intermediate)
    model = build_tiny_llama(config, VOCAB, pad_token_id=0, eos_token_id=1)
    ids = torch.randint(3, VOCAB, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))  # (B, T)
    summary, collector = whole_model(model, ids, args.rounds)
    layers = per_layer(model, collector, ids.numel(), args.rounds)
    totals = {k: sum(r[k] for r in layers) for k in ("gram_s", "eigh_s", "project_s", "project32_s")}
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}×{args.seq_len}, "
          f"median of {args.rounds}")
    print(f"forward+backward {summary['fwd_bwd_s'] * 1e3:.1f} ms, with K-FAC hooks "
          f"{summary['fwd_bwd_kfac_s'] * 1e3:.1f} ms (+{100 * summary['overhead']:.0f}%)")
    print(f"{'layer':34s} {'d_out×d_in':>10s} {'grams ms':>9s} {'eigh ms':>8s} "
          f"{'proj f64 ms':>11s} {'proj f32 ms':>11s}")
    for r in layers:
        print(f"{r['layer']:34s} {r['d_out']:>4d}×{r['d_in']:<5d} {r['gram_s'] * 1e3:9.2f} "
              f"{r['eigh_s'] * 1e3:8.2f} {r['project_s'] * 1e3:11.2f} {r['project32_s'] * 1e3:11.2f}")
    print(f"{'total (' + str(len(layers)) + ' layers)':34s} {'':10s} {totals['gram_s'] * 1e3:9.1f} "
          f"{totals['eigh_s'] * 1e3:8.1f} {totals['project_s'] * 1e3:11.1f} {totals['project32_s'] * 1e3:11.1f}")
    result = {"args": vars(args), "threads": torch.get_num_threads(), **summary,
              "totals": totals, "layers": layers}
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
