"""The reflective instruction search (`--strategy reflective`): a proposer shown the failures
rewrites the instruction; a Pareto pool, the call budget and MIPROv2's promotion gate bound it."""

from __future__ import annotations

import pytest

from rswitch.optimizer.data import Example, split
from rswitch.optimizer.evaluators import build_evaluator
from rswitch.optimizer.mipro import Budget, CallResult
from rswitch.optimizer.reflective import (
    ReflectiveSearch,
    ReflectiveSettings,
    clean_proposal,
    pareto_pool,
    restore_variables,
)
from rswitch.optimizer.service import OptimizeError, optimize
from tests.test_mipro import MAGIC
from tests.test_optimizer_service import CONFIG, reply

SEED = "Repeat the user's text for {topic}."
RIGHT = f"For {{topic}}: {MAGIC}. Answer with the user's words in capitals."
DEMOS = [{"user": "one", "assistant": "one"}]  # the incumbent's demos: wrong for the task, and kept


def numbered(n: int) -> list[Example]:
    """Rows whose label is the input in capitals; created in order, so the last 20% are the test split."""
    return [
        Example(
            i,
            f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
            [{"role": "user", "content": f"word {i}"}],
            {"topic": "words"},
            "",
            f"WORD {i}",
            None,
        )
        for i in range(n)
    ]


def answer(messages: list[dict], right_below: int = 10**9) -> str:
    """The task model: right (capitals) only when the instruction holds the magic phrase, whatever
    the demos; `right_below` limits that to rows numbered below it (a candidate that overfits)."""
    user = messages[-1]["content"]
    number = int(user.split()[-1])
    return user.upper() if MAGIC in messages[0]["content"] and number < right_below else user


def scripted_task(calls: list, right_below: int = 10**9):
    async def task(messages, params):
        calls.append(("task", messages))
        return CallResult(answer(messages, right_below), cost=0.001, tokens=10)

    return task


def stronger_proposer(calls: list, useless: bool = False):
    """Shown failures whose expected output is the input in capitals, it writes the instruction
    that says so; it never sees a failure it could learn that from otherwise. `useless`: it
    writes a new, unhelpful variant every time."""
    count = 0

    async def proposer(messages, params):
        nonlocal count
        count += 1
        calls.append(("proposer", messages))
        shown = messages[-1]["content"]
        if useless:
            return CallResult(f"Repeat the words about {{topic}}, version {count}.")
        if "WRONG" in shown and "Expected output: WORD" in shown:
            return CallResult(f"```\n{RIGHT}\n```")
        return CallResult("Repeat the user's text for {topic}, carefully.")

    return proposer


def rs(**kw) -> ReflectiveSettings:
    return ReflectiveSettings(**{"seed": 1, "bootstrap_resamples": 500, "max_proposals": 4, **kw})


async def test_a_stronger_proposer_shown_the_failures_wins_with_the_instruction_alone():
    calls: list = []
    data = split(numbered(40), seed=1)
    search = ReflectiveSearch(
        scripted_task(calls), build_evaluator("exact_match"), rs(), proposer=stronger_proposer(calls)
    )
    res = await search.run("t", SEED, DEMOS, data)
    assert res.stopped is None, res.verdict
    winner = res.winner_candidate
    assert winner.instruction == RIGHT  # the fence the proposer wrapped it in is gone
    assert winner.demos == DEMOS  # the demos are the incumbent's: the instruction won
    assert res.baseline_val == 0.0 and res.winner_val == 1.0
    assert res.incumbent_test == 0.0 and res.winner_test == 1.0
    assert res.promote and res.ci[0] > 0 and res.verdict.startswith("promote")
    # the proposer saw the failing rows with the evaluator's reason and the expected output
    shown = next(m for kind, m in calls if kind == "proposer")[-1]["content"]
    assert "WRONG, score 0.00: output differs from expected" in shown and "Expected output: WORD" in shown
    assert res.trials[0]["full_score"] == 1.0 and res.trials[0]["instruction"] == 1
    assert res.calls["proposer"] >= 1 and res.calls["task"] + res.calls["proposer"] == len(calls)


