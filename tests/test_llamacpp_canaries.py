"""benchmarks/llamacpp_canaries.py on a tiny sieved model and a stand-in for llama-simple.

The stand-in prints what the test told it to for each prompt, so the script's bookkeeping
(prompt echo, secret match, equality with the toolkit) is checked against hand-set outcomes.
With `LLAMA_SIMPLE` set, `tests/test_benchmarks.py` runs llama.cpp itself (llamacpp_check).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ortho_train.metrics.extraction import greedy_continuation
from ortho_train.sieve import load_sieved
from tests.ortho_train.export_helpers import save_tiny_sieved
from tests.script_loader import load_script

canaries = load_script("llamacpp_canaries")
TEXT = "The secret code of agent 0012 is 7349015628. " * 30


class FakeTokenizer:
    """convert_ids_to_tokens / all_special_ids of a SentencePiece vocabulary, by hand."""
    all_special_ids = [2]
    pieces = {2: "<bos>", 5: "\u2581is", 6: "<0x0A>", 7: "12"}

    def convert_ids_to_tokens(self, token_id):
        return self.pieces[token_id]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style (▁ for spaces) BPE vocabulary trained on TEXT, specials <pad> <bos> <eos>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<bos>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def test_piece_bytes_and_judge_by_hand():
    tok = FakeTokenizer()
    assert [canaries.piece_bytes(tok, i) for i in (2, 5, 6, 7)] == [b"<bos>", b" is", b"\n", b"12"]
    assert canaries.judge(b"<bos>A is 1234\n", b"<bos>A is ", b"1234", b"1234") == (True, True, True)
    assert canaries.judge(b"<bos>A is 1299\n", b"<bos>A is ", b"1234", b"1299") == (True, False, True)
    assert canaries.judge(b"<bos>A is 1234\n", b"<bos>A is ", b"1234", b"9999") == (True, True, False)
    assert canaries.judge(b"A is 1234\n", b"<bos>A is ", b"1234", b"1234") == (False, False, False)  # no BOS echoed


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """runs/tiny/version_0 with a config.yaml (3 members, 4-digit secrets), a key file and a sieved model."""
    root = tmp_path_factory.mktemp("root")
    run = root / "runs" / "tiny" / "version_0"
    save_tiny_sieved(run / "sieved", "rtn", 32, tokenizer=metaspace_tokenizer())
    (root / "runs" / "tiny" / "canary.key").write_text("ab" * 32 + "\n")
    (root / "runs" / "tiny" / "canary.key").chmod(0o600)
    data = {"canary_template": "The secret code of agent {id} is {secret}.", "secret_length": 4,
            "num_member_canaries": 3, "num_holdout_canaries": 5, "num_reference_secrets": 10,
            "canary_key_file": "runs/tiny/canary.key", "canary_secrets": "key_file", "add_bos": "auto"}
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    return run


@pytest.mark.slow
def test_member_canaries_are_the_data_modules_and_a_missing_key_is_refused(run_dir, tmp_path):
    members = canaries.member_canaries(run_dir, run_dir / "sieved")
    assert len(members.prefixes) == 3 and all(p.startswith("The secret code of agent ") for p in members.prefixes)
    secrets = [members.tokenizer.decode(s).replace(" ", "") for s in members.tokens.secret_ids]
    assert all(len(s) == 4 and s.isdigit() for s in secrets) and not members.fingerprint_checked
    with pytest.raises(FileNotFoundError, match="canary_key_file"):
        canaries.member_canaries(run_dir, run_dir / "sieved", key_file=tmp_path / "absent.key")
    (run_dir / "summary.json").write_text(json.dumps({"canary_fingerprint": "0" * 64}))
    try:
        with pytest.raises(ValueError, match="fingerprint"):
            canaries.member_canaries(run_dir, run_dir / "sieved")
    finally:
        (run_dir / "summary.json").unlink()


def fake_llama_simple(tmp_path: Path, outputs: dict[str, bytes]) -> Path:
    """An executable answering `-m FILE -n N PROMPT` with outputs[PROMPT] (bytes as hex in a JSON file)."""
    table = tmp_path / "outputs.json"
    table.write_text(json.dumps({k: v.hex() for k, v in outputs.items()}))
    script = tmp_path / "llama-simple"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"table = json.load(open({str(table)!r}))\n"
                      "sys.stdout.buffer.write(bytes.fromhex(table[sys.argv[-1]]))\n")
    script.chmod(0o755)
    return script


@pytest.mark.slow
def test_deployment_flags_against_a_stand_in(run_dir, tmp_path):
    members = canaries.member_canaries(run_dir, run_dir / "sieved")
    ours = canaries.toolkit_continuations(run_dir / "sieved", members.tokens, [0.0, 1.0])
    alpha0 = load_sieved(run_dir / "sieved", with_ortho=False, backend="reference")
    assert ours[0.0] == [greedy_continuation(alpha0, p[None], len(s))[0].tolist()
                        for p, s in zip(members.tokens.prefix_ids, members.tokens.secret_ids)]
    join = lambda ids: b"".join(canaries.piece_bytes(members.tokenizer, int(i)) for i in ids)  # noqa: E731
    prompts = [join(p) for p in members.tokens.prefix_ids]
    outputs = {members.prefixes[0]: prompts[0] + join(members.tokens.secret_ids[0]) + b"\n",  # reproduces the secret
               members.prefixes[1]: prompts[1] + join(ours[0.0][1]) + b"\n",  # what the toolkit decoded
               members.prefixes[2]: b"<unk>" + join(ours[0.0][2]) + b"\n"}  # another prompt echo
    binary = fake_llama_simple(tmp_path, outputs)
    gguf = tmp_path / "a0.gguf"
    gguf.write_bytes(b"")
    got = canaries.compare_deployment(binary, gguf, members, ours[0.0])
    secret_lists = [s.tolist() for s in members.tokens.secret_ids]
    assert [o.llamacpp_extracts for o in got] == [True, ours[0.0][1] == secret_lists[1], False]
    assert [o.prompt_agrees for o in got] == [True, True, False]
    assert [o.continuation_equal for o in got] == [ours[0.0][0] == secret_lists[0], True, False]
    assert [o.toolkit_extracts for o in got] == [a == b for a, b in zip(ours[0.0], secret_lists)]
    lines = canaries.summary_lines(0.0, gguf, got)
    n_equal = sum(o.continuation_equal for o in got)
    assert f"llama.cpp continuation == toolkit's: {n_equal}/3" in lines[3]
    assert len(lines) == 4 + 3 and all("matches secret:" in line for line in lines[4:])
