"""Bad input is refused at start-up, with a message naming the setting or file to change; a
failed `train.py` start ends with that message as its last line."""
import json
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig

from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_train.corpus import CorpusError, load_corpus
from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, load_causal_lm
from ortho_train.settings import SettingError
from ortho_train.sft_module import CanarySFTModule
from ortho_train.tokenization import build_byte_tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
             num_member_canaries=2, num_holdout_canaries=4, num_reference_secrets=20)


@pytest.mark.parametrize("setting", ["batch_size", "canary_batch_size", "seq_len", "num_reference_secrets"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_data_sizes_name_the_setting(setting, value):
    with pytest.raises(ValueError, match=rf"data\.{setting}={value}: must be ≥ 1"):
        CanaryDataModule(**(SMALL | {setting: value}))


@pytest.mark.parametrize("split, text, val_fraction", [("train", "ab" * 20, 0.5), ("val", "x" * 6000, 0.005)])
def test_corpus_split_shorter_than_a_window_names_split_and_setting(tmp_path, split, text, val_fraction):
    corpus = tmp_path / "c.txt"
    corpus.write_text(text)  # train: 20 bytes < 64; val: 30 bytes < 64
    dm = CanaryDataModule(corpus=str(corpus), val_fraction=val_fraction, **SMALL)
    with pytest.raises(CorpusError, match=rf"corpus's {split} split .* data\.seq_len="):
        dm.setup("fit")


def test_random_bytes_txt_corpus_is_refused_with_its_path(tmp_path):
    corpus = tmp_path / "noise.txt"
    corpus.write_bytes(torch.randint(128, 256, (4000,), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CorpusError, match=rf"{corpus}.*does not look like UTF-8 text"):
        load_corpus(str(corpus))


def test_non_utf8_jsonl_corpus_names_its_path(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=rf"{corpus} is not UTF-8 text"):
        load_corpus(str(corpus))


@pytest.mark.parametrize("setting", ["lr", "sft_lr"])
@pytest.mark.parametrize("value", [0.0, -0.003])
def test_non_positive_learning_rates_are_refused(setting, value):
    with pytest.raises(ValueError, match=rf"model\.init_args\.{setting}={value}: learning rates must be > 0"):
        CanarySFTModule(**{setting: value})


def test_unlearning_learning_rate_must_be_positive():
    from ortho_train.unlearn_module import UnlearnModule

    with pytest.raises(ValueError, match=r"model\.init_args\.lr=0\.0: learning rates must be > 0"):
        UnlearnModule(model_path="unused", lr=0.0)


@pytest.fixture
def saved_tiny(tmp_path):
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(TinyLlamaConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                             len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model, tokenizer


def test_truncated_safetensors_names_the_file(saved_tiny):
    path, _, _ = saved_tiny
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{weights}.*truncated, corrupt"):
        load_causal_lm(path)


def test_non_causal_model_directory_is_one_line(tmp_path):
    ViTConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal LM") as err:
        load_causal_lm(tmp_path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_model_directory_without_tokenizer_files_says_so(saved_tiny):
    path, _, _ = saved_tiny
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        load_tokenizer(path)


def test_ptq_blocksize_wider_than_a_layer_is_refused_at_setup(saved_tiny):
    _, model, _ = saved_tiny  # hidden size 16 < blocksize 64

    class Module:
        pass

    module = Module()
    module.model = model
    with pytest.raises(ValueError, match=r"blocksize=64 is larger than the width"):
        PTQGapCallback(formats=["nf4"]).setup(None, module, "fit")


# ---------------------------------------------------------------- train.py: the last line of a failed start
# `main` as `python train.py` runs it, in this process (the imports are paid once); two cases in a
# subprocess below hold the guarantee for the real console.
TINY = ["--config", str(REPO / "configs/tiny.yaml")]
PROSE = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 60  # ≈3.9k characters


def start(workdir, *args: str) -> tuple[int, str]:
    """`train.py fit <args>` in `workdir` through `main`: (exit status, last non-empty stderr line)."""
    import contextlib
    import io
    import os

    from train import main

    environ, cwd, err = dict(os.environ), os.getcwd(), io.StringIO()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(["fit", *args])
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return status, lines[-1] if lines else ""


def _files(workdir):
    (workdir / "bad.ckpt").write_text("not a checkpoint\n")
    (workdir / "nul.txt").write_bytes(b"\0" * 20_000)
    (workdir / "small.txt").write_text(PROSE)  # 58 train windows of 64 bytes


START_UP_CASES = {  # extra arguments after tiny.yaml → the last line, from its start
    "hidden_size=0": (["--model.init_args.tiny_llama.hidden_size=0"],
                      "model.init_args.tiny_llama.hidden_size=0: must be ≥ 1"),
    "num_layers=0": (["--model.init_args.tiny_llama.num_layers=0"],
                     "model.init_args.tiny_llama.num_layers=0: must be ≥ 1"),
    "val_exposure_references=0": (["--model.init_args.val_exposure_references=0"],
                                  "model.init_args.val_exposure_references=0: must be ≥ 1"),
    "val_exposure_references=-1": (["--model.init_args.val_exposure_references=-1"],
                                   "model.init_args.val_exposure_references=-1: must be ≥ 1"),
    "lr=0": (["--model.init_args.lr=0.0"], "model.init_args.lr=0.0: learning rates must be > 0"),
    "min_lr_ratio=-1": (["--model.init_args.min_lr_ratio=-1"],
                        "model.init_args.min_lr_ratio=-1.0: the cosine floor is a fraction of the peak rate, in [0, 1]"),
    "min_lr_ratio=2": (["--model.init_args.min_lr_ratio=2"], "model.init_args.min_lr_ratio=2.0: the cosine floor"),
    "weight_decay=-1": (["--model.init_args.weight_decay=-1"], "model.init_args.weight_decay=-1.0: must be ≥ 0"),
    "warmup_steps>public_steps": (["--model.init_args.warmup_steps=13"],
                                  "model.init_args.warmup_steps=13: longer than the public phase "
                                  "(model.init_args.public_steps=12)"),
    "betas": (["--model.init_args.betas=[1.5, 0.9]"], "model.init_args.betas=[1.5, 0.9]: AdamW needs two betas in [0, 1)"),
    "damp=-1": (["--model.init_args.isolation.quant.damp=-1"],
                "model.init_args.isolation.quant.damp=-1.0: GPTQ damping (a fraction of mean(diag H)) must be ≥ 0"),
    "target_epsilon=1e-9": (["--model.init_args.dp.target_epsilon=1e-9", "--model.init_args.dp.expected_batch_size=2"],
                            "model.init_args.dp.target_epsilon=1e-09: below 0.1"),  # δ = 1e-5
    "accumulate_grad_batches=0": (["--trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0: must be ≥ 1"),
    "val_check_interval=0": (["--trainer.val_check_interval=0"], "trainer.val_check_interval=0: must be an int ≥ 1"),
    "sieve alphas=[]": (["--trainer.callbacks+=ortho_callbacks.sieve.SieveCallback", "--trainer.callbacks.table.alphas=[]"],
                        "trainer.callbacks: table.alphas=[]: needs at least one α"),
    "callback setting": (["--trainer.callbacks+=ortho_callbacks.sieve.SieveCallback",
                          "--trainer.callbacks.calibration_batches=0"],
                         "trainer.callbacks: calibration_batches must be ≥ 1, got 0"),
    "batch_size > data": (["--data.corpus=small.txt", "--data.batch_size=100"],
                          "data.batch_size=100: larger than the 58 windows of data.seq_len=64 tokens"),
    "NUL corpus": (["--data.corpus=nul.txt"], "data.corpus='nul.txt': 20000 of 20000 characters are control characters"),
    "ckpt_path": (["--ckpt_path=bad.ckpt"], "ckpt_path='bad.ckpt': not a checkpoint"),
    "model_path": (["--model.init_args.model_path=no/such/model"],
                   "model.init_args.model_path='no/such/model': no such directory"),
    "type error": (["--model.init_args.lr=abc"], "model.init_args.lr: Expected a <class 'float'>. Got value: abc"),
    # beyond the list, from a sweep of the same kinds
    "max_steps=-5": (["--trainer.max_steps=-5"], "trainer.max_steps=-5: must be ≥ 1"),
    "gradient_clip_val=-1": (["--trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1: must be ≥ 0"),
    "canary_secrets": (["--data.canary_secrets=maybe"], "data.canary_secrets='maybe': must be one of 'key_file', 'seed'"),
    # closed choices are Literal types: jsonargparse refuses them while parsing, in the toolkit's words
    "forget_target": (["--data.forget_target=bogus"],
                      "data.forget_target='bogus': must be one of 'secret', 'secret_suffix', 'full'"),
    "dtype": (["--model.init_args.dtype=float64"],
              "model.init_args.dtype='float64': must be one of 'float32', 'bfloat16', 'float16'"),
    "dp scope": (["--model.init_args.dp.scope=everywhere"],  # a nested config dataclass: no init_args in the name
                 "model.init_args.dp.scope='everywhere': must be one of 'support', 'global'"),
    "missing gguf": (["--model.init_args.model_path=no/model.gguf"], "model.init_args.model_path='no/model.gguf': no such"),
}


@pytest.mark.parametrize("case", START_UP_CASES)
def test_a_refused_setting_is_the_last_line_of_a_failed_start(case, tmp_path):
    args, expected = START_UP_CASES[case]
    _files(tmp_path)
    status, last = start(tmp_path, *TINY, *args)
    assert (status, last[: len("error: " + expected)]) == (2, "error: " + expected)
    assert "weights_only" not in last and "Namespace(" not in last
    assert not list(tmp_path.rglob("version_*")), "a failed start leaves no run directory"


@pytest.mark.parametrize("logger", ["default", "false"])
def test_an_unwritable_run_root_names_its_setting(tmp_path, logger):
    (tmp_path / "runs").write_text("a file where the run directories would go\n")
    args = ["--trainer.logger=false"] if logger == "false" else []
    setting = "trainer.default_root_dir" if logger == "false" else "trainer.logger.init_args.save_dir"
    status, last = start(tmp_path, *TINY, *args)
    assert status == 2 and last.startswith(f"error: {setting}: no run directory can be written under runs")


def test_a_read_only_run_root_names_its_setting(tmp_path, monkeypatch):
    import errno
    import os

    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):  # tests run as root, which chmod does not stop: a read-only mount
        if os.path.abspath(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    status, last = start(tmp_path, *TINY)
    assert status == 2
    assert last.startswith("error: trainer.logger.init_args.save_dir: no run directory can be written under "
                           "runs/tiny: Read-only file system")


def test_the_last_line_and_the_traceback_in_a_real_process(tmp_path):
    import os
    import subprocess
    import sys

    command = [sys.executable, str(REPO / "train.py"), "fit", *TINY, "--model.init_args.min_lr_ratio=-1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ORTHO_TRAIN_TRACEBACK", None)
    plain = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    last = [line for line in plain.stderr.splitlines() if line.strip()][-1]
    assert plain.returncode == 2, plain.stderr[-2000:]
    assert last.startswith("error: model.init_args.min_lr_ratio=-1.0: the cosine floor"), plain.stderr[-2000:]
    assert "Traceback" not in plain.stderr and "ORTHO_TRAIN_TRACEBACK=1" in plain.stderr
    full = subprocess.run(command, cwd=tmp_path, env=dict(env, ORTHO_TRAIN_TRACEBACK="1"), capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 1 and "Traceback (most recent call last)" in full.stderr
    assert "model.init_args.min_lr_ratio=-1.0" in full.stderr
    assert not list(tmp_path.rglob("version_*"))


# ---------------------------------------------------------------- the checks, class by class
def test_unlearning_guard_settings_are_refused_before_the_model_loads():
    from ortho_train.unlearn_module import UnlearnModule

    with pytest.raises(SettingError, match=r"^model\.init_args\.weight_decay=-1\.0: must be ≥ 0; "
                                           r"model\.init_args\.guard_windows=0: must be ≥ 1 "):
        UnlearnModule(model_path="never/loaded", guard_windows=0, weight_decay=-1.0)


def test_an_unreachable_dp_budget_is_refused_at_once():
    import time

    from ortho_train.privacy import DPConfig

    began = time.perf_counter()
    with pytest.raises(SettingError, match=r"dp\.target_epsilon=1e-09: below 0\.0286, the least ε .* δ = 0\.001"):
        DPConfig(target_epsilon=1e-9, delta=1e-3, expected_batch_size=10)
    assert time.perf_counter() - began < 15  # not opacus' search up to σ = 10⁶ (28 s here, minutes when busy)
    DPConfig(target_epsilon=0.05, delta=1e-3, expected_batch_size=10)  # above the floor: accepted


def test_sieve_table_without_alphas_is_refused_with_or_without_rhos():
    from ortho_train.measurement.kill_switch import TableConfig

    with pytest.raises(SettingError, match=r"^table\.alphas=\[\]: needs at least one α"):
        TableConfig(alphas=[])
    with pytest.raises(SettingError, match=r"^table\.rhos=\[\]: "):
        TableConfig(rhos=[])
    assert TableConfig(variants=["isolated"], rhos=[]).rhos == []  # the isolated sieve uses its training ρ


def test_a_corpus_of_nul_bytes_is_not_text(tmp_path):
    corpus = tmp_path / "nul.txt"
    corpus.write_bytes(b"\0" * 5000 + PROSE.encode())  # the prose is a share too small to train on
    with pytest.raises(CorpusError, match=rf"data\.corpus='{corpus}': 5000 of \d+ characters are control"):
        load_corpus(str(corpus))
    corpus.write_bytes(PROSE.encode() + b"\0")  # a stray NUL is kept, as a stray invalid byte is
    assert load_corpus(str(corpus)).train.startswith("The quick")


def test_a_batch_larger_than_the_train_split_names_the_setting(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(PROSE)
    dm = CanaryDataModule(corpus=str(corpus), **(SMALL | {"batch_size": 59}))
    with pytest.raises(SettingError, match=r"data\.batch_size=59: larger than the 58 windows of data\.seq_len=64"):
        dm.setup("fit")
    CanaryDataModule(corpus=str(corpus), **(SMALL | {"batch_size": 58})).setup("fit")  # exactly one batch: fine


def test_failure_line_keeps_a_toolkit_error_raised_from_a_library_one_and_names_bugs_by_type(tmp_path):
    """jsonargparse's wrappers are looked through (the CLI cases above); a toolkit error raised
    `from` a library's error is the message, not its cause."""
    from ortho_train.cli_errors import exit_status, failure_line

    corpus = tmp_path / "latin1.jsonl"
    corpus.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError) as refused:
        load_corpus(str(corpus))
    assert isinstance(refused.value.__cause__, UnicodeDecodeError)
    assert failure_line(refused.value) == str(refused.value) and exit_status(refused.value) == 2
    try:
        1 / 0
    except ZeroDivisionError as bug:
        assert failure_line(bug) == "ZeroDivisionError: division by zero" and exit_status(bug) == 1