def test_a_proposal_that_drops_a_variable_gets_the_parents_sentence_back():
    parent = "Classify the message. Which topic is it about: {labels}? Answer with one label."
    fixed, restored = restore_variables("Read the message and answer with one topic.", parent)
    assert restored == ["labels"]
    assert fixed == "Read the message and answer with one topic.\n\nWhich topic is it about: {labels}?"
    two = "Extract {keys} as JSON.\nUse only the text of {source}."
    assert restore_variables("Extract the fields as JSON.", two)[0].endswith(
        "\n\nExtract {keys} as JSON. Use only the text of {source}."
    )
    assert restore_variables("Say {x} again.", "Say {x}.") == ("Say {x} again.", [])


async def test_a_proposal_without_the_templates_variable_is_kept_with_it_restored():
    """A small proposer writes the right rule but drops `{topic}`: the rule is kept, the variable
    carried over, and the instruction wins; a proposal adding an unknown variable, or writing back
    the reflection prompt's headings, is refused."""
    calls: list = []
    data = split(numbered(40), seed=1)
    dropped = f"{MAGIC}. Answer with the user's words in capitals."
    echoed = "The user's message is about\n\nExpected output:\n\nHere's how to fix the mistakes."
    replies = iter(["Use {unknown} words.", echoed, dropped])

    async def proposer(messages, params):
        calls.append(("proposer", messages))
        return CallResult(next(replies, "Repeat the user's text for {topic}, carefully."))

    search = ReflectiveSearch(scripted_task(calls), build_evaluator("exact_match"), rs(), proposer=proposer)
    res = await search.run("t", SEED, DEMOS, data)
    assert res.trials[0]["note"] == "proposal refused: changes the template's variables"
    assert res.trials[1]["note"] == "proposal refused: copies the proposer prompt's layout"
    assert res.trials[2]["note"] == "kept {topic} from the parent"
    assert res.winner_candidate.instruction == f"{dropped}\n\n{SEED}"
    assert res.winner_test == 1.0 and res.promote


async def test_the_search_stops_at_the_call_budget_and_still_ends_at_the_gate():
    calls: list = []
    data = split(numbered(40), seed=1)
    budget = Budget(max_calls=60)
    search = ReflectiveSearch(
        scripted_task(calls),
        build_evaluator("exact_match"),
        rs(max_proposals=50),
        proposer=stronger_proposer(calls, useless=True),
        budget=budget,
    )
    res = await search.run("t", SEED, DEMOS, data)
    assert len(calls) == budget.total_calls <= 60
    assert 0 < len(res.trials) < 50
    assert res.stopped is None and res.incumbent_test is not None  # the gate's calls were kept aside
    assert "stopped after" in res.verdict and "call budget" in res.verdict
    assert not res.promote


async def test_a_budget_too_small_for_the_baseline_and_gate_stops_the_run_and_promotes_nothing():
    calls: list = []
    data = split(numbered(40), seed=1)
    budget = Budget(max_calls=len(data.test) * 2 + 3)
    search = ReflectiveSearch(
        scripted_task(calls),
        build_evaluator("exact_match"),
        rs(),
        proposer=stronger_proposer(calls),
        budget=budget,
    )
    res = await search.run("t", SEED, DEMOS, data)
    assert res.stopped == "budget" and not res.promote
    assert "does not cover scoring the current prompt" in res.verdict
    assert len(calls) <= budget.max_calls


def test_the_pareto_pool_keeps_a_row_winner_and_drops_dominated_candidates():
    scores = {
        0: [1, 1, 0, 0, 0],  # every row it wins, #1 wins too: dominated
        1: [1, 1, 1, 1, 0],  # best on average
        2: [0, 0, 0, 0, 1],  # worst but one: the only one right on the last row
        3: [1, 0, 0, 0, 0],  # dominated
        4: [0, 0, 0, 0, 0],  # best on no row
    }
    assert pareto_pool(scores) == {1: 4, 2: 1}
    # a tie on every row keeps one of the two: the older
    assert pareto_pool({0: [1, 0], 1: [1, 0], 2: [0, 1]}) == {0: 1, 2: 1}
    # beyond pool_size the candidate best on fewer rows goes
    assert pareto_pool(scores, pool_size=1) == {1: 4}


