"""Benchmark of the dual-stream linear against dense and 4-bit baselines.

    python benchmarks/dual_stream_op.py [--json PATH] [--quick] [--rounds R] [--threads T] [--load N]
                            [--ms 1,16,128,512] [--shapes 4096x4096,...]

Shapes are weight shapes (N, K) = (out_features, in_features) as `nn.Linear.weight` stores
them; X is (M, K). For every (shape, M) all rows are timed in interleaved rounds (every
row once per round, in a shuffled order) after a warm-up, so that drift from other jobs on
the machine and cache warmth from the previous row hit every row alike; each row reports
the median over the rounds (at least 5; fewer than --rounds when --budget would be
exceeded). `ratio_to_fp32` divides by the fp32 `nn.Linear` median of the same (shape, M)
in the same run. `floor_ms` is the memory bandwidth floor: bytes the row must move (stored
weight streams + X + Y) divided by the copy bandwidth measured at start-up; `x_floor` =
ms / floor_ms.

On CPU the ortho-train rows use the CPU fast path with fp32 X: ortho-train's fused GEMV
(`ortho_kernels.cpu_gemv`) for M <= 8, torch's INT4 op (bf16 activations) above; "GEMV kernel
alone" calls the compiled kernel with prebuilt arguments (the null test's base-only op), and
"torch int4 CPU op alone" is torch's op with bf16 X, the anchor. Two more GEMV rows show
the threading side by side: the same kernel with OpenMP's static split (what the op used
before its non-spinning pool) and on one thread. `--load N` runs N busy-loop processes
(`benchmarks/busy_load.py`) for the whole measurement: the numbers under competing load, ratios
in the same run; the load average is printed before and after. The ortho stream sits at
uniformly random positions. On CUDA (untested here: this
project's machines have no GPU) the rows add cuBLAS fp16 and run the Triton kernel with
fp16 X, reporting GB/s and the speed-up over fp16 next to its bound 16 / b_eff.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

import torch  # noqa: E402

from busy_load import busy_load  # noqa: E402
from ortho_kernels.bitsandbytes_offline import import_bitsandbytes  # noqa: E402
from ortho_kernels.dual_stream import dual_stream_linear, prepare_cpu  # noqa: E402
from ortho_kernels.streams import OrthoStream, QuantisedBase  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
MS = [1, 16, 128, 512]
RHOS = [0.005, 0.01, 0.02, 0.05]
GROUP = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes/s of dst.copy_(src) (read + write counted) over a buffer far beyond cache."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(8):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def time_rows(rows: list[dict], device: torch.device, rounds: int, budget_s: float) -> None:
    """Interleaved timing: warm-up, then `rounds` passes over all rows in shuffled order;
    sets row['ms'] (median) and row['rounds']."""
    for row in rows:  # warm-up (also populates caches) and a per-round cost estimate
        for _ in range(2):
            row["fn"]()
    _sync(device)
    t0 = time.perf_counter()
    for row in rows:
        row["fn"]()
    _sync(device)
    per_round = time.perf_counter() - t0
    rounds = max(5, min(rounds, int(budget_s / max(per_round, 1e-9))))
    samples = {id(r): [] for r in rows}
    order = random.Random(0)
    for _ in range(rounds):  # shuffled: no row always follows the same (cache-warming) row
        for row in order.sample(rows, len(rows)):
            _sync(device)
            t = time.perf_counter()
            row["fn"]()
            _sync(device)
            samples[id(row)].append(time.perf_counter() - t)
    for row in rows:
        row["ms"] = statistics.median(samples[id(row)]) * 1e3
        row["rounds"] = rounds


def _nf4_linear(w: torch.Tensor):
    """bitsandbytes NF4 Linear4bit (blocksize 64, double-quantised absmax) and its bits/weight."""
    bnb = import_bitsandbytes()

    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
    lin = lin.to(w.device)  # .to() quantises, also on CPU
    qs = lin.weight.quant_state
    stored = lin.weight.numel() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
    if qs.nested:
        stored += qs.state2.absmax.numel() * 32 + 32
    return lin, stored / w.numel()


def build_rows(w: torch.Tensor, m: int, streams: dict, nf4, device: torch.device) -> list[dict]:
    """Row dicts: name, fn, bits_per_weight, bytes (to move). The streams are prebuilt."""
    n, k = w.shape
    cuda = device.type == "cuda"
    base, orthos = streams["base"], streams["orthos"]
    x32 = torch.randn(m, k, device=device)
    rows = []

    def add(name, fn, bits, act_bytes, extra=0):
        rows.append(dict(name=name, fn=fn, bits_per_weight=bits,
                         bytes=n * k * bits / 8 + act_bytes * (m * k + m * n) + extra))

    lin32, lin16 = streams["fp32"], streams["bf16"]
    x16 = x32.to(torch.bfloat16)
    add("fp32 nn.Linear", lambda: lin32(x32), 32, 4)
    add("bf16 nn.Linear", lambda: lin16(x16), 16, 2)
    if cuda:
        lin_h, xh = streams["fp16"], x32.half()
        add("cuBLAS fp16 nn.Linear", lambda: lin_h(xh), 16, 2)
    if nf4 is not None:
        nf4_lin, nf4_bits = nf4
        add("bitsandbytes NF4 Linear4bit", lambda: nf4_lin(x32), nf4_bits, 4)
    b_base = base.effective_bits()
    if not cuda:
        rt = prepare_cpu(base)
        xb = x32.to(torch.bfloat16)
        op = torch._weight_int4pack_mm_for_cpu  # the C binding: the cheapest call
        add("torch int4 CPU op alone", lambda: op(xb, rt.packed, GROUP, rt.scale_and_zeros),
            b_base, 2)
    xin = x32.half() if cuda else x32
    kind = "Triton" if cuda else "CPU"
    ortho_1 = orthos[0.01]
    add(f"ortho-train {kind} base-only", lambda: dual_stream_linear(xin, base, None),
        b_base, xin.element_size())
    add(f"ortho-train {kind} a=0", lambda: dual_stream_linear(xin, base, ortho_1, 0.0),
        b_base, xin.element_size())
    if not cuda and m <= rt.gemv_max_m:  # the base-only kernel without the op's dispatch
        add("ortho-train GEMV kernel alone", _raw_gemv(rt, x32), b_base, 4)
        add("GEMV alone, OpenMP static split", _raw_gemv(rt, x32, "omp"), b_base, 4)
        add("GEMV alone, 1 thread", _raw_gemv(rt, x32, threads=1), b_base, 4)
    for rho, ortho in orthos.items():
        sparse_bytes = ortho.nnz * (4 + (2 if cuda else 4)) + (n + 1) * 4  # runtime CSR
        add(f"ortho-train {kind} a=1 rho={rho:.1%}",
            lambda o=ortho: dual_stream_linear(xin, base, o, 1.0),
            b_base + ortho.nnz * 48 / (n * k), xin.element_size(), sparse_bytes)
    return rows


def _raw_gemv(rt, x32: torch.Tensor, threading: str = "pool", threads: int | None = None):
    """The compiled GEMV called directly with prebuilt pointers and output (no wrapper);
    threading "pool" (the op's) or "omp" (OpenMP static split, the previous version)."""
    from ortho_kernels import cpu_gemv

    if threading == "pool":
        fn = cpu_gemv.library().ortho_int4_gemv
    else:
        omp = cpu_gemv.omp_library()  # the OpenMP comparison build, compiled on this first call
        if isinstance(omp, str):
            raise RuntimeError(f"the OpenMP variant of the CPU GEMV is unavailable: {omp}")
        fn = omp.ortho_int4_gemv_omp
    (m, k), n = x32.shape, rt.shape[0]
    y = torch.empty(m, n)
    args = (rt.qweight.data_ptr(), rt.scales.data_ptr(), rt.zeros.data_ptr(), m, n, k,
            rt.group_size, x32.data_ptr(), y.data_ptr(), None, None, None, 0.0,
            threads or torch.get_num_threads())
    return lambda keep=(x32, y, rt): fn(*args)  # keep: the pointers' owners stay alive


def build_streams(n: int, k: int, device: torch.device, with_nf4: bool):
    g = torch.Generator(device="cpu").manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device)
    lin32 = torch.nn.Linear(k, n, bias=False, device=device)
    lin32.weight.data.copy_(w)
    streams = {"fp32": lin32, "bf16": torch.nn.Linear(k, n, bias=False, device=device,
                                                      dtype=torch.bfloat16)}
    streams["bf16"].weight.data.copy_(w)
    if device.type == "cuda":
        streams["fp16"] = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.half)
        streams["fp16"].weight.data.copy_(w)
    streams["base"] = QuantisedBase.from_dense(w, bits=4, group_size=GROUP)
    orthos = {}
    for rho in RHOS:  # uniformly random support; values of a typical residual's size
        mask = torch.rand(n, k, generator=g).to(device) < rho
        orthos[rho] = OrthoStream.from_mask(torch.randn(n, k, generator=g).to(device) * 0.01,
                                            mask)
    streams["orthos"] = orthos
    nf4 = _nf4_linear(w) if with_nf4 else None
    return w, streams, nf4


