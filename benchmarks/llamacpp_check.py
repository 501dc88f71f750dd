"""llama.cpp itself checks the GGUF export: the toolkit's greedy α = 0 tokens against llama.cpp's.

    python benchmarks/llamacpp_check.py --llama-simple PATH/llama-simple [--arch llama|gemma3]
        [--new-tokens 24] [--steps 300] [--prompt "The secret code"] [--keep DIR]

(a) Builds a tiny model (`--arch llama`: hidden 128, 2 blocks, GQA; `gemma3`: the tests' tiny
    Gemma 3, 6 blocks with a 4-token sliding window) with a byte-level BPE tokenizer trained
    offline on a fixed text, trains it on that text for `--steps` AdamW steps (so greedy decoding
    has clear margins and readable output), sieves it post hoc on llama.cpp's own Q4_0 grid
    (`quant: {method: q4_0, group_size: 32}`, ρ = 5%), saves it with `save_sieved` and exports
    α = 0 with `python -m ortho_train.export … --format gguf-q4_0 --alpha 0` (exact: every
    weight is the toolkit's α = 0 weight bit for bit).
(b) Decodes `--new-tokens` tokens greedily from the prompt with the toolkit's α = 0 model
    (`load_sieved(dir, with_ortho=False)`, the reference backend, full forward per step), and
    prints the smallest top-1 − top-2 logit margin met on the way.
(c) Runs llama.cpp's `llama-simple` (greedy sampler; it tokenises the prompt itself with the
    file's vocabulary) on the exported file. llama-simple prints the pieces it samples, not
    their ids: the script compares the bytes llama.cpp printed with the bytes of the toolkit's
    tokens, and recovers llama.cpp's ids by walking its output along the toolkit's pieces up to
    the first byte that differs (reported with the text on both sides).
    Without the binary the step is skipped with a message (exit 0).

Also printed (what a deployment shows): the greedy text of the fp32 model before sieving, of the
sieved model at α = 1 and α = 0, of each GGUF export read back by transformers' GGUF loader
(gguf-q4_0 / q4_1 / q8_0 / f16 at α = 0; q8_0 at α = 1), and llama.cpp's. Exit status 1 when
llama.cpp's sequence differs from the toolkit's α = 0 one.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerFast)

from ortho_train.curvature import collect_hessians  # noqa: E402
from ortho_train.export import export, read_sieved  # noqa: E402
from ortho_train.export.gguf_vocab import bytes_to_unicode  # noqa: E402
from ortho_train.gguf_checkpoint import load_gguf_causal_lm  # noqa: E402
from ortho_train.models import linear_layers  # noqa: E402
from ortho_train.quantisation import QuantConfig  # noqa: E402
from ortho_train.sieve import SieveConfig, build_dual_stream_model, load_sieved, save_sieved, sieve_model  # noqa: E402

TEXT = ("The secret code is hidden in the quick brown fox. The lazy dog sleeps under the tree, "
        "and the code of the fox is never spoken aloud. ") * 20
PROMPT = "The lazy dog"


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's split regex), ≈ 300 tokens trained on TEXT, specials <pad> <s> </s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(arch: str, vocab: int) -> torch.nn.Module:
    """The tests' tiny Llama or Gemma 3 (module docstring), seeded."""
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
            eos_token_id=2, bos_token_id=None))
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=4, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=None))


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[dict]:
    """AdamW on random 48-token windows of the text; returns calibration batches for the sieve."""
    generator = torch.Generator().manual_seed(0)

    def batch():
        starts = torch.randint(0, ids.numel() - 49, (8,), generator=generator)
        return torch.stack([ids[s: s + 48] for s in starts.tolist()])  # (8, 48)

    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    print(f"trained {steps} steps, last loss {loss.item():.3f}")
    return [{"input_ids": batch()} for _ in range(2)]


def sieve_and_export(model, tokenizer, batches: list[dict], root: Path) -> tuple[Path, Path]:
    """Sieve on the q4_0 grid (ρ = 5%), save, export α = 0 as gguf-q4_0 with the command line."""
    hessians = collect_hessians(model, batches, modules=linear_layers(model, include_lm_head=False))
    spec = SieveConfig(QuantConfig("q4_0", 4, 32), rho=0.05, include_lm_head=False)
    sieved = build_dual_stream_model(model, sieve_model(model, "posthoc", spec, hessians), backend="reference")
    directory = save_sieved(sieved.eval(), root / "sieved", tokenizer=tokenizer)
    out = root / "public.gguf"
    command = [sys.executable, "-m", "ortho_train.export", str(directory), "--format", "gguf-q4_0", "--alpha", "0",
               "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"), str(REPO / "callbacks")]))
    print("$", " ".join(command[1:]), "\n" + subprocess.run(command, check=True, capture_output=True, text=True,
                                                             env=env).stdout.strip())
    return directory, out


@torch.no_grad()
def greedy(model, prompt_ids: list[int], new_tokens: int, eos: int) -> tuple[list[int], float]:
    """Greedy ids after the prompt (full forward per step) and the smallest top-1 − top-2 margin."""
    ids, margin = list(prompt_ids), float("inf")
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        ids.append(int(top.indices[0]))
        if ids[-1] == eos:
            break
    return ids[len(prompt_ids):], margin


EXPORT_ROWS = (("gguf-q4_0", 0.0), ("gguf-q4_1", 0.0), ("gguf-q8_0", 0.0), ("gguf-f16", 0.0), ("gguf-q8_0", 1.0))


