"""The relearning attack (`ortho_train.measurement.relearning`) on a crafted tiny case.

Token ids, not text: canary i is `[1, 5+i, 3, 4] + secret + [2]` and every forget canary carries
the *same* secret `[20, 21, 22, 23]` (secrets that share structure, the extreme case), so
fine-tuning on some of them teaches the others' secret by construction; the public windows hold
only ids 3–15, so public relearning never sees a secret token. The model is a random tiny Llama
that has never seen either: at step 0 nothing extracts.
"""
import copy
import math

import pytest
import torch

from ortho_train.measurement.relearning import (ROW_KEYS, RelearningConfig, RelearningTable, canary_batches,
                                                secret_nll, split_forget, to_markdown, window_batches)
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.quantisation import PTQConfig
from ortho_train.settings import SettingError
from ortho_train.token_datasets import TokenisedCanaries
from tests.ortho_train.unlearn_helpers import single_thread  # noqa: F401

PAD, VOCAB, SECRET = 0, 32, [20, 21, 22, 23]


def crafted_canaries(count: int = 6) -> TokenisedCanaries:
    prefixes = [torch.tensor([1, 5 + i, 3, 4]) for i in range(count)]
    secrets = [torch.tensor(SECRET) for _ in range(count)]
    full = [torch.cat([p, s, torch.tensor([2])]) for p, s in zip(prefixes, secrets)]
    return TokenisedCanaries(prefixes, secrets, full, ["–"] * count, ["–"] * count)


class Windows(torch.utils.data.Dataset):
    """Public windows of ids 3..15 only (no secret token), labels = inputs."""

    def __init__(self, count: int = 16, length: int = 12):
        self.ids = torch.randint(3, 16, (count, length), generator=torch.Generator().manual_seed(0))  # (N, T)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tiny_model(seed: int = 0):
    return build_tiny_llama(TinyLlamaConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64),
                            VOCAB, PAD, 2, seed=seed)


def test_split_is_seeded_disjoint_and_complete():
    relearn, measured = split_forget(20, 0.3, seed=5)
    assert len(relearn) == 6 and len(measured) == 14  # round(0.3 · 20)
    assert not set(relearn) & set(measured) and sorted(relearn + measured) == list(range(20))
    assert split_forget(20, 0.3, seed=5) == (relearn, measured)
    assert split_forget(20, 0.3, seed=6) != (relearn, measured)
    assert [len(p) for p in split_forget(3, 0.01, seed=0)] == [1, 2]  # at least one canary each side
    assert [len(p) for p in split_forget(3, 0.99, seed=0)] == [2, 1]
    with pytest.raises(SettingError, match="forget set has 1 canary"):
        split_forget(1, 0.5, seed=0)


def test_secret_nll_is_the_sum_over_the_secret_tokens():
    model, canaries = tiny_model().eval(), crafted_canaries(3)
    found = secret_nll(model, canaries, PAD, batch_size=2)
    for i in range(3):
        with torch.no_grad():
            logp = torch.log_softmax(model(canaries.full_ids[i][None]).logits[0].double(), dim=-1)  # (T, V)
        # the secret occupies positions 4..7; position t is predicted by the logits at t − 1
        expected = -sum(logp[t - 1, canaries.full_ids[i][t]].item() for t in range(4, 8))
        assert found[i].item() == pytest.approx(expected, rel=1e-5), i


def test_public_batches_hold_public_windows_only_and_forget_batches_the_relearn_part():
    windows = Windows()
    batch = next(window_batches(windows, 4, seed=0))
    assert batch["input_ids"].shape == (4, 12)
    assert all(any(torch.equal(row, w) for w in windows.ids) for row in batch["input_ids"])
    assert not torch.isin(batch["input_ids"], torch.tensor(SECRET)).any()
    canaries = crafted_canaries(2)
    batches = canary_batches(canaries, 8, PAD, seed=0)
    first = next(batches)
    assert first["input_ids"].shape == (2, 9)  # batch capped at the relearn part's size; every token labelled
    assert torch.equal(first["labels"], first["input_ids"])


def _table(steps, conditions=("public", "forget"), lr=1e-2, formats=("nf4",), references=True):
    config = RelearningConfig(steps=steps, lr=lr, batch_size=2, seed=0, relearn_fraction=0.5,
                              conditions=list(conditions), references=[])
    models = {"unlearned": lambda: tiny_model()} | ({"start": lambda: tiny_model(seed=1)} if references else {})
    table = RelearningTable(config, models, crafted_canaries(), Windows(), PAD, list(formats),
                            PTQConfig(blocksize=64, compute_dtype="float32"))
    return table