async def test_parents_come_from_the_pool_weighted_by_the_rows_they_win():
    calls: list = []
    search = ReflectiveSearch(scripted_task(calls), build_evaluator("exact_match"), rs())
    search.val_scores = {0: [1.0, 1.0, 1.0, 0.0], 1: [0.0, 0.0, 0.0, 1.0], 2: [1.0, 0.0, 0.0, 0.0]}
    picks = [search.pick_parent() for _ in range(400)]
    assert set(picks) == {0, 1}  # #2 is dominated by #0
    assert 250 < picks.count(0) < 350  # about three in four


async def test_the_gate_rejects_a_winner_that_is_better_on_validation_but_not_on_test():
    calls: list = []
    data = split(numbered(40), seed=1)
    # under the new instruction the model is right on older rows only: every validation row, no test row
    cut = min(r.row_id for r in data.test)
    assert all(r.row_id < cut for r in data.val)
    search = ReflectiveSearch(
        scripted_task(calls, right_below=cut),
        build_evaluator("exact_match"),
        rs(),
        proposer=stronger_proposer(calls),
    )
    res = await search.run("t", SEED, DEMOS, data)
    assert res.winner_val == 1.0 > res.baseline_val and res.winner_candidate.instruction == RIGHT
    assert res.winner_test == res.incumbent_test == 0.0
    assert not res.promote and res.verdict.startswith("kept the incumbent")


def test_settings_and_proposals_are_checked():
    with pytest.raises(ValueError, match="minibatch_size must be a whole number >= 1; got 0"):
        ReflectiveSettings(minibatch_size=0)
    assert clean_proposal("New instruction: Say {x}.") == "Say {x}."
    assert clean_proposal("```text\nSay {x}.\n```") == "Say {x}."


async def test_through_the_service_the_proposer_combination_rewrites_and_promotes(make_gateway):
    """The same run on a live core: the mock providers scripted as a weak task model and a
    stronger proposer combination; the winner is written back with the incumbent's demos."""
    gw = await make_gateway(CONFIG)
    core = gw.core
    rows = numbered(40)
    core.datasets.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows]
    )
    seen: list = []

    async def task(call):
        return reply(answer(call.messages))

    async def ideas(call):
        text = call.messages[-1]["content"]
        seen.append(text)
        return reply(RIGHT if "WRONG" in text and "Expected output: WORD" in text else "Say {topic}.")

    core.providers["task"].complete = task
    core.providers["ideas"].complete = ideas
    stages: list[str] = []
    result, version = await optimize(
        core,
        "echo",
        settings=rs(),
        evaluator="exact_match",
        proposer="echo-ideas",
        on_stage=stages.append,
        budget=Budget(500),
    )
    assert result.promote and version == 2, result.verdict
    tpl = core.registry.get("echo")
    assert tpl.template == RIGHT and tpl.demos == [] and tpl.provenance["strategy"] == "reflective"
    assert seen, "the proposer combination was asked"
    assert (
        stages[:2] == ["loading examples", "scoring the current prompt"]
        and stages[-1] == "testing the winner"
    )
    assert "round 1/4: reflecting on 3 failure(s)" in stages


async def test_an_unknown_proposer_combination_is_a_clear_error(make_gateway):
    gw = await make_gateway(CONFIG)
    with pytest.raises(OptimizeError, match="unknown proposer combination id 'nope'"):
        await optimize(gw.core, "echo", settings=rs(), proposer="nope")


def test_the_reflective_settings_in_config_are_checked_with_their_key_path():
    from rswitch.config import ConfigError, parse_config
    from rswitch.optimizer.scheduler import search_settings

    with pytest.raises(
        ConfigError, match=r"gateway\.optimization\.strategy: Input should be 'mipro' or 'reflective'"
    ):
        parse_config({"gateway": {"optimization": {"strategy": "gepa"}}})
    with pytest.raises(
        ConfigError, match=r"gateway\.optimization\.reflective\.pool_size: .*greater than or equal to 1"
    ):
        parse_config({"gateway": {"optimization": {"reflective": {"pool_size": 0}}}})
    cfg = parse_config(
        {"gateway": {"optimization": {"strategy": "reflective", "reflective": {"pool_size": 4}}}}
    )
    settings = search_settings(cfg.gateway.optimization, seed=2)
    assert isinstance(settings, ReflectiveSettings) and (settings.pool_size, settings.seed) == (4, 2)
