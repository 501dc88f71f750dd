"""TOFU and MUSE readers: offline loading from the documented layouts, errors naming the path and
field, and the hub path (with `datasets.load_dataset` replaced: no network in tests)."""
import json

import pytest

from ortho_train.benchmarks_data import muse, tofu
from ortho_train.benchmarks_data.records import BenchmarkDataError, read_records
from tests.ortho_train.benchmark_fixtures import write_muse, write_tofu


@pytest.mark.parametrize("json_lines", [True, False])
def test_tofu_eval_sets_load_offline(tmp_path, json_lines):
    sets = tofu.load_tofu_eval_sets("forget10", write_tofu(tmp_path, rows=3, json_lines=json_lines))
    assert set(sets) == {"forget", "retain", "real_authors", "world_facts"}
    first = sets["forget"][0]
    assert first.question == "Where was author 0 born?" and first.answer == "Author 0 was born in Town 0."
    assert first.reference == "Town 0 is where author 0 was born."  # paraphrased_answer
    assert first.perturbed == tuple(f"Author 0 was born in City {j}." for j in range(3))
    # Real Authors / World Facts compare the true answer itself against the perturbed ones
    assert sets["real_authors"][1].reference == sets["real_authors"][1].answer == "Writer 1"
    assert [len(v) for v in tofu.load_tofu_eval_sets("forget10", tmp_path, limit=2).values()] == [2] * 4
    assert tofu.load_tofu("retain90", tmp_path)[0] == tofu.TofuQA("Where was author 100 born?",
                                                                  "Author 100 was born in Town 100.")


def test_tofu_errors_name_the_file_row_and_field(tmp_path):
    write_tofu(tmp_path)
    with pytest.raises(BenchmarkDataError, match="forget05_perturbed.json: no such file"):
        tofu.load_tofu_eval_sets("forget05", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "retain_perturbed.json").read_text().splitlines()]
    del rows[1]["paraphrased_answer"]
    (tmp_path / "retain_perturbed.json").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(BenchmarkDataError, match=r"retain_perturbed.json: row 1 has no field 'paraphrased_answer'"):
        tofu.load_tofu_eval_sets("forget10", tmp_path)
    rows[1]["paraphrased_answer"], rows[2]["perturbed_answer"] = "p", "not a list"
    (tmp_path / "retain_perturbed.json").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(BenchmarkDataError, match="row 2 field 'perturbed_answer' should be a non-empty list"):
        tofu.load_tofu_eval_sets("forget10", tmp_path)
    with pytest.raises(BenchmarkDataError, match="no config 'forget20'"):
        tofu.load_tofu("forget20", tmp_path)
    (tmp_path / "bad.json").write_text('{"question": "q"}\n{oops\n')
    with pytest.raises(BenchmarkDataError, match=r"bad.json:2: not a JSON value"):
        read_records(tmp_path / "bad.json")


def test_muse_splits_load_offline(tmp_path):
    write_muse(tmp_path)
    verbmem = muse.load_verbmem("news", tmp_path)
    assert verbmem[2] == muse.VerbMemItem("The match on day 2 ended", " with a draw at 2 all.")
    assert muse.load_knowmem("forget_qa_icl", "news", tmp_path) == [muse.KnowMemItem("Who refereed?", "Smith")]
    assert muse.load_texts("privleak", "holdout", "books", tmp_path, limit=1) == [
        "Holdout article 0: a storm closed 0 roads overnight."]
    # the hub's rows are objects with a `text` field; both shapes read the same
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "forget.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert muse.load_texts("raw", "forget", "news", tmp_path) == ["a", "b"]


def test_muse_errors_name_the_file_and_field(tmp_path):
    write_muse(tmp_path)
    with pytest.raises(BenchmarkDataError, match="knowmem/retain_qa_icl2.json|no split 'retain_qa_icl2'"):
        muse.load_knowmem("retain_qa_icl2", "news", tmp_path)
    (tmp_path / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "p", "ground_truth": "g"}]))
    missing_gt = r"verbmem/forget.json: row 0 has no field 'gt' \(it has: ground_truth"
    with pytest.raises(BenchmarkDataError, match=missing_gt):
        muse.load_verbmem("news", tmp_path)
    with pytest.raises(BenchmarkDataError, match="corpus 'blogs'"):
        muse.load_verbmem("blogs", tmp_path)
    (tmp_path / "raw").mkdir()
    with pytest.raises(BenchmarkDataError, match=r"raw/retain1.json: no such file"):
        muse.load_texts("raw", "retain1", "news", tmp_path)


def test_hub_reading_goes_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        if name == "verbmem":
            raise ConnectionError("offline")
        return [{"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": ["x", "y"]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sets = tofu.load_tofu_eval_sets("forget01")
    assert sets["forget"][0].perturbed == ("x", "y")
    assert calls[:2] == [("locuslab/TOFU", "forget01_perturbed", "train"),
                         ("locuslab/TOFU", "retain_perturbed", "train")]
    with pytest.raises(BenchmarkDataError, match=r"muse-bench/MUSE-Books.*'verbmem'.*ConnectionError: offline"):
        muse.load_verbmem("books")