def run(shapes, ms, rounds: int, budget_s: float, device: torch.device, with_nf4: bool):
    bw = copy_bandwidth(device)
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load avg {_loadavg()}, copy bandwidth {bw / 1e9:.1f} GB/s")
    results = []
    for n, k in shapes:
        with torch.no_grad():  # weights and streams as a model holds them: normal tensors
            w, streams, nf4 = build_streams(n, k, device, with_nf4)
        for m in ms:
            with torch.inference_mode():  # the calls run as in generation
                rows = build_rows(w, m, streams, nf4, device)
                time_rows(rows, device, rounds, budget_s)
                fp32_ms = rows[0]["ms"]
                fp16_ms = next((r["ms"] for r in rows if r["name"].startswith("cuBLAS")), None)
                for r in rows:
                    floor_ms = r["bytes"] / bw * 1e3
                    out = dict(name=r["name"], shape=[n, k], m=m, ms=round(r["ms"], 4),
                               ratio_to_fp32=round(r["ms"] / fp32_ms, 4),
                               bits_per_weight=round(r["bits_per_weight"], 3),
                               floor_ms=round(floor_ms, 4), x_floor=round(r["ms"] / floor_ms, 2),
                               rounds=r["rounds"])
                    if fp16_ms is not None:
                        out["gb_per_s"] = round(r["bytes"] / r["ms"] / 1e6, 1)
                        out["speedup_vs_fp16"] = round(fp16_ms / r["ms"], 2)
                        out["bound_16_over_b"] = round(16 / r["bits_per_weight"], 2)
                    results.append(out)
                    print(_format_row(out), flush=True)
        del w, streams, nf4
    return results, bw


