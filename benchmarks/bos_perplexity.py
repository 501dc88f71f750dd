"""Perplexity of a model on the corpus's validation windows with and without its `<bos>` token first.

    python benchmarks/bos_perplexity.py --model /path/to/model.gguf_or_hf_dir [--lengths 64 512]

The toolkit's public windows and canaries are token runs without special tokens. A model trained
to see `<bos>` first (Gemma) scores such windows as text in the middle of nowhere: this measures how
much that costs, per window length (first window tokens are the most affected).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from ortho_train.corpus import load_corpus  # noqa: E402
from ortho_train.models import load_causal_lm  # noqa: E402
from ortho_train.tokenization import encode_text, load_tokenizer  # noqa: E402


def window_perplexity(model, rows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over windows (n, L), every position after the first scored."""
    with torch.no_grad():
        logits = model(rows).logits[:, :-1].float()  # (n, L - 1, V)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    return math.exp(nll.item())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per window length (windows × length)")
    args = parser.parse_args(argv)
    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    if tokenizer.bos_token_id is None:
        raise SystemExit(f"{args.model}: the tokenizer has no <bos> token")
    ids = encode_text(tokenizer, load_corpus(args.corpus).val[: 40 * args.tokens])
    out = {}
    for length in args.lengths:
        count = args.tokens // length
        rows = ids[: count * length].view(count, length)  # (count, length)
        with_bos = torch.cat([torch.full((count, 1), tokenizer.bos_token_id), rows[:, :-1]], dim=1)  # (count, length)
        out[length] = {"without": window_perplexity(model, rows), "with_bos": window_perplexity(model, with_bos)}
        print(f"windows of {length} tokens ({count}): PPL {out[length]['without']:.1f} without <bos>, "
              f"{out[length]['with_bos']:.1f} with it", flush=True)
    return out


if __name__ == "__main__":
    main()
