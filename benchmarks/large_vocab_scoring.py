"""Scoring a batch at a large vocabulary: plain forward (B, T, V logits) vs the chunked LM head.

    python benchmarks/large_vocab_scoring.py --model /path/to/gemma3-270m-q4_k_m.gguf [--bf16]
    python benchmarks/large_vocab_scoring.py --tiny [--vocab 262144] [--bf16]

Per-sequence mean next-token NLL of a batch (default 32 × 64 tokens of the corpus's validation
text, no <bos>, as the toolkit's public windows; random ids for `--tiny`):

    old:  logits = model(ids).logits (B, T, V), then `metrics.token_logprobs` (logsumexp over V);
    new:  `metrics.label_logprobs`: body once, LM head on `--logit-bytes` of float32 logits at a
          time (`metrics.scoring`);
    bf16: new under `torch.autocast("cpu", dtype=torch.bfloat16)` (with `--bf16`).

Each mode runs in its own process (so peaks are separate): the model is loaded, the peak RSS
counter is reset (`/proc/self/clear_refs`; where that is refused the peak includes loading), and
the batch is scored `--repeats` times. Printed side by side: best seconds, peak RSS during scoring,
their ratios to old, and max |ΔNLL| against old (bf16: also the mean, and the perplexity of the
first 16 windows, exp(mean NLL), in fp32 and bf16). `--tiny` is a random 2-block Llama of width 64
with an untied head: the LM head is nearly all of its cost.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from ortho_train.metrics import label_logprobs, token_logprobs  # noqa: E402

MODES = ("old", "new", "bf16")
PPL_WINDOWS = 16


def _rss_field(name: str) -> float:
    """VmRSS / VmHWM of this process in GiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 2**20
    return math.nan


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def load_inputs(args) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (eval mode) and the batch of ids (B, T)."""
    if args.tiny:
        model = _tiny_model(args.vocab)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
        return model, ids
    from ortho_train.corpus import load_corpus
    from ortho_train.models import load_causal_lm
    from ortho_train.tokenization import encode_text, load_tokenizer

    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    need = args.batch * args.seq_len
    text = load_corpus(args.corpus).val[: 20 * need]
    ids = encode_text(tokenizer, text)[:need]
    if ids.numel() < need:
        raise SystemExit(f"the corpus's validation text gives {ids.numel()} tokens, {need} needed")
    return model, ids.view(args.batch, args.seq_len)  # (B, T)


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, mode: str, logit_bytes: int) -> torch.Tensor:
    """Per-sequence mean next-token NLL (B,) float64, every position after the first scored."""
    if mode == "old":
        logits = model(input_ids=ids).logits  # (B, T, V)
        logp, mask = token_logprobs(logits, ids)
        del logits
    elif mode == "new":
        logp, mask = label_logprobs(model, ids, ids, logit_bytes=logit_bytes)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, mask = label_logprobs(model, ids, ids, logit_bytes=logit_bytes)
    return (-logp.double().sum(-1) / mask.sum(-1)).cpu()


def worker(args) -> dict:
    """One mode in this process: load, reset the peak, score `repeats` times."""
    model, ids = load_inputs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_loaded = _rss_field("VmRSS")
    peak_reset = _reset_peak()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        nll = sequence_nll(model, ids, args.worker, args.logit_bytes)
        seconds.append(time.perf_counter() - start)
    return {"mode": args.worker, "seconds": min(seconds), "all_seconds": seconds, "rss_loaded_gib": rss_loaded,
            "peak_rss_gib": _rss_field("VmHWM"), "peak_reset": peak_reset, "nll": nll.tolist(),
            "vocab": int(model.get_output_embeddings().weight.shape[0]), "threads": torch.get_num_threads()}


def run_mode(argv: list[str], mode: str) -> dict:
    """`worker` for `mode` in a fresh Python process; its JSON result."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--worker", mode],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(results: dict[str, dict]) -> dict:
    """Ratios to old, NLL differences against old (and bf16 against new), PPL of the first windows."""
    old = torch.tensor(results["old"]["nll"], dtype=torch.float64)
    rows = {}
    for mode, found in results.items():
        nll = torch.tensor(found["nll"], dtype=torch.float64)
        row = {"seconds": found["seconds"], "peak_rss_gib": found["peak_rss_gib"],
               "speedup_vs_old": results["old"]["seconds"] / found["seconds"],
               "peak_rss_ratio_vs_old": found["peak_rss_gib"] / results["old"]["peak_rss_gib"],
               "max_abs_nll_diff_vs_old": (nll - old).abs().max().item(),
               f"ppl_first_{PPL_WINDOWS}": math.exp(nll[:PPL_WINDOWS].mean().item())}
        if mode == "bf16" and "new" in results:
            new = torch.tensor(results["new"]["nll"], dtype=torch.float64)
            row["speedup_vs_new"] = results["new"]["seconds"] / found["seconds"]
            row["max_abs_nll_diff_vs_new"] = (nll - new).abs().max().item()
            row["mean_abs_nll_diff_vs_new"] = (nll - new).abs().mean().item()
            fp32_ppl = math.exp(new[:PPL_WINDOWS].mean().item())
            row["ppl_rel_change_vs_fp32"] = row[f"ppl_first_{PPL_WINDOWS}"] / fp32_ppl - 1
        rows[mode] = row
    return rows


def print_table(rows: dict, results: dict) -> None:
    print(f"{'mode':6} {'seconds':>9} {'speed-up':>9} {'peak RSS GiB':>13} {'RSS ratio':>10} "
          f"{'max|ΔNLL|':>11} {'PPL@' + str(PPL_WINDOWS):>9}")
    for mode, row in rows.items():
        print(f"{mode:6} {row['seconds']:9.2f} {row['speedup_vs_old']:9.2f} {row['peak_rss_gib']:13.2f} "
              f"{row['peak_rss_ratio_vs_old']:10.2f} {row['max_abs_nll_diff_vs_old']:11.2e} "
              f"{row[f'ppl_first_{PPL_WINDOWS}']:9.3f}")
    if "bf16" in rows:
        bf16 = rows["bf16"]
        print(f"bf16 vs fp32 (new): {bf16['speedup_vs_new']:.2f}x, NLL max |Δ| {bf16['max_abs_nll_diff_vs_new']:.2e}, "
              f"mean |Δ| {bf16['mean_abs_nll_diff_vs_new']:.2e}, PPL {100 * bf16['ppl_rel_change_vs_fp32']:+.2f}%")
    loaded = ", ".join(f"{m} {r['rss_loaded_gib']:.2f}" for m, r in results.items())
    print(f"RSS after loading (GiB): {loaded}; peak counters reset: "
          f"{all(r['peak_reset'] for r in results.values())}; threads {results['old']['threads']}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a .gguf file or Hugging Face model directory")
    source.add_argument("--tiny", action="store_true", help="a random tiny Llama of `--vocab` tokens")
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--logit-bytes", type=int, default=256 * 2**20, help="float32 logits per head chunk")
    parser.add_argument("--bf16", action="store_true", help="also score under bf16 autocast")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return {}
    results = {mode: run_mode(argv, mode) for mode in MODES if mode != "bf16" or args.bf16}
    rows = compare(results)
    print_table(rows, results)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "argv": argv}, indent=1))
    return rows


if __name__ == "__main__":
    main()