def _loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def prefill_lines(results: list[dict], device: torch.device) -> list[str]:
    """M > 8: the dual stream (a=0 and a=1 at rho=1%) against fp32 at every shape and M."""
    kind = "Triton" if device.type == "cuda" else "CPU"
    lines = []
    for r in results:
        if r["m"] > 8 and r["name"] in (f"ortho-train {kind} a=0", f"ortho-train {kind} a=1 rho=1.0%"):
            ok = r["ratio_to_fp32"] <= 1.0
            lines.append(f"- {r['shape'][0]}x{r['shape'][1]} M={r['m']} {r['name']}: "
                         f"{r['ratio_to_fp32']:.3f}x fp32 (target <= 1) -> {'MET' if ok else 'MISSED'}")
    return lines


def _format_row(r: dict) -> str:
    shape = f"{r['shape'][0]}x{r['shape'][1]}"
    extra = ""
    if "gb_per_s" in r:
        extra = f" | {r['gb_per_s']:7.1f} GB/s | {r['speedup_vs_fp16']:5.2f}/{r['bound_16_over_b']:.2f}"
    return (f"| {shape:>10} | {r['m']:>4} | {r['name']:<32} | {r['ms']:9.3f} | "
            f"{r['ratio_to_fp32']:6.3f} | {r['bits_per_weight']:6.3f} | {r['floor_ms']:8.3f} | "
            f"{r['x_floor']:6.2f} |{extra}")