def test_shared_secret_comes_back_from_the_forget_part_but_not_from_public_text():
    table = _table([0, 30])
    rows = table.run()
    assert len(table.relearn_part) == 3 and len(table.measured_part) == 3
    by = {(r["model"], r["condition"], r["steps"], r["deployment"]): r for r in rows}
    for model in ("unlearned", "start"):
        for deployment in ("fp", "nf4"):
            before = by[model, "forget", 0, deployment]
            assert before["extraction"] == 0.0  # a random model does not know the secret
            same = by[model, "public", 0, deployment] | {"condition": "forget"}
            assert same == before  # step 0: one model, reported under each condition
            after_forget, after_public = by[model, "forget", 30, deployment], by[model, "public", 30, deployment]
            assert after_forget["extraction"] == 1.0  # the held-out canaries share the relearnt secret
            assert after_forget["nll_mean"] < before["nll_mean"] - 5
            assert after_public["extraction"] == 0.0  # public text never labels a secret token
            assert after_public["nll_mean"] > before["nll_mean"]  # … and only makes those tokens rarer
    numbers = ("extraction", "symbol_accuracy", "nll_mean", "train_loss")
    again = _table([0, 30], ("forget",), formats=(), references=False).run()  # seeded: the same numbers again
    first = [r for r in rows if r["model"] == "unlearned" and r["condition"] == "forget" and r["deployment"] == "fp"]
    assert [[r[k] for k in numbers] for r in first] == [[r[k] for k in numbers] for r in again]


def test_rows_are_model_condition_steps_deployment_and_the_markdown_says_so():
    table = _table([0, 2, 4], lr=1e-3)
    rows = table.run()
    assert len(rows) == 2 * 2 * 3 * 2  # models × conditions × steps × deployments
    assert all(tuple(r) == ROW_KEYS for r in rows)
    order = [(r["model"], r["condition"], r["steps"], r["deployment"]) for r in rows]
    assert order[:6] == [("unlearned", "public", s, d) for s in (0, 2, 4) for d in ("fp", "nf4")]
    assert all(r["train_loss"] is None for r in rows if r["steps"] == 0)
    assert all(math.isfinite(r["train_loss"]) and r["seconds"] >= 0 and r["peak_rss_mib"] > 0
               for r in rows if r["steps"] > 0)
    markdown = to_markdown(rows, table.notes())
    lines = markdown.splitlines()
    assert lines[0] == "| model | condition | steps | deployment | extraction (held-out forget) | mean NLL (nats) |"
    assert lines[2].startswith("| unlearned | public | 0 | fp | 0.00 |") and len(lines) >= 2 + len(rows)
    payload = table.payload({"unlearned": "u", "start": "s"}, {"nf4": {}})
    assert payload["split"] == {"forget_canaries": 6, "relearn": table.relearn_part, "measured": table.measured_part}
    assert payload["deployments"] == ["fp", "nf4"] and payload["rows"] is rows


def test_the_models_handed_in_are_not_modified():
    original = tiny_model()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    config = RelearningConfig(steps=[3], lr=1e-2, batch_size=2, conditions=["forget"], references=[])
    RelearningTable(config, {"unlearned": lambda: copy.deepcopy(original)}, crafted_canaries(), Windows(), PAD,
                    ["nf4"], PTQConfig()).run()
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize("settings, message", [
    ({"steps": [-1, 10]}, r"relearning\.steps=\[-1, 10\]: needs at least one step count"),
    ({"steps": []}, r"relearning\.steps=\[\]"),
    ({"steps": [5, 5]}, "lists a step count twice"),
    ({"relearn_fraction": 1.0}, r"relearning\.relearn_fraction=1\.0: .* must lie in \(0, 1\)"),
    ({"relearn_fraction": 0.0}, r"relearning\.relearn_fraction=0\.0"),
    ({"lr": 0.0}, r"relearning\.lr=0\.0"),
    ({"batch_size": 0}, r"relearning\.batch_size=0"),
    ({"conditions": ["private"]}, r"relearning\.conditions=\['private'\]"),
])
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(SettingError, match=message):
        RelearningConfig(**settings)
