"""The Porter stemmer as published: M.F. Porter, "An algorithm for suffix stripping" (1980).

A word is read as [C](VC)^m[V], C a run of consonants and V a run of vowels; m is its *measure*.
A consonant is a letter other than a, e, i, o, u, and other than a y after a consonant. The
conditions of the rules, on the stem left once the suffix is removed:

- `m > k`: the stem's measure; `*v*`: the stem holds a vowel; `*d`: it ends in a double
  consonant; `*o`: it ends consonant-vowel-consonant, the last not w, x or y; `*S`, `*L`, …: it ends
  in that letter.

Steps 1a, 1b (with its tidying rules), 1c, 2, 3, 4, 5a and 5b run in order. Within a step, the rule
with the longest matching suffix is the only one tried: when its condition fails, the step leaves the
word alone. The rules are the paper's, including step 2's ABLI → ABLE (later versions of the
stemmer use BLI → BLE and add LOGI → LOG); `nltk`'s default mode (which `rouge-score` uses) adds
further departures, so a few stems differ from theirs. Input is one lower-case word; words of one or
two letters are returned unchanged, as in Porter's own implementation.
"""
from __future__ import annotations

VOWELS = frozenset("aeiou")

STEP2 = (("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
         ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
         ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
         ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"))
STEP3 = (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
         ("ness", ""))
STEP4 = ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism",
         "ate", "iti", "ous", "ive", "ize")


def is_consonant(word: str, i: int) -> bool:
    """Letter i of `word` is a consonant: not a vowel, and not a y after a consonant."""
    if word[i] in VOWELS:
        return False
    if word[i] == "y":
        return i == 0 or not is_consonant(word, i - 1)
    return True


def measure(stem: str) -> int:
    """m of [C](VC)^m[V]: the number of vowel-run → consonant-run changes."""
    kinds = [is_consonant(stem, i) for i in range(len(stem))]
    return sum(1 for a, b in zip(kinds, kinds[1:]) if not a and b)


def has_vowel(stem: str) -> bool:
    """`*v*`: the stem holds a vowel."""
    return any(not is_consonant(stem, i) for i in range(len(stem)))


def ends_double_consonant(stem: str) -> bool:
    """`*d`: the stem ends in two equal consonants."""
    return len(stem) >= 2 and stem[-1] == stem[-2] and is_consonant(stem, len(stem) - 1)


def ends_cvc(stem: str) -> bool:
    """`*o`: the stem ends consonant-vowel-consonant, the last consonant not w, x or y."""
    n = len(stem)
    return (n >= 3 and is_consonant(stem, n - 3) and not is_consonant(stem, n - 2)
            and is_consonant(stem, n - 1) and stem[-1] not in "wxy")


def _longest(word: str, rules) -> tuple[str, str] | None:
    """The (suffix, replacement) rule with the longest suffix `word` ends with."""
    found = [rule for rule in rules if word.endswith(rule[0])]
    return max(found, key=lambda rule: len(rule[0])) if found else None


def step1a(word: str) -> str:
    """SSES → SS, IES → I, SS → SS, S → ''."""
    rule = _longest(word, (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")))
    return word if rule is None else word[:len(word) - len(rule[0])] + rule[1]


def step1b(word: str) -> str:
    """(m > 0) EED → EE; (*v*) ED → ''; (*v*) ING → ''; after either of the last two: AT → ATE,
    BL → BLE, IZ → IZE, (*d and not *L, *S, *Z) → one letter, (m = 1 and *o) → E."""
    if word.endswith("eed"):
        return word[:-1] if measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix):
            stem = word[:-len(suffix)]
            return _tidy_1b(stem) if has_vowel(stem) else word
    return word


def _tidy_1b(stem: str) -> str:
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if ends_double_consonant(stem) and stem[-1] not in "lsz":
        return stem[:-1]
    if measure(stem) == 1 and ends_cvc(stem):
        return stem + "e"
    return stem


def step1c(word: str) -> str:
    """(*v*) Y → I."""
    return word[:-1] + "i" if word.endswith("y") and has_vowel(word[:-1]) else word


def _replace(word: str, rules, minimum: int) -> str:
    """The longest matching rule, applied when the stem's measure exceeds `minimum`."""
    rule = _longest(word, rules)
    if rule is None:
        return word
    stem = word[:len(word) - len(rule[0])]
    return stem + rule[1] if measure(stem) > minimum else word


def step2(word: str) -> str:
    """(m > 0) ATIONAL → ATE, TIONAL → TION, …, BILITI → BLE (the paper's twenty rules)."""
    return _replace(word, STEP2, 0)


def step3(word: str) -> str:
    """(m > 0) ICATE → IC, ATIVE → '', ALIZE → AL, ICITI → IC, ICAL → IC, FUL → '', NESS → ''."""
    return _replace(word, STEP3, 0)


def step4(word: str) -> str:
    """(m > 1) AL, ANCE, …, IZE → ''; ION only after S or T."""
    suffix = max((s for s in STEP4 if word.endswith(s)), key=len, default=None)
    if suffix is None:
        return word
    stem = word[:-len(suffix)]
    if suffix == "ion" and not stem.endswith(("s", "t")):
        return word
    return stem if measure(stem) > 1 else word


def step5a(word: str) -> str:
    """(m > 1) E → ''; (m = 1 and not *o) E → ''."""
    if not word.endswith("e"):
        return word
    stem = word[:-1]
    m = measure(stem)
    return stem if m > 1 or (m == 1 and not ends_cvc(stem)) else word


def step5b(word: str) -> str:
    """(m > 1 and *d and *L) → one letter."""
    return word[:-1] if measure(word) > 1 and ends_double_consonant(word) and word.endswith("l") else word


STEPS = (step1a, step1b, step1c, step2, step3, step4, step5a, step5b)


def porter_stem(word: str) -> str:
    """The stem of one lower-case word (module docstring); words of ≤ 2 letters unchanged."""
    if len(word) <= 2:
        return word
    for step in STEPS:
        word = step(word)
    return word
