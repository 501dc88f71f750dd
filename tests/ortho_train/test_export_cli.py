"""`python -m ortho_train.export`: help, an end-to-end export, and one-line errors naming a bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from gguf import GGUFReader

from ortho_train.export.__main__ import main
from tests.ortho_train.export_helpers import save_tiny_sieved


@pytest.fixture(scope="module")
def sieved(tmp_path_factory):
    return save_tiny_sieved(tmp_path_factory.mktemp("sieved") / "q4_0", "q4_0", 32)


def test_help_runs_as_a_module():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(["kernels", os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "ortho_train.export", "--help"], capture_output=True, text=True,
                         check=True, env=env)
    assert "--format" in out.stdout and "gguf-q4_0" in out.stdout and "--alpha" in out.stdout


def test_export_writes_the_file_and_a_report(sieved, tmp_path, capsys):
    code = main([str(sieved), "--format", "gguf-q4_0", "--alpha", "0", "-o", str(tmp_path / "m.gguf"),
                 "--report", str(tmp_path / "report.json")])
    assert code == 0 and "0 rounded" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["max_abs_error"] == 0.0 and report["alpha"] == 0.0
    assert len(GGUFReader(tmp_path / "m.gguf").tensors) == len(report["tensors"]) == 20


def _fails(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(f in err for f in fragments), err


def test_missing_or_damaged_input_names_it(sieved, tmp_path, capsys):
    out = ["--format", "gguf-q4_0", "-o", str(tmp_path / "m.gguf")]
    _fails([str(tmp_path / "nowhere"), *out], capsys, str(tmp_path / "nowhere"), "not a directory")
    damaged = tmp_path / "damaged"
    shutil.copytree(sieved, damaged)
    blob = bytearray((damaged / "base.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (damaged / "base.safetensors").write_bytes(bytes(blob))
    _fails([str(damaged), *out], capsys, str(damaged / "base.safetensors"), "checksum")
    (damaged / "base.safetensors").unlink()
    _fails([str(damaged), *out], capsys, str(damaged / "base.safetensors"), "missing")
    (damaged / "sieve_config.json").unlink()
    _fails([str(damaged), *out], capsys, str(damaged / "sieve_config.json"), "not found")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(sieved, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    _fails([str(no_tokenizer), *out], capsys, str(no_tokenizer), "tokenizer")
    assert not (tmp_path / "m.gguf").exists()


def test_vocab_from_is_refused_for_gptq_and_a_missing_file_is_named(sieved, tmp_path, capsys):
    _fails([str(sieved), "--format", "gptq", "--vocab-from", str(tmp_path / "v.gguf"), "-o", str(tmp_path / "q")],
           capsys, "--vocab-from applies to the GGUF formats, not gptq")
    _fails([str(sieved), "--format", "gguf-q4_0", "--vocab-from", str(tmp_path / "v.gguf"), "-o",
            str(tmp_path / "m.gguf")], capsys, str(tmp_path / "v.gguf"))
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "q").exists()
