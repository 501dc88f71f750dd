"""Bad input is refused at start-up, with a message naming the setting or file to change."""
import json

import pytest
import torch
from transformers import ViTConfig

from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_train.corpus import CorpusError, load_corpus
from ortho_train.datamodule import CanaryDataModule
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, load_causal_lm
from ortho_train.sft_module import CanarySFTModule
from ortho_train.tokenization import build_byte_tokenizer, load_tokenizer

SMALL = dict(seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
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
