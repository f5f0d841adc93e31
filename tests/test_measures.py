"""Degeneration measures on hand-made texts, each number worked out by hand."""

from __future__ import annotations

import pytest

from cai.measures import degeneration, distinct_n, rep_n, repeats_ngram, repeats_sentence

LOOP = "I can help with that. I can help with that. I can help with that."
FINE = "Rest the steak for five minutes. The juices settle back into the meat, so it stays moist."
NGRAM_LOOP = "you should you should you should really consider it"


def test_a_repeated_sentence_is_found_case_and_punctuation_ignored():
    assert repeats_sentence(LOOP)
    assert repeats_sentence("Please stay safe! please stay SAFE... Please, stay safe?")
    assert not repeats_sentence(FINE)
    assert not repeats_sentence("Yes. Yes. Yes.")  # one-word sentences are too short to count (min_words=3)


def test_a_repeated_ngram_is_found_only_at_the_threshold():
    # 2-grams of NGRAM_LOOP: "you should" x3 -> repeats at times=3, not at times=4
    assert repeats_ngram(NGRAM_LOOP, n=2, times=3)
    assert not repeats_ngram(NGRAM_LOOP, n=2, times=4)
    assert not repeats_ngram(FINE, n=4, times=2)


def test_rep_n_by_hand():
    # "a b a b a": 2-grams ab ba ab ba -> 2 unique of 4 -> 1 - 2/4 = 0.5
    assert rep_n("a b a b a", 2) == pytest.approx(0.5)
    assert rep_n("a b c", 4) == 0.0  # shorter than n
    assert rep_n(FINE, 2) == 0.0


def test_distinct_n_by_hand():
    # 1-grams over ["a b", "a c"]: a b a c -> 3 distinct of 4
    assert distinct_n(["a b", "a c"], 1) == pytest.approx(0.75)
    # 2-grams: "a b", "a c" -> 2 of 2
    assert distinct_n(["a b", "a c"], 2) == pytest.approx(1.0)
    assert distinct_n(["", "x"], 2) is None


def test_degeneration_summary_by_hand():
    d = degeneration([LOOP, FINE, NGRAM_LOOP, "Sure."], n=2, times=3)
    # LOOP repeats a sentence (and its 2-grams), NGRAM_LOOP repeats "you should" 3 times: 2 of 4 answers
    assert d["answers"] == 4
    assert d["repeat_sentence_share"] == pytest.approx(1 / 4)
    assert d["repeat_ngram_share"] == pytest.approx(2 / 4)
    assert d["repetition_share"] == pytest.approx(2 / 4)
    assert 0 < d["distinct_1"] < 1 and 0 < d["distinct_2"] < 1
    assert degeneration([])["repetition_share"] is None
