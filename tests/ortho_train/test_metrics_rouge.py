"""ROUGE-L on hand-computed LCS values, and rouge-score's default word splitting."""
import pytest

from ortho_train.metrics.muse import lcs_length as reexported_lcs, rouge_l_f1 as reexported_f1
from ortho_train.metrics.rouge import lcs_length, rouge_l, rouge_l_recall, rouge_tokens, text_rouge_l


def test_lcs_hand_values():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example: BCBA
    assert lcs_length([1, 2, 3], []) == 0
    assert lcs_length("AGGTAB", "GXTXAYB") == 4  # GTAB
    assert reexported_lcs is lcs_length and reexported_f1([1, 2], [1, 2]) == 1.0


def test_rouge_l_precision_recall_f1_by_hand():
    # prediction 6 words, reference 4, LCS "the cat sat mat" = 4: P = 4/6, R = 1, F1 = 0.8.
    pred, ref = "the cat has sat on mat".split(), "the cat sat mat".split()
    scores = rouge_l(pred, ref)
    assert scores.precision == pytest.approx(4 / 6) and scores.recall == 1.0
    assert scores.f1 == pytest.approx(2 * (4 / 6) / (4 / 6 + 1)) == pytest.approx(0.8)
    # swapped: recall is the share of the (now longer) reference
    assert rouge_l_recall(ref, pred) == pytest.approx(4 / 6)
    assert rouge_l([], ref) == (0.0, 0.0, 0.0) and rouge_l(["x"], ["y"]) == (0.0, 0.0, 0.0)


def test_rouge_tokens_split_like_rouge_score():
    assert rouge_tokens("Hello, World! It's 2024-05.") == ["hello", "world", "it", "s", "2024", "05"]
    assert rouge_tokens("  ") == []
    # a stemmer applies to words longer than 3 characters only
    assert rouge_tokens("The cats ran far", stem=lambda w: w[:3]) == ["the", "cat", "ran", "far"]


def test_text_rouge_l_is_case_and_punctuation_blind():
    # "Author 3 was born in Town 3." vs "author 3 was born in city 3": LCS 6 of 7 reference words.
    scores = text_rouge_l("author 3 was born in city 3", "Author 3 was born in Town 3.")
    assert scores.recall == pytest.approx(6 / 7) and scores.precision == pytest.approx(6 / 7)
