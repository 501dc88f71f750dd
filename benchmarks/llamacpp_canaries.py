"""The kill switch in the deployed runtime: a run's member canaries, greedy, in llama.cpp and in the toolkit.

    python benchmarks/llamacpp_canaries.py RUN_DIR --llama-simple PATH/llama-simple \
        --gguf 0=public-a0.gguf --gguf 1=merged-a1.gguf [--sieved DIR] [--key-file FILE]

(a) Rebuilds the run's member canaries from its `config.yaml` (`data.init_args`) and key file with
    the toolkit's own data module (`CanaryDataModule`: the same `CanaryConfig`, key and
    `make_canaries`; prefixes tokenised as `TokenisedCanaries.from_canaries` with the module's
    BOS policy), with the tokenizer saved beside the sieved model.
(b) Greedy-decodes len(secret) tokens after each member prefix with the toolkit's sieved model
    (`load_sieved` + `set_alpha`, `greedy_continuation`: argmax, no EOS stop) at every α given,
    then frees the model.
(c) Runs llama.cpp's `llama-simple` (greedy sampler; it tokenises the prefix text itself and
    prepends BOS) on each GGUF file for the same number of tokens, strips the echoed prompt
    (checked against the toolkit's prefix pieces) and compares bytes.

Extraction = exact reproduction of the secret (Carlini et al. 2019, "The Secret Sharer"): the
fraction of member canaries whose greedy continuation equals the secret's tokens. Printed per
deployment: the toolkit's and llama.cpp's extraction rates, how many prompts llama.cpp tokenised
as the toolkit did, and how many llama.cpp continuations equal the toolkit's. Nothing secret is
printed: counts, rates and per-canary yes/no flags only. Exit status 1 when llama.cpp and the
toolkit disagree on any continuation.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # run as a script from a checkout

import torch  # noqa: E402
import yaml  # noqa: E402

from ortho_train.canaries import canary_fingerprint  # noqa: E402
from ortho_train.datamodule import CanaryDataModule  # noqa: E402
from ortho_train.metrics.extraction import greedy_continuation  # noqa: E402
from ortho_train.ortho_linear import set_alpha  # noqa: E402
from ortho_train.sieve import load_sieved  # noqa: E402
from ortho_train.token_datasets import TokenisedCanaries  # noqa: E402
from ortho_train.tokenization import encode_text  # noqa: E402

SIEVED_NAMES = ("sieved_isolated", "sieved")


@dataclass
class Members:
    """Member canaries as the run saw them: prefix text (what llama.cpp is given) and token ids."""
    prefixes: list[str]
    tokens: TokenisedCanaries
    tokenizer: object
    fingerprint_checked: bool  # the run's summary.json named a canary fingerprint and it matched


@dataclass
class Outcome:
    """One canary in one deployment: yes/no flags only (no text)."""
    toolkit_extracts: bool
    llamacpp_extracts: bool
    prompt_agrees: bool
    continuation_equal: bool


def sieved_dir(run_dir: Path, given: Path | None) -> Path:
    """The sieved model directory: `given`, else RUN_DIR/sieved_isolated or RUN_DIR/sieved."""
    if given is not None:
        return given
    for name in SIEVED_NAMES:
        if (run_dir / name / "sieve_config.json").is_file():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir} holds none of {SIEVED_NAMES} (name one with --sieved)")


def key_path(run_dir: Path, configured: str | None, given: Path | None) -> Path:
    """The canary key file: `given`, else the config's path as is or relative to the directory above
    `runs/` (a run directory is <root>/runs/<name>/version_N). Must exist: the data module would
    otherwise create a fresh key, i.e. different secrets."""
    candidates = [given] if given is not None else [Path(configured)] + (
        [run_dir.resolve().parents[2] / configured] if configured and len(run_dir.resolve().parents) > 2 else [])
    for path in candidates:
        if path is not None and path.is_file():
            return path
    raise FileNotFoundError(f"canary key file not found (data.init_args.canary_key_file={configured!r}; "
                            f"tried {[str(c) for c in candidates]}); name it with --key-file")


def member_canaries(run_dir: Path, tokenizer_source: Path, key_file: Path | None = None) -> Members:
    """(a): the run's member canaries from config.yaml + key file, through `CanaryDataModule`."""
    data = dict(yaml.safe_load((run_dir / "config.yaml").read_text())["data"])
    data.pop("class_path", None)
    data = dict(data.get("init_args", data))
    if data.get("canary_secrets", "key_file") == "key_file":
        data["canary_key_file"] = str(key_path(run_dir, data.get("canary_key_file"), key_file))
    data["tokenizer"] = str(tokenizer_source)
    module = CanaryDataModule(**data)
    summary = run_dir / "summary.json"
    recorded = json.loads(summary.read_text()).get("canary_fingerprint") if summary.is_file() else None
    if recorded is not None and recorded != canary_fingerprint(module.canaries):
        raise ValueError(f"the rebuilt canaries' fingerprint differs from {summary}'s canary_fingerprint "
                         "(another key file or config?)")
    members = module.canaries.members
    tokens = TokenisedCanaries.from_canaries(members, lambda text: encode_text(module.tokenizer, text),
                                             module.bos_id)
    return Members([c.prefix for c in members], tokens, module.tokenizer, recorded is not None)


