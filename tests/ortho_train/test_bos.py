"""A leading BOS token where the model was pretrained with one: every public window and every
canary starts with it, and the secret's offsets follow the longer prefix."""
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ortho_train.canaries import CanaryConfig, make_canaries
from ortho_train.datamodule import CanaryDataModule
from ortho_train.token_datasets import PublicWindows, TokenisedCanaries
from ortho_train.tokenization import build_byte_tokenizer, encode_text, leading_bos_id
from tests.ortho_train.gguf_fixtures import write_tiny_llama_gguf


def _word_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """Whitespace words over a fixed vocabulary; `adds_bos`: its encoding starts with <s>."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "The", "secret", "code"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def test_policy_follows_the_tokenizers_own_encoding():
    assert leading_bos_id(_word_tokenizer(adds_bos=True)) == 2
    assert leading_bos_id(_word_tokenizer(adds_bos=False)) is None  # has a bos token, never adds it (GPT-2-like)
    assert leading_bos_id(_word_tokenizer(adds_bos=False), "always") == 2
    assert leading_bos_id(_word_tokenizer(adds_bos=True), "never") is None
    assert leading_bos_id(build_byte_tokenizer()) is None  # the toy's byte tokenizer: unchanged
    with pytest.raises(ValueError, match="data.add_bos=always"):
        leading_bos_id(build_byte_tokenizer(), "always")


def test_windows_start_with_bos_and_continue_the_stream():
    stream = torch.arange(10, 40)
    windows = PublicWindows(stream, seq_len=8, bos_id=2).windows  # 7 text tokens per window
    assert windows.shape == (4, 8)
    assert (windows[:, 0] == 2).all()
    assert windows[:, 1:].reshape(-1).tolist() == list(range(10, 38))  # (4 * 7,) consecutive, nothing skipped
    assert PublicWindows(stream, seq_len=8).windows.reshape(-1).tolist() == list(range(10, 34))  # (3 * 8,)


def test_canary_prefix_starts_with_bos_and_the_secret_follows_it():
    canaries = make_canaries(CanaryConfig(num_members=3, num_holdout=2, secret_length=4, seed=0)).members
    tokenizer = build_byte_tokenizer()
    plain = TokenisedCanaries.from_canaries(canaries, lambda t: encode_text(tokenizer, t))
    led = TokenisedCanaries.from_canaries(canaries, lambda t: encode_text(tokenizer, t), bos_id=258)
    for i in range(len(canaries)):
        assert led.prefix_ids[i][0] == 258 and torch.equal(led.prefix_ids[i][1:], plain.prefix_ids[i])
        start = len(led.prefix_ids[i])
        assert torch.equal(led.full_ids[i][start:start + len(led.secret_ids[i])], plain.secret_ids[i])
        assert torch.equal(led.full_ids[i][1:], plain.full_ids[i])


def test_data_module_with_a_bos_tokenizer_leads_every_sequence_with_it(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = CanaryDataModule(tokenizer=str(path), canary_secrets="seed", seq_len=48, batch_size=2,
                                canary_batch_size=2, val_windows=2, secret_length=4, num_member_canaries=3,
                                num_holdout_canaries=3, num_reference_secrets=5)
    bos = data.tokenizer.bos_token_id
    assert data.bos_id == bos == 1
    probe = data.probe
    assert all(ids[0] == bos for ids in probe.members.full_ids + probe.holdout.full_ids)
    batch = next(iter(data.public_train_dataloader()))
    assert (batch["input_ids"][:, 0] == bos).all() and batch["input_ids"].shape[1] == 48
    assert all(ids[0] != bos for ids in probe.reference_secret_ids)  # secrets follow a prefix: no BOS of their own
