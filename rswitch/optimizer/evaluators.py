"""Evaluators: score a model's output against a dataset row's label, as a value in [0, 1].

Every evaluator has the same async interface, `await ev.score(output=..., expected=..., inputs=...)`,
because the LLM judge has to await a model call; the others just compute. `inputs` is the row's
`{"messages": [...], "variables": {...}}`. All evaluators here compare against a label, so one
that gets `expected=None` raises `EvaluationError` (the keyword evaluator given explicit keywords
and the LLM judge are the exceptions: they can work without a label).

`similarity`, `exact_match` and `keyword_match` are ports of the Go project Route-Switch
(github.com/Skelf-Research/route-switch, internal/models/similarity_eval.go, exact_match_eval.go
and keyword_match_eval.go), formula for formula, so scores carry over from it. Their `threshold`
is Route-Switch's `Correct` cut-off (0.8, exact equality, 0.7).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import string
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rapidfuzz import fuzz


class EvaluationError(Exception):
    """A row could not be scored: a missing or malformed label, or an unusable judge reply."""


@dataclass(frozen=True, slots=True)
class Score:
    value: float
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"score {self.value} is outside [0, 1]")


class Evaluator(ABC):
    name: str
    # Scores at or above this count as a pass (Route-Switch's `Correct`).
    threshold: float = 1.0

    @abstractmethod
    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score: ...

    def passed(self, score: Score) -> bool:
        return score.value >= self.threshold

    def _require_expected(self, expected: str | None) -> str:
        if expected is None:
            raise EvaluationError(
                f"the {self.name} evaluator needs an expected output, and this row has none"
            )
        return expected


# --- Go string semantics, so the Route-Switch ports give the same numbers -------------------------

# unicode.IsSpace, which Go's strings.Fields and strings.TrimSpace use. Python's str.split() also
# splits on \x1c-\x1f, which Go does not.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_GO_FIELDS = re.compile(f"[^{_GO_SPACE}]+")
_GO_TRIM = re.compile(rf"\A[{_GO_SPACE}]+|[{_GO_SPACE}]+\Z")


def _go_fields(text: str) -> list[str]:
    return _GO_FIELDS.findall(text)


def _go_trim_space(text: str) -> str:
    return _GO_TRIM.sub("", text)


def _go_lower(text: str) -> str:
    # Go lowercases rune by rune: no final-sigma rule (str.lower() has one), and "İ" becomes "i"
    # rather than Python's two-character "i̇".
    return "".join("i" if ch == "\u0130" else ch.lower() for ch in text)


# --- Route-Switch ports ----------------------------------------------------------------------------


class SimilarityEvaluator(Evaluator):
    """Route-Switch's calculateSimilarity: 0.5 * word Jaccard + 0.5 * word-count similarity.

    Words are whitespace-separated after lowercasing; punctuation stays part of a word. As in Go, the
    intersection counts each expected word that also occurs in the output, duplicates included,
    which can push the raw score above 1 (expected "no no no", output "no" gives 1.67); that is
    the one deviation: the value is capped at 1.0.
    """

    name = "similarity"
    threshold = 0.8

    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score:
        expected = self._require_expected(expected)
        s1 = _go_fields(_go_lower(expected))
        s2 = _go_fields(_go_lower(output))
        in_output = set(s2)
        intersection = sum(1 for word in s1 if word in in_output)
        union = len(s1) + len(s2) - intersection
        if union == 0:
            return Score(1.0, "both empty")
        jaccard = intersection / union
        length_similarity = 1.0 - abs(len(s1) - len(s2)) / max(len(s1), len(s2))
        value = 0.5 * jaccard + 0.5 * length_similarity
        return Score(
            min(value, 1.0),
            f"word jaccard {jaccard:.3f} ({intersection}/{union}), "
            f"length similarity {length_similarity:.3f} ({len(s1)} vs {len(s2)} words)",
        )


class ExactMatchEvaluator(Evaluator):
    """Route-Switch's exact match: equal after trimming surrounding whitespace; case-sensitive."""

    name = "exact_match"
    threshold = 1.0

    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score:
        expected = self._require_expected(expected)
        if _go_trim_space(output) == _go_trim_space(expected):
            return Score(1.0, "exact match")
        return Score(0.0, "output differs from expected")


# extractKeywords' stop words and the punctuation it trims from each word's ends.
_STOP_WORDS = frozenset(
    "the a an and or but in on at to for of with by is are was were be been being have has had "
    "do does did will would could should may might must can".split()
)
_KEYWORD_PUNCTUATION = ".,!?:;\"'()[]{}"


