"""Decode speed (tokens/s, one thread) of a ~135M-parameter Llama: Hugging Face `generate` in
fp32, the sieved model through `generate` (the old path) and through `FastDecoder` (the
compiled static-cache step, int16 and int8 activations) at α = 0 and α = 1, and llama.cpp.

    python benchmarks/decode_speed.py [--new-tokens 64] [--rounds 5] [--rho 0.01]
                                      [--llama-cpp /path/to/llama-bench] [--layers 30]

The model is random, built from a config (no hub): SmolLM-135M's shape (d = 576, 30 layers, 9
heads with 3 key/value heads, SwiGLU 1536) with a tied 32,000-token head, about 125M parameters;
speed does not depend on what the weights learnt. Sieve: RTN INT4, group 128, the ortho stream
the largest 1% of the rounding residual (ρ = `--rho`), saved and loaded back with
`load_sieved`. Rows run in interleaved shuffled rounds after a warm-up (which also compiles);
the table gives the median tokens/s of `--new-tokens` greedy tokens after an 8-token prompt and
each row's ratio to llama.cpp (when given) and to the sieved α = 0 row of its own path. Each row
is timed in wall seconds and in CPU seconds of this process (`time.process_time`, one thread):
on a shared machine the CPU rate leaves out the waits for a core.
`--llama-cpp BIN`: BIN is llama.cpp's `llama-bench`; the α = 0 model is exported with
`ortho_train.export` ("gguf-q4_0", rounded to Q4_0 blocks) and timed with `-t 1 -p 0 -n N`
once per round. Without it the table says "llama.cpp: not given".
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
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # run as a script from a checkout

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ortho_kernels import OrthoStream, QuantisedBase  # noqa: E402
from ortho_train.models import linear_layers  # noqa: E402
from ortho_train.ortho_linear import set_alpha  # noqa: E402
from ortho_train.sieve.artifacts import load_sieved, save_sieved  # noqa: E402
from ortho_train.sieve.core import SievedLayer  # noqa: E402
from ortho_train.sieve.fast_decode import FastDecodeConfig, FastDecoder  # noqa: E402
from ortho_train.sieve.model import build_dual_stream_model  # noqa: E402

VOCAB, PROMPT, GROUP = 32000, 8, 128


def build_model(layers: int) -> LlamaForCausalLM:
    """SmolLM-135M's shape, random weights, tied 32k head (module docstring)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def sieve_rtn(model: torch.nn.Module, rho: float, directory: str) -> None:
    """RTN INT4 group 128 + the top-ρ residual as the ortho stream, saved to `directory`."""
    layers = {}
    for name, linear in linear_layers(model).items():
        w = linear.weight.detach()
        base = QuantisedBase.from_dense(w, 4, GROUP)
        layers[name] = SievedLayer(base, OrthoStream.top_fraction(w - base.dequantise(), rho), {})
    save_sieved(build_dual_stream_model(model, layers), directory)