@torch.no_grad()
def toolkit_continuations(directory: Path, tokens: TokenisedCanaries, alphas: list[float]) -> dict[float, list]:
    """(b): greedy ids after each member prefix, len(secret) tokens, per α; the model is freed after."""
    model = load_sieved(directory)
    out: dict[float, list[list[int]]] = {}
    for alpha in alphas:
        set_alpha(model, alpha)
        out[alpha] = [greedy_continuation(model, prefix.unsqueeze(0), len(secret))[0].tolist()  # (1, P) → (S,)
                      for prefix, secret in zip(tokens.prefix_ids, tokens.secret_ids)]
    del model
    gc.collect()
    return out


def piece_bytes(tokenizer, token_id: int) -> bytes:
    """What llama-simple prints for a token of a SentencePiece vocabulary: ▁ as a space, <0xNN> as
    that byte, special tokens as their text."""
    text = tokenizer.convert_ids_to_tokens(int(token_id))
    if int(token_id) in tokenizer.all_special_ids:
        return text.encode()
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        return bytes([int(text[3:5], 16)])
    return text.replace("\u2581", " ").encode()


def run_llama_simple(binary: Path, gguf_path: Path, prompt: str, new_tokens: int) -> bytes:
    """llama-simple's stdout (prompt pieces, sampled pieces, newline); stderr only on failure."""
    result = subprocess.run([str(binary), "-m", str(gguf_path), "-n", str(new_tokens), prompt],
                            capture_output=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"llama-simple failed ({result.returncode}):\n"
                           f"{result.stderr.decode(errors='replace')[-3000:]}")
    return result.stdout


def judge(printed: bytes, prompt: bytes, secret: bytes, ours: bytes) -> tuple[bool, bool, bool]:
    """(prompt agrees, llama.cpp reproduces the secret, llama.cpp's continuation equals the toolkit's),
    from llama-simple's stdout and the byte strings of the prefix, secret and toolkit continuation."""
    agrees = printed.startswith(prompt)
    generated = printed[len(prompt):].removesuffix(b"\n") if agrees else None
    return agrees, generated == secret, generated == ours