def _extract_keywords(text: str) -> list[str]:
    keywords = []
    for word in _go_fields(_go_lower(text)):
        word = word.strip(_KEYWORD_PUNCTUATION)
        # Go's len() counts UTF-8 bytes, so "né" (3 bytes) is long enough.
        if len(word.encode("utf-8", "surrogatepass")) > 2 and word not in _STOP_WORDS:
            keywords.append(word)
    return keywords


class KeywordMatchEvaluator(Evaluator):
    """Route-Switch's keyword match: the share of keywords found in the output.

    Keywords are the ones given, or else (an empty list counts as none, as in Go) the words of the
    expected output minus stop words and words under 3 bytes, duplicates kept. "Found" is a
    case-insensitive substring test, so "cat" is found in "concatenate". No keywords at all
    scores 0.
    """

    name = "keyword_match"
    threshold = 0.7

    def __init__(self, keywords: Sequence[str] | None = None) -> None:
        self.keywords = tuple(keywords or ())

    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score:
        keywords = list(self.keywords) or _extract_keywords(self._require_expected(expected))
        if not keywords:
            return Score(0.0, "no keywords to look for")
        output_lower = _go_lower(output)
        missing = [kw for kw in keywords if _go_lower(kw) not in output_lower]
        matched = len(keywords) - len(missing)
        reason = f"{matched}/{len(keywords)} keywords found"
        if missing:
            reason += f"; missing: {', '.join(missing)}"
        return Score(matched / len(keywords), reason)


# --- Other text evaluators -------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _squad_tokens(text: str) -> list[str]:
    # SQuAD's normalize_answer: lowercase, drop punctuation, drop articles, split on whitespace.
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


class TokenF1Evaluator(Evaluator):
    """SQuAD token F1: harmonic mean of token precision and recall over the multiset of tokens."""

    name = "token_f1"
    threshold = 0.8

    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score:
        gold = _squad_tokens(self._require_expected(expected))
        pred = _squad_tokens(output)
        if not gold or not pred:
            # SQuAD 2.0's rule: two empty answers agree; one empty answer scores 0.
            same = gold == pred
            return Score(float(same), "both empty" if same else "one side has no tokens")
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            return Score(0.0, "no tokens in common")
        precision = common / len(pred)
        recall = common / len(gold)
        return Score(
            2 * precision * recall / (precision + recall),
            f"precision {precision:.3f}, recall {recall:.3f}",
        )


def _squash(text: str) -> str:
    return " ".join(text.casefold().split())


class FuzzyRatioEvaluator(Evaluator):
    """rapidfuzz's fuzz.ratio (normalised Indel similarity) on case-folded, whitespace-squashed text.

    Punctuation is kept: it is character-level similarity, and a stray "!" should cost a little.
    """

    name = "fuzzy"
    threshold = 0.8

    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score:
        ratio = fuzz.ratio(_squash(output), _squash(self._require_expected(expected)))
        return Score(ratio / 100.0, f"fuzzy ratio {ratio:.1f}")


# --- JSON fields -----------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()


