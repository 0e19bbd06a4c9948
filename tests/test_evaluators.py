"""Evaluators: hand-computed scores, edge cases, the LLM judge's parsing and caching, the factory."""

from __future__ import annotations

import asyncio

import pytest

from rswitch.optimizer.evaluators import (
    EVALUATORS,
    EvaluationError,
    ExactMatchEvaluator,
    FuzzyRatioEvaluator,
    JsonFieldEvaluator,
    KeywordMatchEvaluator,
    LLMJudgeEvaluator,
    Score,
    SimilarityEvaluator,
    TokenF1Evaluator,
    build_evaluator,
)

NAMES = ("similarity", "exact_match", "keyword_match", "token_f1", "fuzzy", "json_fields", "llm_judge")
INPUTS = {"messages": [{"role": "user", "content": "What is 2+2?"}], "variables": {}}


async def score(evaluator, output, expected, inputs=INPUTS):
    return await evaluator.score(output=output, expected=expected, inputs=inputs)


def test_score_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError):
        Score(1.5, "too good")
    assert Score(0.0, "fine").value == 0.0


# --- similarity (Route-Switch calculateSimilarity) -------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "output", "value"),
    [
        ("hello world", "hello world", 1.0),
        ("HELLO WORLD", "  hello\n world\t", 1.0),  # lowercased, split on any whitespace
        ("", "", 1.0),
        ("hello", "", 0.0),
        ("", "hello", 0.0),
        # 2 shared of 4 distinct: jaccard 2/4; lengths 4 vs 2: 1 - 2/4
        ("the quick brown fox", "quick fox", 0.5 * 0.5 + 0.5 * 0.5),
        ("hello world", "hello there", 0.5 * (1 / 3) + 0.5 * 1.0),
        ("the quick brown fox jumps", "the quick brown dog jumps", 0.5 * (4 / 6) + 0.5 * 1.0),
        # punctuation stays in the word: "hello," is not "hello"
        ("Hello, world", "hello world", 0.5 * (1 / 3) + 0.5 * 1.0),
        # output duplicates count in the union: 1 / (1 + 3 - 1), lengths 1 vs 3
        ("no", "no no no", 0.5 * (1 / 3) + 0.5 * (1 / 3)),
        # expected duplicates each count as shared (Go's loop): raw 0.5*3 + 0.5*(1/3) > 1, capped
        ("no no no", "no", 1.0),
    ],
)
async def test_similarity(expected, output, value):
    result = await score(SimilarityEvaluator(), output, expected)
    assert result.value == pytest.approx(value)


async def test_similarity_threshold_is_route_switch_correct():
    ev = SimilarityEvaluator()
    assert ev.passed(await score(ev, "the quick brown dog jumps", "the quick brown fox jumps"))  # 5/6
    assert not ev.passed(await score(ev, "quick fox", "the quick brown fox"))  # 0.5


# --- exact match (Route-Switch: trimmed, case-sensitive) -------------------------------------------


@pytest.mark.parametrize(
    ("expected", "output", "value"),
    [
        ("hello world", "hello world", 1.0),
        ("  hello world  ", "hello world\n", 1.0),
        ("", "", 1.0),
        ("", "   ", 1.0),
        ("Hello World", "hello world", 0.0),  # case matters
        ("hello world", "hello", 0.0),
        ("hello  world", "hello world", 0.0),  # only the ends are trimmed
        ("4", "4.", 0.0),
    ],
)
async def test_exact_match(expected, output, value):
    assert (await score(ExactMatchEvaluator(), output, expected)).value == value


# --- keyword match (Route-Switch) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "value"),
    [
        ("The quick brown fox jumps", 1.0),
        ("The quick dog jumps", 1 / 3),
        ("The slow gray dog walks", 0.0),
        ("THE QUICK BROWN FOX", 1.0),
        ("", 0.0),
    ],
)
async def test_keyword_match_with_given_keywords(output, value):
    # Given keywords need no label.
    result = await score(KeywordMatchEvaluator(["quick", "brown", "fox"]), output, None)
    assert result.value == pytest.approx(value)


@pytest.mark.parametrize(
    ("expected", "output", "value"),
    [
        # keywords: important, concept, machine, learning, algorithms ("the", "is" are stop words)
        (
            "The important concept is machine learning algorithms",
            "machine learning algorithms are important",
            0.8,
        ),
        # punctuation trimmed from word ends: hello, world, how, you
        ("Hello, world! How are you?", "hello you", 0.5),
        # substring test: "cat" is in "concatenate"
        ("cat", "concatenate", 1.0),
        # words under 3 bytes dropped; Go counts bytes, so "né" (3 bytes) stays: né, lait
        ("né au lait", "du lait", 0.5),
        # duplicates kept: cat, cat, dog
        ("cat cat dog", "a cat", 2 / 3),
        # only stop words or short words: no keywords, which scores 0
        ("the a an", "anything", 0.0),
        ("", "", 0.0),
    ],
)
async def test_keyword_match_extracted_from_expected(expected, output, value):
    result = await score(KeywordMatchEvaluator(), output, expected)
    assert result.value == pytest.approx(value)


