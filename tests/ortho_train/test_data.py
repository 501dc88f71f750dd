"""Corpus loading, canaries, tokenization and CanaryDataModule, including every bad input."""
import json

import pytest
import torch

from ortho_train.canaries import CanaryError, CanaryConfig, make_canaries
from ortho_train.corpus import CorpusError, load_corpus, read_corpus_text
from ortho_train.datamodule import CanaryDataModule
from ortho_train.tokenization import build_byte_tokenizer, encode_text, load_tokenizer


def test_shakespeare_corpus_is_real_text():
    split = load_corpus("shakespeare", val_fraction=0.05)
    assert len(split.train) > 4_000_000
    assert "Hamlet" in split.train + split.val
    assert split.train[-200:] not in split.val  # contiguous, disjoint tail


def test_local_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("To be or not to be. " * 20)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(5)))
    assert "To be" in read_corpus_text(str(tmp_path / "a.txt"))
    assert "line 4" in read_corpus_text(str(tmp_path / "b.jsonl"))
    both = read_corpus_text(str(tmp_path))
    assert "To be" in both and "line 4" in both


def test_bad_local_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus_text(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(CorpusError, match="is empty"):
        read_corpus_text(str(tmp_path / "blank.txt"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="no .txt or .jsonl"):
        read_corpus_text(str(tmp_path / "nothing"))
    (tmp_path / "records.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="no field 'text'"):
        read_corpus_text(str(tmp_path / "records.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(CorpusError, match="broken.jsonl:1: not valid JSON"):
        read_corpus_text(str(tmp_path / "broken.jsonl"))


def test_unknown_hf_dataset_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match="could not load Hugging Face dataset 'no_such_dataset_xyz'.*Offline"):
        read_corpus_text("no_such_dataset_xyz")


def test_byte_encoding_fast_path_matches_tokenizer():
    tokenizer = build_byte_tokenizer()
    text = "The secret code é 0123\n"
    slow = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encode_text(tokenizer, text).tolist() == slow
    assert len(tokenizer) == 259


def test_missing_tokenizer_directory():
    with pytest.raises(FileNotFoundError, match="neither 'byte' nor an existing"):
        load_tokenizer("/nonexistent/model")


def test_canaries_disjoint_seeded_and_fixed_width():
    spec = CanaryConfig(num_members=20, num_holdout=50, secret_length=6, seed=7)
    a, b = make_canaries(spec), make_canaries(spec)
    assert [c.secret for c in a.members] == [c.secret for c in b.members]
    secrets = [c.secret for c in a.members + a.holdout]
    ids = [c.canary_id for c in a.members + a.holdout]
    assert len(set(secrets)) == len(secrets) == 70 and len(set(ids)) == 70
    assert len({len(c.prefix) for c in a.members + a.holdout}) == 1
    assert all(len(s) == 6 and s.isdigit() for s in secrets)
    assert a.randomness_space_size == 10**6
    refs = a.reference_secrets(500)
    assert len(set(refs)) == 500 and not set(refs) & set(secrets)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template": "agent {id} has no slot"}, r"\{secret\} exactly once"),
        ({"template": "{secret} belongs to {id}"}, "before"),
        ({"alphabet": "01", "secret_length": 3, "num_members": 5, "num_holdout": 4}, r"\|R\| = 2\^3 = 8"),
        ({"secret_length": 0}, "secret_length"),
    ],
)
def test_bad_canary_specs(kwargs, message):
    with pytest.raises(CanaryError, match=message):
        make_canaries(CanaryConfig(**kwargs))


def test_too_many_reference_secrets():
    canaries = make_canaries(CanaryConfig(alphabet="01", secret_length=4, num_members=2, num_holdout=2))
    with pytest.raises(CanaryError, match="reference secrets"):
        canaries.reference_secrets(13)


def _tiny_dm(**overrides):
    kwargs = dict(canary_secrets="seed", seq_len=64, batch_size=4, canary_batch_size=2, val_windows=4, secret_length=6,
                  num_member_canaries=4, num_holdout_canaries=8, num_reference_secrets=100)
    return CanaryDataModule(**(kwargs | overrides))


def test_datamodule_batches_and_probe():
    dm = _tiny_dm()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()["public"]))
    assert batch["input_ids"].shape == (4, 64)
    canary = next(iter(dm.train_dataloader()["canary"]))
    assert canary["input_ids"].shape[0] == 2 and (canary["labels"] != -100).all()
    probe = dm.probe
    assert len(probe.members) == 4 and len(probe.holdout) == 8 and len(probe.reference_secret_ids) == 100
    decoded = dm.tokenizer.decode(probe.members.full_ids[0])
    assert decoded == dm.canaries.members[0].text
    assert torch.equal(probe.members.full_ids[0][: len(probe.members.prefix_ids[0])], probe.members.prefix_ids[0])


def test_seq_len_shorter_than_canary():
    with pytest.raises(ValueError, match="shorter than a canary"):
        _tiny_dm(seq_len=20).setup("fit")


def test_canary_key_file_is_created_once_private_and_read_by_unlearning(tmp_path):
    import stat

    from ortho_train.canaries import CanaryConfig, make_canaries

    key_file = tmp_path / "runs" / "canary.key"
    small = dict(seq_len=64, secret_length=6, num_member_canaries=4, num_holdout_canaries=8,
                 num_reference_secrets=20, canary_key_file=str(key_file))
    with pytest.raises(FileNotFoundError, match=r"canary key file .* not found \(data\.canary_key_file\)"):
        CanaryDataModule(**small, train_split="unlearn")
    first = CanaryDataModule(**small)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = CanaryDataModule(**small, train_split="unlearn")  # reads the same key: the same secrets
    assert [c.secret for c in again.canaries.members] == [c.secret for c in first.canaries.members]
    assert again.canaries.reference_secrets(20) == first.canaries.reference_secrets(20)
    unkeyed = make_canaries(CanaryConfig(alphabet="0123456789", secret_length=6, num_members=4, num_holdout=8))
    assert [c.secret for c in unkeyed.members] != [c.secret for c in first.canaries.members]