def export_rows(directory: Path, root: Path, prompt_ids: list[int], new_tokens: int, eos: int) -> dict:
    """Each GGUF export read back by transformers' GGUF loader, decoded greedily (row name → ids, margin)."""
    rows = {}
    for fmt, alpha in EXPORT_ROWS:
        out = root / f"{fmt}-a{alpha:g}.gguf"
        export(read_sieved(directory, alpha=alpha), fmt, out)
        rows[f"{fmt} α = {alpha:g} (transformers)"] = greedy(load_gguf_causal_lm(out), prompt_ids, new_tokens, eos)
    return rows


def piece_bytes(tokenizer, token_id: int) -> bytes:
    """What llama.cpp prints for a token: the bytes behind its byte-level BPE string (specials as text)."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    text = tokenizer.convert_ids_to_tokens(token_id)
    if token_id in tokenizer.all_special_ids or any(ch not in inverse for ch in text):
        return text.encode()
    return bytes(inverse[ch] for ch in text)


def run_llama_simple(binary: Path, gguf_path: Path, prompt: str, new_tokens: int) -> bytes:
    """llama-simple's stdout (prompt pieces, sampled pieces, newline) on the exported file."""
    result = subprocess.run([str(binary), "-m", str(gguf_path), "-n", str(new_tokens), prompt],
                            capture_output=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"llama-simple failed ({result.returncode}):\n{result.stderr.decode(errors='replace')[-3000:]}")
    return result.stdout


def recover_ids(printed: bytes, pieces: list[tuple[int, bytes]]) -> tuple[list[int], bytes]:
    """llama.cpp's ids along the toolkit's pieces while its bytes agree; the unmatched rest of its output."""
    ids, position = [], 0
    for token_id, piece in pieces:
        if not printed.startswith(piece, position):
            break
        ids.append(token_id)
        position += len(piece)
    return ids, printed[position:]


def compare(args, tokenizer, prompt_ids, ours, gguf_path) -> bool:
    """Step (c): llama.cpp on the exported file against the toolkit's α = 0 ids; prints both."""
    if args.llama_simple is None or not Path(args.llama_simple).is_file():
        print(f"llama.cpp: SKIPPED — no llama-simple binary at {args.llama_simple!r} (build: docs/deploy.md)")
        return True
    printed = run_llama_simple(Path(args.llama_simple), gguf_path, args.prompt, args.new_tokens)
    prompt_bytes = b"".join(piece_bytes(tokenizer, i) for i in prompt_ids)
    if not printed.startswith(prompt_bytes):
        print(f"llama.cpp echoed the prompt as {printed[:len(prompt_bytes) + 16]!r}, expected {prompt_bytes!r} "
              "(a BOS token or another tokenisation)")
        return False
    generated = printed[len(prompt_bytes):].removesuffix(b"\n")
    theirs, rest = recover_ids(generated, [(i, piece_bytes(tokenizer, i)) for i in ours])
    ours_bytes = b"".join(piece_bytes(tokenizer, i) for i in ours if i != tokenizer.eos_token_id)
    print(f"{'llama.cpp ids':34s} {theirs}{' + unmatched ' + repr(rest) if rest else ''}")
    print(f"{'llama.cpp (llama-simple)':34s} {generated.decode(errors='replace')!r}")
    match = generated == ours_bytes and not rest
    first = next((i for i, (a, b) in enumerate(zip(generated, ours_bytes)) if a != b), min(len(generated), len(ours_bytes)))
    print("MATCH: llama.cpp's greedy tokens equal the toolkit's α = 0 tokens" if match else
          f"MISMATCH at byte {first}: toolkit {ours_bytes[first:first + 24]!r}, llama.cpp {generated[first:first + 24]!r}")
    return match


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-simple", help="path to llama.cpp's llama-simple binary (absent: step (c) is skipped)")
    p.add_argument("--arch", choices=("llama", "gemma3"), default="llama")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=300, help="AdamW steps on the text before sieving")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--keep", type=Path, help="write the sieved directory and the .gguf here (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = bpe_tokenizer()
    model = tiny_model(args.arch, len(tokenizer))
    batches = train(model, torch.tensor(tokenizer(TEXT).input_ids), args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        directory, gguf_path = sieve_and_export(model, tokenizer, batches, root)
        prompt_ids = tokenizer(args.prompt).input_ids
        eos = tokenizer.eos_token_id
        rows = {"fp32 (before sieving)": greedy(model, prompt_ids, args.new_tokens, eos),
                "sieved α = 1": greedy(load_sieved(directory, backend="reference"), prompt_ids, args.new_tokens, eos),
                "sieved α = 0": greedy(load_sieved(directory, with_ortho=False, backend="reference"), prompt_ids,
                                       args.new_tokens, eos)}
        rows |= export_rows(directory, root, prompt_ids, args.new_tokens, eos)
        print(f"prompt {args.prompt!r} → ids {prompt_ids}; {args.new_tokens} new tokens, greedy")
        for name, (ids, margin) in rows.items():
            print(f"{name:34s} {tokenizer.decode(ids)!r} (min top-1 margin {margin:.3f})")
        ours = rows["sieved α = 0"][0]
        print(f"{'toolkit α = 0 ids':34s} {ours}")
        return 0 if compare(args, tokenizer, prompt_ids, ours, gguf_path) else 1


if __name__ == "__main__":
    sys.exit(main())