async def test_keyword_match_reason_and_threshold():
    ev = KeywordMatchEvaluator(["alpha", "beta", "gamma", "delta"])
    result = await score(ev, "alpha beta gamma", None)
    assert result.value == 0.75
    assert "3/4" in result.reason and "delta" in result.reason
    assert ev.passed(result)  # Route-Switch: correct at 70%
    assert not ev.passed(await score(ev, "alpha beta", None))


# --- token F1 (SQuAD) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "output", "value"),
    [
        ("a cat sat", "The cat sat.", 1.0),  # articles, punctuation and case removed
        # pred: cat sat on mat (4), gold: cat on mat (3), 3 shared: p 3/4, r 1
        ("cat on mat", "the cat sat on the mat", 2 * 0.75 * 1 / 1.75),
        ("cat", "cat cat", 2 * 0.5 * 1 / 1.5),  # counted as multisets
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("The", "", 1.0),  # nothing left of either after normalising
        ("", "cat", 0.0),
        ("cat", "!!!", 0.0),
    ],
)
async def test_token_f1(expected, output, value):
    assert (await score(TokenF1Evaluator(), output, expected)).value == pytest.approx(value)


# --- fuzzy ratio -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "output", "value"),
    [
        ("hello world", "  Hello   WORLD \n", 1.0),
        ("abcd", "abce", 0.75),  # Indel distance 2 over 8 characters
        ("", "", 1.0),
        ("abc", "", 0.0),
        ("hello", "hello!", 1 - 1 / 11),  # punctuation kept: one insertion over 11 characters
    ],
)
async def test_fuzzy(expected, output, value):
    assert (await score(FuzzyRatioEvaluator(), output, expected)).value == pytest.approx(value)


# --- JSON fields -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "output", "value"),
    [
        ('{"a": 1, "b": "Yes", "c": [1, 2]}', '{"a": 1, "b": "Yes", "c": [1, 2]}', 1.0),
        # fenced and wrapped in prose; 1 vs 1.0, " yes " vs "Yes"
        (
            '{"a": 1, "b": "Yes", "c": [1, 2]}',
            'Sure, here it is:\n```json\n{"a": 1.0, "b": " yes ", "c": [1, 2.0]}\n```\nAnything else?',
            1.0,
        ),
        ('{"n": 3}', '{"n": 3.0}', 1.0),
        ('{"n": 3}', '{"n": "3"}', 0.0),  # a string is not a number
        ('{"ok": true}', '{"ok": 1}', 0.0),  # nor is a number a bool
        ('{"x": null}', '{"x": null}', 1.0),
        ('{"a": 1, "b": 2, "c": 3}', '{"a": 1, "b": 5}', 1 / 3),  # b differs, c missing
        ('{"a": 1}', '{"a": 1, "extra": "ignored"}', 1.0),
        ('{"user": {"name": "Ann"}}', '{"user": {"name": "ann "}}', 1.0),  # nested rules too
        ('{"tags": ["a", "b"]}', '{"tags": ["b", "a"]}', 0.0),  # lists are ordered
        ('{"t": "a } b"}', 'Result: {"t": "A } B"} done', 1.0),  # braces inside strings
        ('{"a": 1}', 'Use {curly} braces, then {"a": 1}', 1.0),  # first *parseable* object
        ("{}", '{"anything": 1}', 1.0),
    ],
)
async def test_json_fields(expected, output, value):
    assert (await score(JsonFieldEvaluator(), output, expected)).value == pytest.approx(value)


async def test_json_fields_reason_names_missing_and_different_fields():
    result = await score(JsonFieldEvaluator(), '{"a": 1, "b": 5}', '{"a": 1, "b": 2, "c": 3}')
    assert result.reason == "1/3 fields match; missing: c; different: b"


@pytest.mark.parametrize("output", ["no json here", "", "[1, 2]", '{"a": 1', "```json\n{oops}\n```"])
async def test_json_fields_unparseable_output_scores_zero(output):
    result = await score(JsonFieldEvaluator(), output, '{"a": 1}')
    assert result == Score(0.0, "no JSON object in the output")


async def test_json_fields_label_that_is_not_an_object_raises():
    with pytest.raises(EvaluationError, match="not a JSON object"):
        await score(JsonFieldEvaluator(), '{"a": 1}', "just text")