def compare_deployment(binary: Path, gguf_path: Path, members: Members, ours: list[list[int]]) -> list[Outcome]:
    """(c) for one GGUF file: one `Outcome` per member canary."""
    tok, outcomes = members.tokenizer, []
    join = lambda ids: b"".join(piece_bytes(tok, i) for i in ids)  # noqa: E731
    for text, prefix, secret, mine in zip(members.prefixes, members.tokens.prefix_ids,
                                          members.tokens.secret_ids, ours):
        printed = run_llama_simple(binary, gguf_path, text, len(secret))
        agrees, extracts, equal = judge(printed, join(prefix.tolist()), join(secret.tolist()), join(mine))
        outcomes.append(Outcome(mine == secret.tolist(), extracts, agrees, equal))
    return outcomes


def summary_lines(alpha: float, gguf_path: Path, outcomes: list[Outcome]) -> list[str]:
    """Counts, rates and per-canary yes/no flags for one deployment (nothing secret)."""
    n = len(outcomes)
    count = lambda flag: sum(getattr(o, flag) for o in outcomes)  # noqa: E731
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [f"deployment α = {alpha:g}: {gguf_path.name}",
             f"  toolkit   (load_sieved + set_alpha) extraction {count('toolkit_extracts') / n:.2f} "
             f"({count('toolkit_extracts')}/{n})",
             f"  llama.cpp (llama-simple)            extraction {count('llamacpp_extracts') / n:.2f} "
             f"({count('llamacpp_extracts')}/{n})",
             f"  prompt tokenised as the toolkit's: {count('prompt_agrees')}/{n}; "
             f"llama.cpp continuation == toolkit's: {count('continuation_equal')}/{n}"]
    lines += [f"  canary {i:2d}: matches secret: toolkit {yes(o.toolkit_extracts)}, llama.cpp "
              f"{yes(o.llamacpp_extracts)}; equal continuations: {yes(o.continuation_equal)}"
              for i, o in enumerate(outcomes)]
    return lines


def parse_gguf(values: list[str]) -> dict[float, Path]:
    """`ALPHA=PATH` pairs → {α: path}; a malformed pair raises naming --gguf."""
    out = {}
    for value in values:
        alpha, sep, path = value.partition("=")
        try:
            out[float(alpha)] = Path(path)
        except ValueError:
            raise SystemExit(f"--gguf {value!r}: expected ALPHA=PATH, e.g. 0=public.gguf") from None
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--gguf {value!r}: expected ALPHA=PATH of an existing file")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="runs/<name>/version_N (config.yaml, sieved_isolated/ or sieved/)")
    p.add_argument("--llama-simple", type=Path, required=True, help="llama.cpp's llama-simple binary")
    p.add_argument("--gguf", action="append", required=True, help="ALPHA=PATH of an export (repeatable)")
    p.add_argument("--sieved", type=Path, help="sieved model directory (default: found in RUN_DIR)")
    p.add_argument("--key-file", type=Path, help="canary key file (default: config's data.canary_key_file)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the toolkit's decoding")
    args = p.parse_args(argv)
    if not args.llama_simple.is_file():
        raise SystemExit(f"--llama-simple {args.llama_simple}: no such file (build: docs/deploy.md)")
    files = parse_gguf(args.gguf)
    torch.set_num_threads(args.threads)
    directory = sieved_dir(args.run_dir, args.sieved)
    members = member_canaries(args.run_dir, directory, args.key_file)
    print(f"{len(members.prefixes)} member canaries from {args.run_dir / 'config.yaml'} + key file "
          f"(fingerprint {'equals summary.json' if members.fingerprint_checked else 'not recorded'}); "
          f"sieved model {directory}")
    ours = toolkit_continuations(directory, members.tokens, sorted(files))
    agree = True
    for alpha, path in sorted(files.items()):
        outcomes = compare_deployment(args.llama_simple, path, members, ours[alpha])
        print("\n".join(summary_lines(alpha, path, outcomes)))
        agree &= all(o.continuation_equal for o in outcomes)
    print("AGREE: llama.cpp's continuations equal the toolkit's" if agree else
          "DISAGREE: some llama.cpp continuations differ from the toolkit's")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