def timed(new: int, call: Callable[[], object]) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) of one call. With one
    thread the CPU rate leaves out the time the process waited for a core while other jobs
    held it; cache and memory-bandwidth contention still slow both."""
    w0, c0 = time.perf_counter(), time.process_time()
    call()
    return new / (time.perf_counter() - w0), new / (time.process_time() - c0)


def hf_row(model, alpha: float | None, prompt, new: int) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        if alpha is not None:
            set_alpha(model, alpha)
        return timed(new, lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                                 do_sample=False, eos_token_id=None, pad_token_id=0))
    return run


def fast_row(model, alpha: float, activations: str, prompt, new: int) -> Callable[[], tuple[float, float]]:
    set_alpha(model, alpha)
    decoder = FastDecoder(model, FastDecodeConfig(max_len=PROMPT + new + 1, activations=activations))

    return lambda: timed(new, lambda: decoder.generate(prompt, new))


def llama_cpp_row(binary: str, directory: str, new: int) -> Callable[[], tuple[float, float]]:
    """llama-bench on the α = 0 model exported to Q4_0: tokens/s of its tg run (wall clock; its
    CPU rate is not known, given as NaN)."""
    from ortho_train.export import export, read_sieved

    gguf = os.path.join(directory, "model-q4_0.gguf")
    # GGUF needs a vocabulary: the toolkit's byte tokenizer, padded to the 32k rows (unused ids)
    Path(directory, "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    export(read_sieved(directory, alpha=0), "gguf-q4_0", gguf)

    def run() -> tuple[float, float]:
        out = subprocess.run([binary, "-m", gguf, "-t", "1", "-p", "0", "-n", str(new), "-r", "1",
                              "-o", "json"], capture_output=True, text=True, check=True)
        return float(json.loads(out.stdout)[0]["avg_ts"]), float("nan")
    return run


def timed_rounds(rows: dict[str, Callable[[], tuple[float, float]]], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) tokens/s per row over interleaved, shuffled rounds, after one warm-up
    call each (which compiles the fast rows)."""
    for name, run in rows.items():
        t0 = time.perf_counter()
        run()
        print(f"# warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    samples = {name: [] for name in rows}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(list(rows), len(rows)):
            samples[name].append(rows[name]())
            print(f"# round {len(samples[name])}, {name}: {samples[name][-1][0]:.2f} tokens/s, "
                  f"{samples[name][-1][1]:.2f} tokens/CPU-s", flush=True)
    return {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for name, v in samples.items()}


def build_rows(args, directory: str) -> dict[str, Callable[[], tuple[float, float]]]:
    fp32 = build_model(args.layers)
    print(f"# {sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M parameters, {args.layers} layers, "
          f"vocabulary {VOCAB} (tied head)", flush=True)
    sieve_rtn(fp32, args.rho, directory)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    old, new = load_sieved(directory), load_sieved(directory)
    rows = {"HF generate, fp32": hf_row(fp32, None, prompt, args.new_tokens)}
    for alpha in (0.0, 1.0):
        rows[f"sieved α = {alpha:g}, HF generate (old path)"] = hf_row(old, alpha, prompt, args.new_tokens)
    for activations in ("int16", "int8"):
        for alpha in (0.0, 1.0):
            rows[f"sieved α = {alpha:g}, fast decode {activations}"] = fast_row(
                new, alpha, activations, prompt, args.new_tokens)
    if args.llama_cpp:
        rows["llama.cpp Q4_0 (α = 0 exported)"] = llama_cpp_row(args.llama_cpp, directory, args.new_tokens)
    return rows


def print_table(rates: dict[str, tuple[float, float]], llama_cpp: str | None) -> None:
    """Wall and CPU tokens/s; ratios of wall rates to llama.cpp, of CPU rates to α = 0."""
    ref = next((w for k, (w, _) in rates.items() if k.startswith("llama.cpp")), None)
    print("| row | tokens/s (wall) | tokens/CPU-s | wall ÷ llama.cpp | CPU rate ÷ α = 0 of its path |\n"
          "|---|---|---|---|---|")
    for name, (wall, cpu) in rates.items():
        base = name.replace("α = 1", "α = 0")
        vs_cpp = f"{wall / ref:.2f}" if ref else "—"
        vs_a0 = f"{cpu / rates[base][1]:.2f}" if base in rates and base != name else "—"
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {vs_cpp} | {vs_a0} |")
    if not llama_cpp:
        print("llama.cpp: not given")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per timed call")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--rho", type=float, default=0.01, help="ortho fraction of each sieved linear")
    p.add_argument("--layers", type=int, default=30, help="decoder blocks (30: the ~135M shape)")
    p.add_argument("--llama-cpp", default=None, metavar="BIN", help="llama.cpp's llama-bench binary")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = build_rows(args, os.path.join(tmp, "sieved"))
        print(f"# threads 1, load avg before {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        rates = timed_rounds(rows, args.rounds)
        print(f"# load avg after {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.new_tokens} new "
              f"tokens after an {PROMPT}-token prompt, median of {args.rounds} interleaved rounds")
    print_table(rates, args.llama_cpp)


if __name__ == "__main__":
    main()
