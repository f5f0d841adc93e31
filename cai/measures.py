"""Degeneration measures of generated answers: repeated sentences, repeated n-grams, distinct-n. Torch-free.

A policy can win a preference model by repeating itself (a 135M model easily falls into loops); these numbers
make that show in `cai.evaluate`, `cai.compare` and the PPO metrics.

- `repeats_sentence(text)`: some sentence of at least `min_words` words occurs twice or more (case and
  punctuation ignored).
- `repeats_ngram(text, n, times)`: some word n-gram occurs at least `times` times.
- `rep_n(text, n)`: share of the answer's word n-grams that repeat an earlier one: 1 - unique/total
  (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training", section 6: seq-rep-n).
- `distinct_n(texts, n)`: distinct word n-grams / all word n-grams over a set of answers (Li et al. 2016, "A
  Diversity-Promoting Objective Function for Neural Conversation Models").
- `load_patterns` / `is_refusal`: the refusal detector, regular expressions of refusal phrases from a file
  (prompts/detectors/refusal.txt), one per line.
- `degeneration(texts)`: all of the above for a set of answers; `repetition_share` is the share of answers that
  repeat a sentence or an n-gram.
"""

from __future__ import annotations

import re

from cai.errors import CaiError
from cai.io import read_text, split_lines
from cai.paths import resolve_path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentences(text: str, min_words: int = 3) -> list[tuple[str, ...]]:
    """Sentences as tuples of lower-cased words (punctuation dropped), those of at least min_words words."""
    out = []
    for s in _SENTENCE_END.split(text):
        w = tuple(words(s))
        if len(w) >= min_words:
            out.append(w)
    return out


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeats_sentence(text: str, min_words: int = 3) -> bool:
    s = sentences(text, min_words)
    return len(set(s)) < len(s)


def repeats_ngram(text: str, n: int = 4, times: int = 3) -> bool:
    counts: dict[tuple[str, ...], int] = {}
    for g in ngrams(words(text), n):
        counts[g] = counts.get(g, 0) + 1
        if counts[g] >= times:
            return True
    return False


def rep_n(text: str, n: int = 4) -> float:
    """1 - unique n-grams / n-grams of one answer (0 for an answer shorter than n words)."""
    g = ngrams(words(text), n)
    return 1 - len(set(g)) / len(g) if g else 0.0


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over every answer; None when there is no n-gram at all."""
    all_g = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(all_g)) / len(all_g) if all_g else None


def is_repetitive(text: str, n: int = 4, times: int = 3, min_words: int = 3) -> bool:
    return repeats_sentence(text, min_words) or repeats_ngram(text, n, times)


def degeneration(texts: list[str], n: int = 4, times: int = 3, min_words: int = 3) -> dict:
    """Shares of answers that repeat a sentence / an n-gram / either, mean rep-n, distinct-1 and distinct-2."""
    k = len(texts)
    if k == 0:
        return {"answers": 0, "repetition_share": None, "repeat_sentence_share": None, "repeat_ngram_share": None,
                f"rep_{n}": None, "distinct_1": None, "distinct_2": None}
    sent = [repeats_sentence(t, min_words) for t in texts]
    ngram = [repeats_ngram(t, n, times) for t in texts]
    return {"answers": k, "repetition_share": sum(a or b for a, b in zip(sent, ngram)) / k,
            "repeat_sentence_share": sum(sent) / k, "repeat_ngram_share": sum(ngram) / k,
            f"rep_{n}": sum(rep_n(t, n) for t in texts) / k,
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}


def load_patterns(path: str) -> list[re.Pattern]:
    p = resolve_path(path)
    if not p.exists():
        raise CaiError(f"{path}: refusal pattern file not found")
    out = []
    for n, line in enumerate(split_lines(read_text(p)), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(re.compile(line, re.IGNORECASE))
        except re.error as e:
            raise CaiError(f"{path}:{n}: invalid regular expression ({e})") from None
    return out


def is_refusal(text: str, patterns: list[re.Pattern]) -> bool:
    return any(p.search(text) for p in patterns)