def _first_json_object(text: str) -> dict[str, Any] | None:
    """The first {...} in `text` that parses as a JSON object, so prose and ```json fences are fine."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true is not 1 in a label.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _values_match(expected: Any, actual: Any) -> bool:
    if _is_number(expected) and _is_number(actual):
        return expected == actual  # 3 == 3.0
    if isinstance(expected, str) and isinstance(actual, str):
        return expected.strip().casefold() == actual.strip().casefold()
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            _values_match(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(map(_values_match, expected, actual))
    # bool, null, or mismatched types (the string "3" is not the number 3).
    return type(expected) is type(actual) and expected == actual


class JsonFieldEvaluator(Evaluator):
    """The share of the expected object's top-level fields that the output's object matches.

    Numbers compare numerically, strings case-insensitively after trimming, the same rules apply
    inside nested values, and extra output fields are ignored. Output with no JSON object scores
    0; a label that is not a JSON object is an error in the dataset, so it raises.
    """

    name = "json_fields"
    threshold = 1.0

    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score:
        expected = self._require_expected(expected)
        want = _first_json_object(expected)
        if want is None:
            raise EvaluationError(f"expected output is not a JSON object: {expected[:200]!r}")
        got = _first_json_object(output)
        if got is None:
            return Score(0.0, "no JSON object in the output")
        if not want:
            return Score(1.0, "expected object has no fields")
        missing = [key for key in want if key not in got]
        wrong = [key for key in want if key in got and not _values_match(want[key], got[key])]
        matched = len(want) - len(missing) - len(wrong)
        reason = f"{matched}/{len(want)} fields match"
        if missing:
            reason += f"; missing: {', '.join(missing)}"
        if wrong:
            reason += f"; different: {', '.join(wrong)}"
        return Score(matched / len(want), reason)


# --- LLM judge -------------------------------------------------------------------------------------

DEFAULT_RUBRIC = (
    "The answer is correct, complete and appropriate for the input. "
    "If an expected output is given, the answer agrees with it in substance; wording may differ."
)
# The first standalone integer 1-5: not part of "10", "-2" or "4.5".
_VERDICT = re.compile(r"(?<![\d.-])[1-5](?!\.?\d)")


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text, name the rest
        return " ".join(
            part.get("text", "") if part.get("type") == "text" else f"[{part.get('type', 'part')}]"
            for part in content
            if isinstance(part, dict)
        )
    return "" if content is None else str(content)


def _summarise_messages(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"{m.get('role', 'user')}: {_message_text(m.get('content'))}" for m in messages)


class LLMJudgeEvaluator(Evaluator):
    """A model grades the output 1-5 against a rubric; the verdict n scores (n - 1) / 4.

    `judge(messages)` sends chat messages to a model and returns its reply text; the caller routes
    it (at temperature 0, so a verdict is worth caching). Verdicts are cached by a hash of what the
    judge is shown, and concurrent requests for the same verdict wait for one call. Pass a shared
    `cache` dict (it holds plain ints) to reuse verdicts across evaluators or runs.
    """

    name = "llm_judge"
    threshold = 0.75  # a 4 or a 5

    def __init__(
        self,
        judge: Callable[[list[dict[str, Any]]], Awaitable[str]],
        rubric: str = DEFAULT_RUBRIC,
        cache: dict[str, int] | None = None,
    ) -> None:
        self.judge = judge
        self.rubric = rubric
        self.cache: dict[str, int] = {} if cache is None else cache
        self._locks: dict[str, asyncio.Lock] = {}

    def judge_messages(self, *, output: str, expected: str | None, input_text: str) -> list[dict[str, str]]:
        system = (
            "You grade an AI assistant's output.\n\n"
            f"Rubric:\n{self.rubric}\n\n"
            "Rate how well the actual output meets the rubric, from 1 (fails it) to 5 (fully meets it). "
            "Answer with a single integer from 1 to 5 and nothing else."
        )
        parts = [f"## Input\n{input_text}"]
        if expected is not None:
            parts.append(f"## Expected output\n{expected}")
        parts.append(f"## Actual output\n{output}")
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]

    async def score(self, *, output: str, expected: str | None, inputs: dict[str, Any]) -> Score:
        input_text = _summarise_messages(inputs.get("messages") or [])
        key = hashlib.sha256(
            json.dumps([self.rubric, input_text, expected, output], ensure_ascii=False).encode()
        ).hexdigest()
        cached = True
        # One lock per verdict: concurrent scorings of the same output wait for the first call.
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self.cache:
                cached = False
                messages = self.judge_messages(output=output, expected=expected, input_text=input_text)
                reply = await self.judge(messages)
                match = _VERDICT.search(reply)
                if match is None:
                    raise EvaluationError(f"judge reply has no verdict from 1 to 5: {reply[:200]!r}")
                self.cache[key] = int(match.group())
        verdict = self.cache[key]
        return Score((verdict - 1) / 4, f"judge verdict {verdict}/5" + (" (cached)" if cached else ""))


# --- Factory ---------------------------------------------------------------------------------------

EVALUATORS: dict[str, type[Evaluator]] = {
    "similarity": SimilarityEvaluator,
    "exact_match": ExactMatchEvaluator,
    "keyword_match": KeywordMatchEvaluator,
    "token_f1": TokenF1Evaluator,
    "fuzzy": FuzzyRatioEvaluator,
    "json_fields": JsonFieldEvaluator,
    "llm_judge": LLMJudgeEvaluator,
}


def build_evaluator(name: str, **options: Any) -> Evaluator:
    """An evaluator by name; options go to its constructor (`judge=` for llm_judge, `keywords=`...)."""
    cls = EVALUATORS.get(name)
    if cls is None:
        raise ValueError(f"unknown evaluator {name!r}; choose one of: {', '.join(EVALUATORS)}")
    return cls(**options)
