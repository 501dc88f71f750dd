"""Resident memory and prefill speed of a deployed sieved model against the fp32 HF model.

    python benchmarks/deploy_memory.py [--vocab 32000] [--hidden 768] [--layers 12] [--ffn 2048]
        [--rho 0.01] [--prompt 128] [--decode 16] [--threads 1] [--rounds 5] [--json FILE]

Builds a random Llama-shaped model from a config (tied head; the speed and memory do not
depend on what the weights learnt), sieves every block linear (RTN INT4, group 128, base; the
top-ρ entries of the residual as the ortho stream), saves it with `save_sieved` (float, and
`embedding="int8"`) and the fp32 model with `save_pretrained`. Then each variant runs in a
process of its own, so its resident set (VmRSS) is its own: the bare runtime (torch,
transformers and ortho_train imported, no model), the fp32 model (`from_pretrained`), and the
sieved model loaded with `load_sieved` at α = 0 (base file only) and α = 1 (base + ortho),
with the prefill weight cache off (default) and on, float or 8-bit embedding/head. Each
reports RSS after load and after a `--prompt`-token prefill plus `--decode` greedy steps
(`generate`), its peak (VmHWM), and the ratio RSS ÷ (files read + bare runtime RSS).

Prefill speed: one further process holds the fp32 model and the sieved α = 0 and α = 1 models
without the cache and times a full forward pass over the prompt (every position's logits) in
interleaved rounds; the table gives the median tokens per wall second and per CPU second of
the process (the latter less sensitive to other processes) and their ratios to fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

VARIANTS = ("runtime", "fp32", *(f"a{a} cache={c} head={h}" for a in (0, 1) for c in ("off", "on")
                                  for h in ("float", "int8")))
TARGET = 1.5  # resident ≤ TARGET × (file size + bare runtime RSS)
MIB = 2 ** 20
SHARED = ("vocab", "hidden", "layers", "ffn", "rho", "prompt", "decode", "threads", "rounds")


def rss() -> dict[str, float]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile of this process, in MiB (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def build(directory: Path, args) -> None:
    """The random model, saved as fp32 HF, sieved (float tables) and sieved (INT8 tables)."""
    import torch

    from ortho_kernels import OrthoStream, QuantisedBase
    from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers
    from ortho_train.sieve import SievedLayer, build_dual_stream_model, save_sieved

    shape = TinyLlamaConfig(args.hidden, args.layers, args.hidden // 64, args.ffn,
                            max_position_embeddings=args.prompt + args.decode + 8, tie_word_embeddings=True)
    model = build_tiny_llama(shape, args.vocab, 0, 1).eval()
    model.save_pretrained(directory / "fp32")
    params = sum(p.numel() for p in model.parameters())  # the tied table counted once
    layers = {}
    for name, linear in linear_layers(model).items():
        w = linear.weight.detach()
        base = QuantisedBase.from_dense(w, 4, 128)
        layers[name] = SievedLayer(base, OrthoStream.top_fraction(w - base.dequantise(), args.rho), {})
    with torch.no_grad():
        sieved = build_dual_stream_model(model, layers, inplace=True)
    save_sieved(sieved, directory / "sieved")
    save_sieved(sieved, directory / "sieved_int8", embedding="int8")
    (directory / "shape.json").write_text(json.dumps({"parameters": params}))


def _load(variant: str, directory: Path):
    """(model, bytes of the files it reads) for a variant name of VARIANTS."""
    from transformers import AutoModelForCausalLM

    from ortho_train.sieve import load_sieved

    if variant == "fp32":
        return AutoModelForCausalLM.from_pretrained(directory / "fp32").eval(), _bytes(directory / "fp32", ".safetensors")
    alpha, cache, head = (part.split("=")[-1] for part in variant.split())
    path = directory / ("sieved_int8" if head == "int8" else "sieved")
    with_ortho = alpha == "a1"
    model = load_sieved(path, with_ortho=with_ortho, weight_cache=cache == "on")
    read = (path / "base.safetensors").stat().st_size + (with_ortho and (path / "ortho.safetensors").stat().st_size)
    return model, read


def _bytes(directory: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.endswith(suffix))


def worker(variant: str, directory: Path, args) -> dict:
    """One variant in this process: RSS after load, after prefill + decode, and the peak."""
    import torch

    import ortho_train.sieve  # noqa: F401 (the runtime row imports what the others import)
    import transformers  # noqa: F401

    torch.set_num_threads(args.threads)
    row = {"variant": variant, "runtime_imports": rss()["VmRSS"]}
    if variant == "runtime":
        return row | {"rss_load": rss()["VmRSS"], "file_mib": 0.0}
    model, read = _load(variant, directory)
    row |= {"file_mib": read / MIB, "rss_load": rss()["VmRSS"], "load": rss()}
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(prompt)  # full prefill: every position's logits
        row["prefill_s"] = time.perf_counter() - t0
        model.generate(prompt, max_new_tokens=args.decode + 1, min_new_tokens=args.decode + 1, do_sample=False,
                       eos_token_id=None, pad_token_id=0)  # one prefill + `decode` steps
    after = rss()
    return row | {"rss_after": after["VmRSS"], "peak": after["VmHWM"], "after": after}


def timing(directory: Path, args) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of a full prefill forward per model, interleaved shuffled
    rounds (CPU time: this process's, less sensitive to other processes taking the cores)."""
    import torch

    torch.set_num_threads(args.threads)
    models = {name: _load(name, directory)[0] for name in ("fp32", "a0 cache=off head=float",
                                                           "a1 cache=off head=float")}
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    wall, cpu = {name: [] for name in models}, {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(prompt)
        order = random.Random(0)
        for _ in range(args.rounds):
            for name in order.sample(list(models), len(models)):
                t0, c0 = time.perf_counter(), time.process_time()
                models[name](prompt)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])}
            for name in models}


