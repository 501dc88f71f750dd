"""The Porter stemmer against the examples of "An algorithm for suffix stripping" (Porter 1980): the
measure m, each step's examples as printed beside its rules, and two words stemmed through every
step; then ROUGE-L with the stemmer."""
import pytest

from ortho_train.measurement.benchmarks.config import TofuEvalConfig
from ortho_train.metrics import porter
from ortho_train.metrics.rouge import text_rouge_l
from ortho_train.settings import SettingError


@pytest.mark.parametrize("m, words", [(0, ["tr", "ee", "tree", "y", "by"]),
                                      (1, ["trouble", "oats", "trees", "ivy"]),
                                      (2, ["troubles", "private", "oaten", "orrery"])])
def test_measure_of_the_papers_words(m, words):
    assert [porter.measure(w) for w in words] == [m] * len(words)


STEP_EXAMPLES = {
    porter.step1a: {"caresses": "caress", "ponies": "poni", "ties": "ti", "caress": "caress", "cats": "cat"},
    porter.step1b: {"feed": "feed", "agreed": "agree", "plastered": "plaster", "bled": "bled", "motoring": "motor",
                    "sing": "sing", "conflated": "conflate", "troubled": "trouble", "sized": "size", "hopping": "hop",
                    "tanned": "tan", "falling": "fall", "hissing": "hiss", "fizzed": "fizz", "failing": "fail",
                    "filing": "file"},
    porter.step1c: {"happy": "happi", "sky": "sky"},
    porter.step2: {"relational": "relate", "conditional": "condition", "rational": "rational", "valenci": "valence",
                   "hesitanci": "hesitance", "digitizer": "digitize", "conformabli": "conformable",
                   "radicalli": "radical", "differentli": "different", "vileli": "vile", "analogousli": "analogous",
                   "vietnamization": "vietnamize", "predication": "predicate", "operator": "operate",
                   "feudalism": "feudal", "decisiveness": "decisive", "hopefulness": "hopeful",
                   "callousness": "callous", "formaliti": "formal", "sensitiviti": "sensitive",
                   "sensibiliti": "sensible"},
    porter.step3: {"triplicate": "triplic", "formative": "form", "formalize": "formal", "electriciti": "electric",
                   "electrical": "electric", "hopeful": "hope", "goodness": "good"},
    porter.step4: {"revival": "reviv", "allowance": "allow", "inference": "infer", "airliner": "airlin",
                   "gyroscopic": "gyroscop", "adjustable": "adjust", "defensible": "defens", "irritant": "irrit",
                   "replacement": "replac", "adjustment": "adjust", "dependent": "depend", "adoption": "adopt",
                   "homologou": "homolog", "communism": "commun", "activate": "activ", "angulariti": "angular",
                   "homologous": "homolog", "effective": "effect", "bowdlerize": "bowdler"},
    porter.step5a: {"probate": "probat", "rate": "rate", "cease": "ceas"},
    porter.step5b: {"controll": "control", "roll": "roll"},
}


@pytest.mark.parametrize("step", list(STEP_EXAMPLES), ids=lambda s: s.__name__)
def test_each_step_on_the_papers_examples(step):
    assert {word: step(word) for word in STEP_EXAMPLES[step]} == STEP_EXAMPLES[step]


def test_whole_words_through_every_step():
    # the paper's two worked examples: GENERALIZATIONS → GENERALIZATION (1a) → GENERALIZE (2) →
    # GENERAL (3) → GENER (4); OSCILLATORS → OSCILLATOR → OSCILLATE → OSCILL (4) → OSCIL (5b)
    assert porter.porter_stem("generalizations") == "gener"
    assert porter.porter_stem("oscillators") == "oscil"
    # its point: a family of words conflated to one stem
    assert {porter.porter_stem(w) for w in ("connect", "connected", "connecting", "connection", "connections")} \
        == {"connect"}
    assert porter.porter_stem("is") == "is" and porter.porter_stem("killed") == "kill"


def test_rouge_l_with_the_stemmer():
    # "He killed the dragons" vs "he kills a dragon": words he / kill / dragon match once stemmed,
    # LCS 3 of 4 words on each side: P = R = F1 = 0.75; unstemmed only "he" matches: R = 1/4
    plain = text_rouge_l("He killed the dragons", "he kills a dragon")
    stemmed = text_rouge_l("He killed the dragons", "he kills a dragon", porter.porter_stem)
    assert plain.recall == pytest.approx(0.25) and stemmed.recall == pytest.approx(0.75)
    assert TofuEvalConfig(rouge_stemmer="porter").rouge_stemmer == "porter"
    with pytest.raises(SettingError, match="--rouge-stemmer='snowball'"):
        TofuEvalConfig(rouge_stemmer="snowball")
