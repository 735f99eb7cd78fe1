"""How the flow agent hears: an utterance's normalised words scored against every intent's
phrases and keyword sets at once (and the escalation's and the goodbye's)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from callray.agents.base import normalise

Keyword = tuple[tuple[tuple[str, bool], ...], ...]  # terms -> alternatives -> (word, prefix)

EXACT, PHRASE, KEYWORDS = 3, 2, 1  # score tiers: a phrase beats any keyword set
Score = tuple[int, int]  # (tier, size): a longer phrase or a bigger keyword set wins within a tier


def contains(haystack: str, needle: str) -> int:
    """Word-aligned position of normalised ``needle`` in normalised ``haystack``, or -1."""
    return f" {haystack} ".find(f" {needle} ")


def parse_keywords(entry: str) -> Keyword:
    """``"book|schedule appoint*"``: every term must match a word; ``|`` separates
    alternatives, a trailing ``*`` matches words starting with it."""
    terms = []
    for term in entry.split():
        alternatives = []
        for alt in term.split("|"):
            word = normalise(alt.rstrip("*"))
            if not word or " " in word:
                raise ValueError(f"{alt!r} is not one word after normalisation ({word!r}); list its words separately")
            alternatives.append((word, alt.endswith("*")))
        terms.append(tuple(alternatives))
    if not terms:
        raise ValueError("empty keyword set")
    return tuple(terms)


def check_phrase(text: str) -> str:
    if not normalise(text):
        raise ValueError(f"{text!r} is empty after normalisation")
    return text


def check_keywords(text: str) -> str:
    parse_keywords(text)
    return text


def check_regex(text: str) -> str:
    try:
        groups = re.compile(text).groups
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from exc
    if groups != 1:
        raise ValueError(f"needs exactly one capturing group (has {groups}); use (?:...) for the others")
    return text


@dataclass(frozen=True)
class Matcher:
    """One intent's (or the escalation's, the goodbye's) normalised phrases and keyword sets."""

    phrases: tuple[str, ...]
    exact: tuple[str, ...]
    keywords: tuple[Keyword, ...]


class MatchIndex:
    """Every matcher of an agent in hash tables, built once: scoring an utterance costs
    O(words x longest phrase), whatever the number of intents, phrases and keywords.

    A matcher scores the best of: the whole utterance equal to one of its phrases (EXACT), one
    of its phrases contained word-aligned (PHRASE), and, only when neither, a keyword set whose
    every term matches some word (KEYWORDS); a longer phrase or a bigger set wins in a tier.
    """

    def __init__(self, matchers: dict[str, Matcher]):
        self._whole: dict[str, list[tuple[str, int]]] = {}  # utterance -> (key, words)
        self._grams: dict[str, list[tuple[str, int]]] = {}  # word n-gram -> (key, words)
        self._words: dict[str, list[tuple[tuple[str, int], int]]] = {}  # word -> ((key, set), term)
        self._prefixes: dict[str, list[tuple[tuple[str, int], int]]] = {}  # word prefix -> ((key, set), term)
        self._terms: dict[tuple[str, int], int] = {}  # (key, set) -> its number of terms
        self._longest = 1
        self._starts: set[str] = set()  # first words of phrases: n-grams start nowhere else
        for key, matcher in matchers.items():
            for phrase in matcher.exact + matcher.phrases:
                self._whole.setdefault(phrase, []).append((key, phrase.count(" ") + 1))
            for phrase in matcher.phrases:
                size = phrase.count(" ") + 1
                self._grams.setdefault(phrase, []).append((key, size))
                self._longest = max(self._longest, size)
                self._starts.add(phrase.split(" ", 1)[0])
            for k, terms in enumerate(matcher.keywords):
                self._terms[(key, k)] = len(terms)
                for t, alternatives in enumerate(terms):
                    for word, prefix in alternatives:
                        (self._prefixes if prefix else self._words).setdefault(word, []).append(((key, k), t))
        self._prefix_lengths = sorted({len(p) for p in self._prefixes})

    def scores(self, utterance: str) -> dict[str, Score]:
        """The score of every matcher that matches ``utterance`` (normalised)."""
        best: dict[str, Score] = {}

        def offer(key: str, score: Score) -> None:
            if score > best.get(key, (0, 0)):
                best[key] = score

        for key, size in self._whole.get(utterance, ()):
            offer(key, (EXACT, size))
        words = utterance.split()
        for i, first in enumerate(words):
            if first not in self._starts:
                continue
            gram = first
            for n in range(1, min(self._longest, len(words) - i) + 1):
                if n > 1:
                    gram = f"{gram} {words[i + n - 1]}"
                for key, size in self._grams.get(gram, ()):
                    offer(key, (PHRASE, size))
        matched: dict[tuple[str, int], set[int]] = {}
        for word in set(words):
            for owner, term in self._words.get(word, ()):
                matched.setdefault(owner, set()).add(term)
            for length in self._prefix_lengths:
                if length > len(word):
                    break
                for owner, term in self._prefixes.get(word[:length], ()):
                    matched.setdefault(owner, set()).add(term)
        by_phrase = set(best)
        for (key, k), terms in matched.items():
            if key not in by_phrase and len(terms) == self._terms[(key, k)]:
                offer(key, (KEYWORDS, len(terms)))
        return best