def _run(mode: str, directory: Path, argv: list[str]) -> dict:
    """`mode` in a fresh interpreter; its last stdout line is its JSON result."""
    done = subprocess.run([sys.executable, __file__, "--worker", mode, "--dir", str(directory), *argv],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], speeds: dict[str, float], args) -> list[str]:
    """Markdown lines: one row per variant, then the prefill speeds."""
    runtime = next(r for r in rows if r["variant"] == "runtime")["rss_load"]
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    lines = [f"bare runtime RSS {runtime:.0f} MiB; target: RSS ≤ {TARGET} × (files read + runtime)",
             "| variant | files MiB | RSS after load | after prefill + decode | peak | ÷ (files + runtime) | "
             "÷ fp32 model (after) | target met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "runtime":
            continue
        ratio = r["rss_after"] / (r["file_mib"] + runtime)
        r["ratio_to_files_and_runtime"] = ratio
        lines.append(f"| {r['variant']} | {r['file_mib']:.0f} | {r['rss_load']:.0f} | {r['rss_after']:.0f} | "
                     f"{r['peak']:.0f} | {ratio:.2f} | {r['rss_after'] / fp32['rss_after']:.2f} | "
                     f"{'yes' if ratio <= TARGET else 'no'} |")
    lines += ["| prefill (full logits) | tokens/s (wall) | ÷ fp32 | tokens/CPU-s | ÷ fp32 |", "|---|---|---|---|---|"]
    for name, sec in speeds.items():
        wall, cpu = args.prompt / sec["wall"], args.prompt / sec["cpu"]
        lines.append(f"| {name} | {wall:.0f} | {speeds['fp32']['wall'] / sec['wall']:.2f} | "
                     f"{cpu:.0f} | {speeds['fp32']['cpu'] / sec['cpu']:.2f} |")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (tied embedding/head)")
    p.add_argument("--hidden", type=int, default=768, help="model width (heads of 64)")
    p.add_argument("--layers", type=int, default=12, help="decoder blocks")
    p.add_argument("--ffn", type=int, default=2048, help="SwiGLU hidden width")
    p.add_argument("--rho", type=float, default=0.01, help="ortho fraction per layer")
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens")
    p.add_argument("--decode", type=int, default=16, help="greedy decoding steps after the prefill")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every process")
    p.add_argument("--rounds", type=int, default=5, help="interleaved prefill timing rounds")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS[1:]), help="variants to run (runtime always)")
    p.add_argument("--json", help="write the rows and speeds here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker_main(args)
    shared = [f"--{name}={getattr(args, name)}" for name in SHARED]  # every process builds the same shapes
    with tempfile.TemporaryDirectory() as tmp:
        _run("build", Path(tmp), shared)
        rows = [_run(v, Path(tmp), shared) for v in ["runtime", *args.variants]]
        speeds = _run("timing", Path(tmp), shared)
        params = json.loads((Path(tmp) / "shape.json").read_text())["parameters"]
    print(f"# {params / 1e6:.1f}M parameters (vocab {args.vocab}, d {args.hidden}, {args.layers} layers, "
          f"tied head), ρ = {args.rho}, {args.threads} thread(s), load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    lines = table(rows, speeds, args)
    print("\n".join(lines))
    result = {"parameters": params, "rows": rows, "prefill_seconds": speeds, "lines": lines}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _worker_main(args) -> dict:
    directory = Path(args.dir)
    if args.worker == "build":
        build(directory, args)
        result = {}
    elif args.worker == "timing":
        result = timing(directory, args)
    else:
        result = worker(args.worker, directory, args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