# --- LLM judge -------------------------------------------------------------------------------------


class FakeJudge:
    def __init__(self, reply="4"):
        self.reply = reply
        self.calls: list[list[dict]] = []

    async def __call__(self, messages):
        self.calls.append(messages)
        await asyncio.sleep(0)  # let concurrent scorings interleave
        return self.reply


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ("4", 0.75),
        ("1", 0.0),
        ("5", 1.0),
        (" 3\n", 0.5),
        ("Score: 5/5", 1.0),
        ("I would say 10 out of 10... no, 2", 0.25),  # the first integer that is 1-5
        ("Rating: 4.", 0.75),
    ],
)
async def test_judge_parses_verdict(reply, value):
    result = await score(LLMJudgeEvaluator(FakeJudge(reply), "Be correct."), "4", "4")
    assert result.value == value
    assert "/5" in result.reason


@pytest.mark.parametrize("reply", ["excellent", "", "0", "10", "4.5", "6 of 10", "-3"])
async def test_judge_unparseable_reply_raises_and_is_not_cached(reply):
    judge = FakeJudge(reply)
    ev = LLMJudgeEvaluator(judge, "Be correct.")
    with pytest.raises(EvaluationError, match="no verdict"):
        await score(ev, "4", "4")
    with pytest.raises(EvaluationError):
        await score(ev, "4", "4")
    assert len(judge.calls) == 2
    assert ev.cache == {}


async def test_judge_prompt_has_rubric_input_expected_and_output():
    judge = FakeJudge()
    inputs = {
        "messages": [
            {"role": "system", "content": "You do sums."},
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}, {"type": "image_url"}]},
        ],
        "variables": {},
    }
    await score(LLMJudgeEvaluator(judge, "Arithmetic must be right."), "It is four.", "4", inputs)
    (messages,) = judge.calls
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Arithmetic must be right." in messages[0]["content"]
    assert "single integer from 1 to 5" in messages[0]["content"]
    user = messages[1]["content"]
    assert "system: You do sums." in user
    assert "user: What is 2+2? [image_url]" in user
    assert "## Expected output\n4" in user
    assert "## Actual output\nIt is four." in user


async def test_judge_without_expected_omits_it():
    judge = FakeJudge("5")
    result = await score(LLMJudgeEvaluator(judge, "Be polite."), "Thank you!", None)
    assert result.value == 1.0
    assert "Expected output" not in judge.calls[0][1]["content"]


async def test_judge_caches_verdicts():
    judge = FakeJudge("4")
    ev = LLMJudgeEvaluator(judge, "Be correct.")
    first = await score(ev, "four", "4")
    second = await score(ev, "four", "4")
    assert first.value == second.value == 0.75
    assert "(cached)" in second.reason and "(cached)" not in first.reason
    assert len(judge.calls) == 1

    # Any change to what the judge would see is a new verdict.
    await score(ev, "4", "4")
    await score(ev, "four", "four")
    await score(ev, "four", "4", {"messages": [{"role": "user", "content": "other"}], "variables": {}})
    await score(LLMJudgeEvaluator(judge, "Other rubric.", ev.cache), "four", "4")
    assert len(judge.calls) == 5


async def test_judge_shared_cache_and_concurrent_duplicates_are_judged_once():
    judge = FakeJudge("2")
    cache: dict[str, int] = {}
    ev = LLMJudgeEvaluator(judge, "Be correct.", cache)
    results = await asyncio.gather(*(score(ev, "five", "4") for _ in range(5)))
    assert {r.value for r in results} == {0.25}
    assert len(judge.calls) == 1
    assert list(cache.values()) == [2]

    # A fresh evaluator given the same (empty-at-start) dict reuses its verdicts.
    await score(LLMJudgeEvaluator(judge, "Be correct.", cache), "five", "4")
    assert len(judge.calls) == 1


# --- missing labels and the factory ----------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if n != "llm_judge"])
async def test_missing_expected_raises(name):
    with pytest.raises(EvaluationError, match="needs an expected output"):
        await score(build_evaluator(name), "anything", None)


def test_evaluator_names_are_the_documented_ones():
    assert tuple(EVALUATORS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_build_evaluator_names(name):
    options = {"judge": FakeJudge()} if name == "llm_judge" else {}
    assert build_evaluator(name, **options).name == name


def test_build_evaluator_passes_options():
    assert build_evaluator("keyword_match", keywords=["x"]).keywords == ("x",)
    judge = FakeJudge()
    ev = build_evaluator("llm_judge", judge=judge, rubric="R")
    assert ev.judge is judge and ev.rubric == "R"


def test_build_evaluator_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        build_evaluator("bleu")
    message = str(info.value)
    assert "'bleu'" in message
    assert all(name in message for name in NAMES)
