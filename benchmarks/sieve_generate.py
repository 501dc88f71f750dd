"""Greedy-generation speed of a sieved model: fp32 vs the reference and the deployed op.

    python benchmarks/sieve_generate.py [--threads 1] [--new-tokens 64] [--rounds 7]
                                               [--rho 0.05] [--load N]

Builds the ~3.3M-parameter tiny Llama (d = 256, 4 layers, byte vocabulary), sieves it
post hoc at ρ (GPTQ INT4, group 128, calibration on random tokens: the speed does not depend
on what the weights learnt), saves the two streams with `save_sieved` and loads them back
with `load_sieved` — once with `backend="reference"` (dense dequantise-and-matmul on every
call) and once with the default "auto" (the CPU fast path). Each row runs `generate`
greedily from the same prompt; rows are timed in interleaved rounds, and the table gives the
median tokens/s and the ratio to the fp32 model of the same run. `--load N` runs N
busy-loop processes meanwhile.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

import torch  # noqa: E402

from busy_load import busy_load  # noqa: E402
from ortho_train.curvature import collect_hessians  # noqa: E402
from ortho_train.models import TinyLlamaConfig, build_tiny_llama  # noqa: E402
from ortho_train.ortho_linear import set_alpha  # noqa: E402
from ortho_train.quantisation import QuantConfig  # noqa: E402
from ortho_train.sieve.artifacts import load_sieved, save_sieved  # noqa: E402
from ortho_train.sieve.core import SieveConfig  # noqa: E402
from ortho_train.sieve.model import build_dual_stream_model, sieve_model  # noqa: E402

VOCAB = 259  # bytes + pad + eos + bos, as the quickstart's tokenizer


def build_models(rho: float, directory: str) -> dict[str, torch.nn.Module]:
    """The fp32 model and the sieved one loaded back with each backend, by row name."""
    torch.manual_seed(0)
    model = build_tiny_llama(TinyLlamaConfig(256, 4, 4, 688), VOCAB, 0, 1).eval()
    batches = [{"input_ids": torch.randint(3, VOCAB, (4, 64))} for _ in range(4)]
    layers = sieve_model(model, "posthoc", SieveConfig(QuantConfig("gptq", 4, 128), rho=rho),
                         collect_hessians(model, batches))
    save_sieved(build_dual_stream_model(model, layers), directory)
    models = {"fp32 model": model}
    for backend in ("reference", "auto"):
        loaded = load_sieved(directory, backend=backend)
        for alpha in (0.0, 1.0):
            copy = loaded if alpha == 1.0 else load_sieved(directory, backend=backend)
            set_alpha(copy, alpha)
            models[f"sieved {backend}, α = {alpha:g}"] = copy
    return models


@torch.inference_mode()
def time_generation(models: dict, prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    """Median seconds per `generate` call, interleaved shuffled rounds after a warm-up."""
    def gen(model):
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)

    for model in models.values():
        gen(model)
    samples = {name: [] for name in models}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(list(models), len(models)):
            t0 = time.perf_counter()
            gen(models[name])
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call")
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    p.add_argument("--rho", type=float, default=0.05, help="ortho fraction of the sieve")
    p.add_argument("--load", type=int, default=0, help="busy-loop processes meanwhile")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(args.rho, os.path.join(tmp, "sieved"))
        prompt = torch.randint(3, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(1))
        print(f"# threads {torch.get_num_threads()}, competing load {args.load} busy-loop "
              f"process(es), load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        with busy_load(args.load):
            seconds = time_generation(models, prompt, args.new_tokens, args.rounds)
        print(f"# load avg after {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
              f"{args.new_tokens} new tokens after a {args.prompt}-token prompt, median of "
              f"{args.rounds} rounds")
    fp32 = args.new_tokens / seconds["fp32 model"]
    print("| model | tokens/s | ÷ fp32 model |\n|---|---|---|")
    for name, sec in seconds.items():
        rate = args.new_tokens / sec
        print(f"| {name} | {rate:.0f} | {rate / fp32:.2f} |")


if __name__ == "__main__":
    main()
