"""The benchmark command line on fixture data and tiny byte-level models: MUSE's metrics against
direct computations, the JSON + markdown results, and its refusals (exit 2 naming path or option)."""
import json

import pytest
import torch

from ortho_train.benchmarks_data.muse import KnowMemItem, load_texts
from ortho_train.measurement.benchmarks import muse_eval
from ortho_train.measurement.benchmarks.cli import main
from ortho_train.measurement.benchmarks.config import MuseEvalConfig
from ortho_train.measurement.benchmarks.text_io import cut_at_stop, encode_prompt, greedy_answers
from ortho_train.metrics.muse import privleak
from ortho_train.metrics.rouge import text_rouge_l
from ortho_train.models import load_causal_lm
from ortho_train.settings import SettingError
from ortho_train.tokenization import load_tokenizer
from tests.ortho_train.benchmark_fixtures import tiny_byte_model, write_muse, write_tofu
from tests.ortho_train.metric_helpers import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_byte_model(root / "unlearned", seed=0), tiny_byte_model(root / "retain", seed=1)


def test_knowmem_prompt_and_stop_strings():
    prompt = muse_eval.knowmem_prompt("Who?", [KnowMemItem("Q1", "A1")])
    assert prompt == "Question: Q1\nAnswer: A1\n\nQuestion: Who?\nAnswer: "
    assert cut_at_stop("Smith\n\nQuestion: next", muse_eval.KNOWMEM_STOPS) == "Smith"
    assert cut_at_stop("Smith\nQuestion", muse_eval.KNOWMEM_STOPS) == "Smith"


def test_mink_scores_and_privleak_auc_orientation(models, tmp_path):
    model, tokenizer = load_causal_lm(models[0]).eval(), load_tokenizer(models[0])
    texts = load_texts("privleak", "forget", "news", write_muse(tmp_path))
    cfg = MuseEvalConfig(mink=0.4, batch_size=2)
    got = muse_eval.mink_scores(model, tokenizer, texts, cfg)
    for i, text in enumerate(texts):  # Min-40% by hand: the lowest ⌊0.4·n⌋ next-token log-probs
        ids = encode_prompt(tokenizer, text)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].double(), -1)  # (T, V)
        token_logp = sorted(float(logp[t - 1, ids[t]]) for t in range(1, ids.numel()))
        k = int(0.4 * len(token_logp))
        assert got[i].item() == pytest.approx(sum(token_logp[:k]) / k, abs=1e-5)
    # MUSE orientation: holdout is the positive class
    assert muse_eval.muse_privleak_auc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert muse_eval.muse_privleak_auc([2.0, 3.0], [0.0, 1.0]) == 0.0


def test_muse_cli_writes_json_and_table(models, tmp_path):
    data = write_muse(tmp_path / "muse")
    out = tmp_path / "out"
    rc = main(["--benchmark", "muse", "--data", str(data), "--model", str(models[0]), "--retain-model",
               str(models[1]), "--out", str(out), "--batch-size", "2", "--threads", "1"])
    assert rc == 0
    record = json.loads((out / "muse_news.json").read_text())
    unlearned, retain = record["results"]["model"], record["results"]["retain_model"]
    assert unlearned["privleak"] == pytest.approx(privleak(unlearned["privleak_auc"], retain["privleak_auc"]))
    # VerbMem by hand: the greedy continuation of each prompt against its ground truth, word ROUGE-L F1
    model, tokenizer = load_causal_lm(models[0]).eval(), load_tokenizer(models[0])
    outs = greedy_answers(model, tokenizer, [f"The match on day {i} ended" for i in range(3)], 128)
    want = sum(text_rouge_l(o, f" with a draw at {i} all.").f1 for i, o in enumerate(outs)) / 3
    assert unlearned["verbmem_f"] == pytest.approx(want)
    table = (out / "muse_news.md").read_text()
    assert "PrivLeak %" in table and str(models[0]) in table and "negative = under-unlearning" in table
    assert not list(out.glob("*.tmp*")), "atomic writes leave no temporary files"


def test_tofu_cli_writes_json_and_table(models, tmp_path):
    data = write_tofu(tmp_path / "tofu", rows=3)
    out = tmp_path / "out"
    rc = main(["--benchmark", "tofu", "--data", str(data), "--model", str(models[0]), "--retain-model",
               str(models[1]), "--out", str(out), "--max-new-tokens", "4", "--threads", "1",
               "--rouge-stemmer", "porter"])
    assert rc == 0
    record = json.loads((out / "tofu_forget10.json").read_text())
    assert record["config"]["rouge_stemmer"] == "porter"
    result = record["results"]["model"]
    assert 0 <= result["forget_quality"] <= 1 and len(result["forget_truth_ratios"]) == 3
    assert set(result["sets"]) == {"forget", "retain", "real_authors", "world_facts"}
    assert "| model | forget quality | model utility |" in (out / "tofu_forget10.md").read_text()


def test_cli_refusals_name_the_path_or_option(models, tmp_path, capsys):
    data = write_tofu(tmp_path / "tofu")
    (data / "world_facts_perturbed.json").unlink()
    base = ["--model", str(models[0]), "--out", str(tmp_path / "out")]
    assert main(["--benchmark", "tofu", "--data", str(data), *base]) == 2
    assert "world_facts_perturbed.json: no such file" in capsys.readouterr().err
    assert main(["--benchmark", "tofu", "--data", str(tmp_path / "nowhere"), *base]) == 2
    assert "--data=" in capsys.readouterr().err
    assert main(["--benchmark", "muse", "--data", str(data), "--metrics", "verbmem", *base]) == 2
    assert "--metrics='verbmem'" in capsys.readouterr().err
    write_tofu(data)
    assert main(["--benchmark", "tofu", "--data", str(data), "--model", str(tmp_path / "no_model"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "--model=" in capsys.readouterr().err
    assert main(["--benchmark", "tofu", "--data", str(data), "--threads", "0", *base]) == 2
    assert "--threads=0" in capsys.readouterr().err
    assert main(["--benchmark", "tofu", "--data", str(data), "--rouge-stemmer", "snowball", *base]) == 2
    assert "--rouge-stemmer='snowball'" in capsys.readouterr().err
    with pytest.raises(SettingError, match="--mink"):
        MuseEvalConfig(mink=0.0)
