"""Training and decoding speed under competing load, per thread setting, side by side.

    python benchmarks/cpu_threads.py [--load 1] [--steps 30] [--threads 1 2]

For each thread count and OpenMP wait policy (the library default, PASSIVE as `train.py`
sets it), a fresh Python process (OpenMP reads its environment once, at load) times optimiser
steps of the quickstart's 3.3M-parameter Llama (batch 8 × 128 tokens, AdamW) and greedy
decoding (20 prompts × 12 new tokens, the extraction probe's shape), first on the idle
machine, then while `--load` busy-loop processes hold cores (`benchmarks/busy_load.py`). It
prints ms per step / per decoded batch and the slowdown loaded / idle of each setting.
Timings mean something only when nothing else runs: the script reports the load average
it started at.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

from busy_load import busy_load  # noqa: E402

_CHILD = r"""
import json, sys, time
import torch
from ortho_train.models import TinyLlamaConfig, build_tiny_llama

torch.set_num_threads(int(sys.argv[1]))
steps = int(sys.argv[2])
torch.manual_seed(0)
model = build_tiny_llama(TinyLlamaConfig(), vocab_size=259, pad_token_id=0, eos_token_id=1)
optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = torch.randint(3, 259, (8, 128))  # (batch, tokens)

def step():
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)

for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
train_ms = (time.perf_counter() - start) / steps * 1e3

model.eval()
prompts = torch.randint(3, 259, (20, 30))  # (prompts, prompt tokens)
with torch.no_grad():
    model.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    for _ in range(3):
        model.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
decode_ms = (time.perf_counter() - start) / 3 * 1e3
print(json.dumps({"train_ms": train_ms, "decode_ms": decode_ms}))
"""

SETTINGS = {"default wait": {}, "PASSIVE wait": {"OMP_WAIT_POLICY": "PASSIVE"}}


def measure(threads: int, env_extra: dict[str, str], steps: int) -> dict[str, float]:
    """One child process's timings (its own OpenMP environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env |= env_extra
    out = subprocess.run([sys.executable, "-c", _CHILD, str(threads), str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", type=int, default=1, help="busy-loop processes for the loaded runs")
    p.add_argument("--steps", type=int, default=30, help="timed optimiser steps per run")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    args = p.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"loaded runs beside {args.load} busy process(es)")
    cases = [(t, name, env) for t in args.threads for name, env in SETTINGS.items()]
    idle = {(t, name): measure(t, env, args.steps) for t, name, env in cases}
    with busy_load(args.load):
        loaded = {(t, name): measure(t, env, args.steps) for t, name, env in cases}
    print(f"{'threads':>7} {'wait':>13} | {'train ms idle':>13} {'loaded':>8} {'ratio':>6} | "
          f"{'decode ms idle':>14} {'loaded':>8} {'ratio':>6}")
    for t, name, _ in cases:
        a, b = idle[(t, name)], loaded[(t, name)]
        print(f"{t:>7} {name:>13} | {a['train_ms']:>13.1f} {b['train_ms']:>8.1f} "
              f"{b['train_ms'] / a['train_ms']:>5.2f}x | {a['decode_ms']:>14.1f} {b['decode_ms']:>8.1f} "
              f"{b['decode_ms'] / a['decode_ms']:>5.2f}x")


if __name__ == "__main__":
    main()