def acceptance(results: list[dict], device: torch.device) -> list[str]:
    """The op's speed targets at M=1, 4096x4096, from this run's medians."""
    kind = "Triton" if device.type == "cuda" else "CPU"
    pick = {r["name"]: r for r in results if r["shape"] == [4096, 4096] and r["m"] == 1}
    a0 = pick.get(f"ortho-train {kind} a=0")
    if a0 is None:
        return ["(4096x4096, M=1 not in this run)"]
    lines = []

    def check(label, value, target, ok):
        lines.append(f"- {label}: {value} (target {target}) -> {'MET' if ok else 'MISSED'}")

    fp32 = pick["fp32 nn.Linear"]["ms"]
    alone = pick.get("ortho-train GEMV kernel alone")
    if alone:
        check("GEMV kernel alone speed-up over fp32 (under --load: >= 2x)",
              f"{fp32 / alone['ms']:.2f}x", ">= 2x", fp32 / alone["ms"] >= 2)
        for name in ("GEMV alone, OpenMP static split", "GEMV alone, 1 thread"):
            if name in pick:
                lines.append(f"- ({name}: {fp32 / pick[name]['ms']:.2f}x fp32)")
    check("a=0 speed-up over fp32 nn.Linear", f"{fp32 / a0['ms']:.2f}x", ">= 4x",
          fp32 / a0["ms"] >= 4)
    nf4 = pick.get("bitsandbytes NF4 Linear4bit")
    if nf4:
        check("a=0 speed-up over bnb NF4", f"{nf4['ms'] / a0['ms']:.1f}x", ">= 20x",
              nf4["ms"] / a0["ms"] >= 20)
    check("a=0 vs memory floor (stretch)", f"{a0['x_floor']:.2f}x floor", "<= 1.3x",
          a0["x_floor"] <= 1.3)
    for rho, target in ((0.01, 1.3), (0.05, 2.0)):
        r = pick[f"ortho-train {kind} a=1 rho={rho:.1%}"]
        check(f"a=1 rho={rho:.0%} / a=0", f"{r['ms'] / a0['ms']:.2f}", f"<= {target}",
              r["ms"] / a0["ms"] <= target)
    only = pick[f"ortho-train {kind} base-only"]
    rel = a0["ms"] / only["ms"] - 1  # one-sided: the switch must not cost; faster is noise
    check("null test: a=0 time vs base-only call", f"{rel:+.1%}", "<= +2%", rel <= 0.02)
    alone = pick.get("ortho-train GEMV kernel alone")
    if alone:  # what remains is the op's Python dispatch (validation, cache lookups)
        rel = a0["ms"] / alone["ms"] - 1
        check("null test: a=0 time vs the GEMV kernel alone", f"{rel:+.1%}", "<= +2%",
              rel <= 0.02)
    torch_op = pick.get("torch int4 CPU op alone")
    if torch_op:
        lines.append(f"- (a=0 vs torch's int4 CPU op alone: {torch_op['ms'] / a0['ms']:.2f}x faster)")
    return lines


def null_test_identical(device: torch.device) -> bool:
    """a=0 output equals the base-only output bit for bit, with NaN ortho values."""
    w = torch.randn(256, 512, device=device) * 0.02
    base = QuantisedBase.from_dense(w, group_size=GROUP)
    nan = OrthoStream.top_fraction(w, 0.05)
    nan = OrthoStream(nan.indices, torch.full_like(nan.values, float("nan")), nan.shape)
    x = torch.randn(3, 512, device=device, dtype=torch.half if device.type == "cuda" else None)
    same = torch.equal(dual_stream_linear(x, base, nan, 0.0), dual_stream_linear(x, base, None))
    if device.type == "cpu":  # and equals the base-only kernel called directly
        rt = prepare_cpu(base)
        if x.shape[0] <= rt.gemv_max_m:
            raw = rt.gemv(x)
        else:
            raw = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), rt.packed, GROUP,
                                                    rt.scale_and_zeros).float()
        same = same and torch.equal(dual_stream_linear(x, base, nan, 0.0), raw)
    return same


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the table (list of row dicts) to this path")
    p.add_argument("--quick", action="store_true", help="4096x4096 at M=1 only, fewer rounds")
    p.add_argument("--rounds", type=int, default=41, help="timed rounds per (shape, M)")
    p.add_argument("--budget", type=float, default=30.0, help="max seconds per (shape, M)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-nf4", action="store_true", help="skip bitsandbytes")
    p.add_argument("--load", type=int, default=0,
                   help="run N busy-loop processes as competing load while timing")
    p.add_argument("--ms", default=None, help="comma-separated M values (default 1,16,128,512)")
    p.add_argument("--shapes", default=None, help="comma-separated NxK weight shapes")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, ms = (SHAPES[:1], MS[:1]) if args.quick else (SHAPES, MS)
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    if args.shapes:
        shapes = [tuple(int(d) for d in v.split("x")) for v in args.shapes.split(",")]
    rounds = min(args.rounds, 21) if args.quick else args.rounds
    print(f"# competing load: {args.load} busy-loop process(es)")
    print("| shape NxK | M | row | ms (median) | /fp32 | bits/w | floor ms | x floor |"
          + (" GB/s | vs fp16/bound |" if device.type == "cuda" else ""))
    with busy_load(args.load):
        results, bw = run(shapes, ms, rounds, args.budget, device, not args.no_nf4)
        print(f"# load avg after: {_loadavg()}")
    print("\nAcceptance (4096x4096, M=1):")
    for line in acceptance(results, device):
        print(line)
    for line in prefill_lines(results, device):
        print(line)
    identical = null_test_identical(device)
    print(f"- null test: a=0 output identical to base-only (NaN ortho values): {identical}")
    if device.type == "cpu":
        print("- Triton kernel speed: not measured (no GPU here); correctness is covered by "
              "the TRITON_INTERPRET=1 tests")
    if args.json:  # the table: one dict per row, run facts repeated on each
        for r in results:
            r.update(device=str(device), threads=torch.get_num_threads(),
                     copy_gb_per_s=round(bw / 1e9, 2))
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
