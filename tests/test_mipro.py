"""MIPROv2 on a deterministic task whose right instruction and demos are known."""

from __future__ import annotations

import threading

import pytest

from rswitch.optimizer.data import Example, NotEnoughData, split
from rswitch.optimizer.evaluators import build_evaluator
from rswitch.optimizer.mipro import Budget, CallResult, MIPROv2, Settings, copies_training, paired_bootstrap

MAGIC = "ANSWER IN UPPERCASE"
PROPOSALS = [
    "Repeat the user's text for {topic}.",
    f"For {{topic}}: {MAGIC}, repeating the user's words.",
    "Summarise the text about {topic}.",
    "Translate the text about {topic} into French.",
    "This one drops the placeholder.",
]


def task_model(messages, params):
    """Right only with the magic instruction AND some demos; zero-shot it prefixes 'Answer: '."""
    system = messages[0]["content"]
    user = messages[-1]["content"]
    has_demos = len(messages) > 2
    text = user.upper() if MAGIC in system else user
    return text if has_demos else f"Answer: {text}"


def make_task(calls: list):
    async def task(messages, params):
        calls.append(("task", messages))
        return CallResult(task_model(messages, params), cost=0.001, tokens=10)

    return task


def make_proposer(calls: list, proposals=PROPOSALS):
    it = iter(proposals * 10)

    async def proposer(messages, params):
        calls.append(("proposer", messages))
        if "You describe datasets" in messages[0]["content"]:
            return CallResult("Inputs are short phrases; outputs repeat them.")
        return CallResult(next(it))

    return proposer


def rows(n: int, start: int = 0) -> list[Example]:
    words = [
        "alpha beta",
        "gamma",
        "delta epsilon",
        "zeta",
        "eta theta",
        "iota",
        "kappa",
        "lambda mu",
        "nu xi",
        "omicron",
        "pi rho",
        "sigma",
        "tau",
        "upsilon",
        "phi chi",
        "psi",
        "omega",
        "red",
        "green",
        "blue",
        "cyan",
        "teal",
        "navy",
        "gold",
    ]
    return [
        Example(
            i,
            f"2026-01-{(i % 28) + 1:02d}T00:00:{i % 60:02d}Z",
            [{"role": "user", "content": words[i % len(words)] + f" {i}"}],
            {"topic": "colours"},
            "",
            words[i % len(words)].upper() + f" {i}",
            None,
        )
        for i in range(start, start + n)
    ]


def settings(**kw) -> Settings:
    base = dict(
        seed=3,
        num_trials=24,
        num_instructions=5,
        num_demo_sets=4,
        minibatch_size=5,
        full_eval_every=4,
        bootstrap_resamples=500,
    )
    base.update(kw)
    return Settings(**base)


async def test_search_finds_the_right_instruction_and_demos_and_the_gate_promotes():
    calls: list = []
    data = split(rows(40), seed=1)
    opt = MIPROv2(make_task(calls), build_evaluator("exact_match"), settings(), proposer=make_proposer(calls))
    res = await opt.run("t", "Repeat the user's text for {topic}.", [], data)
    assert res.stopped is None
    i, d = res.winner
    assert MAGIC in res.instructions[i] and res.demo_sets[d]  # the known right answer
    assert res.winner_val == 1.0 and res.baseline_val == 0.0
    assert res.incumbent_test == 0.0 and res.winner_test == 1.0
    assert res.promote and res.ci[0] > 0 and res.verdict.startswith("promote")
    # proposals that drop the template's variables never become candidates
    assert "This one drops the placeholder." not in res.instructions
    assert res.instructions[0] == "Repeat the user's text for {topic}."  # the incumbent is candidate 0
    assert len(res.trials) == 24 and res.calls["proposer"] >= 2
    assert res.tokens == 10 * res.calls["task"] and res.cost == pytest.approx(0.001 * res.calls["task"])


async def test_the_gate_keeps_the_incumbent_when_nothing_is_better():
    calls: list = []
    data = split(rows(40), seed=1)
    useless = [
        "Repeat the text for {topic}, politely.",
        "Echo the words about {topic}.",
        "Say the text for {topic}.",
    ]
    opt = MIPROv2(
        make_task(calls),
        build_evaluator("exact_match"),
        settings(num_trials=8),
        proposer=make_proposer(calls, useless),
    )
    res = await opt.run("t", f"For {{topic}}: {MAGIC}.", [{"user": "a", "assistant": "A"}], data)
    assert res.baseline_val == 1.0
    assert not res.promote and res.verdict.startswith("kept the incumbent")


async def test_budget_caps_stop_the_run_and_promote_nothing():
    calls: list = []
    opt = MIPROv2(
        make_task(calls),
        build_evaluator("exact_match"),
        settings(),
        proposer=make_proposer(calls),
        budget=Budget(max_calls=30),
    )
    res = await opt.run("t", "Repeat the user's text for {topic}.", [], split(rows(40), seed=1))
    assert res.stopped == "budget" and not res.promote and "budget" in res.verdict
    assert sum(res.calls.values()) == 30 == len(calls)


async def test_cancellation_is_prompt():
    calls: list = []
    cancel = threading.Event()
    opt = MIPROv2(
        make_task(calls),
        build_evaluator("exact_match"),
        settings(),
        proposer=make_proposer(calls),
        cancel=cancel,
        on_trial=lambda t: cancel.set() if t["trial"] == 1 else None,
    )
    res = await opt.run("t", "Repeat the user's text for {topic}.", [], split(rows(40), seed=1))
    assert res.stopped == "cancelled" and len(res.trials) == 2 and not res.promote


async def test_each_run_has_a_fresh_study_and_scores_are_cached():
    calls: list = []
    data = split(rows(40), seed=1)
    opt = MIPROv2(
        make_task(calls),
        build_evaluator("exact_match"),
        settings(num_trials=6),
        proposer=make_proposer(calls),
    )
    first = await opt.run("t", "Repeat the user's text for {topic}.", [], data)
    opt2 = MIPROv2(
        make_task(calls),
        build_evaluator("exact_match"),
        settings(num_trials=6),
        proposer=make_proposer(calls),
    )
    second = await opt2.run("t", "Repeat the user's text for {topic}.", [], data)
    assert len(first.trials) == len(second.trials) == 6  # no trials carried over from an earlier study
    assert first.run_id != second.run_id
    task_calls = [m for k, m in calls if k == "task"]
    keys = [(str(m[0]), str(m[1:-1]), m[-1]["content"]) for m in task_calls[: len(task_calls) // 2]]
    assert len(keys) == len(set(keys))  # within a run, no (candidate, row) is scored twice


def test_splits_are_by_time_seeded_and_keep_duplicate_inputs_together():
    data = rows(30)
    newest = sorted(data, key=lambda e: e.created_at)[-1]
    # an old copy of the newest input: it must follow its twin into test, never be trained on
    dup = Example(999, "2025-01-01T00:00:00Z", newest.messages, newest.variables, "", "X", None)
    s = split(data + [dup], seed=5)
    assert any(e.row_id == 999 for e in s.test) and any(e.row_id == newest.row_id for e in s.test)
    keys = [set(e.key for e in part) for part in (s.train, s.val, s.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    oldest_test = min(e.created_at for e in s.test if e.row_id != 999)
    assert all(e.created_at <= oldest_test for e in s.train + s.val)  # the newest inputs are the test split
    again = split(data + [dup], seed=5)
    assert [e.row_id for e in again.val] == [e.row_id for e in s.val]  # fixed by seed
    other = split(data + [dup], seed=6)
    assert [e.row_id for e in other.val] != [e.row_id for e in s.val]
    with pytest.raises(NotEnoughData):
        split(rows(4), seed=1)


def test_copy_detection_and_bootstrap_interval():
    train = rows(3)
    assert copies_training(
        "Say exactly: one two three four five six seven eight nine",
        [
            Example(
                1,
                "t",
                [{"role": "user", "content": "x one two three four five six seven eight y"}],
                {},
                "",
                "z",
                None,
            )
        ],
    )
    assert not copies_training("Answer in uppercase.", train)
    lo, hi = paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1], resamples=200, confidence=0.95, seed=1)
    assert lo == hi == 1
    lo, hi = paired_bootstrap([0, 1, 0, 1], [1, 0, 1, 0], resamples=200, confidence=0.95, seed=1)
    assert lo < 0 < hi


async def test_degenerate_proposals_are_rejected():
    calls: list = []
    junk = [
        "Improved example:\n{topic}\n" * 12,
        "For {topic}: " + "very " * 400 + MAGIC,
        # it continued the proposal prompt (the 135M proposer did so on extract-bench)
        f"Here's a corrected instruction:\n\nTask summary: words.\n\nCurrent instruction:\nFor {{topic}}: {MAGIC}.",
        f"Here's a corrected instruction:\n\nFor {{topic}}: {MAGIC}.",
    ]
    opt = MIPROv2(
        make_task(calls),
        build_evaluator("exact_match"),
        settings(num_trials=4, num_instructions=2),
        proposer=make_proposer(calls, junk),
    )
    res = await opt.run("t", "Repeat the user's text for {topic}.", [], split(rows(40), seed=1))
    # the last one's preamble is dropped: the instruction is what follows it
    assert res.instructions == ["Repeat the user's text for {topic}.", f"For {{topic}}: {MAGIC}."]


async def test_when_the_demos_do_the_work_the_incumbent_instruction_is_kept_with_them():
    """Any instruction scores 1.0 given demos: the winner is the incumbent's own instruction with
    the winning demos (fewer changes, same score), not whichever rewrite was rescored first."""
    calls: list = []

    async def demos_decide(messages, params):
        calls.append(("task", messages))
        user = messages[-1]["content"]
        return CallResult(user.upper() if len(messages) > 2 else user, cost=0.001, tokens=10)

    longer = [
        "Please, for the topic {topic}, carefully repeat every word the user wrote, in order.",
        "For {topic}: restate the user's message exactly, word for word, without commentary.",
    ]
    opt = MIPROv2(
        demos_decide,
        build_evaluator("exact_match"),
        settings(num_trials=12, num_instructions=3),
        proposer=make_proposer(calls, longer),
    )
    res = await opt.run("t", "Repeat the user's text for {topic}.", [], split(rows(40), seed=1))
    i, d = res.winner
    assert i == 0 and res.demo_sets[d], (res.instructions[i], res.demo_sets[d])
    assert res.winner_val == 1.0 and res.promote


def test_a_tie_on_validation_goes_to_the_shorter_prompt():
    opt = MIPROv2(None, build_evaluator("exact_match"), settings())
    opt.instructions = ["Short {topic}.", "A much longer instruction about {topic} with many words."]
    opt.demo_sets = [[], [{"user": "a", "assistant": "A"}]]
    assert opt._better(((1, 0), 0.8), ((0, 0), 0.8)) == ((0, 0), 0.8)  # shorter wins the tie
    assert opt._better(((0, 0), 0.8), ((1, 0), 0.8)) == ((0, 0), 0.8)  # and keeps it
    assert opt._better(((0, 0), 0.8), ((1, 1), 0.81)) == ((1, 1), 0.81)  # a better score wins outright


def labelled_rows(labels: list[str]) -> list[Example]:
    return [
        Example(
            i,
            f"2026-01-01T00:00:{i:02d}Z",
            [{"role": "user", "content": f"q{i}"}],
            {"topic": "t"},
            "",
            lab,
            None,
        )
        for i, lab in enumerate(labels)
    ]


async def test_the_first_labelled_demo_set_covers_every_label():
    train = labelled_rows(["common"] * 25 + ["rare"] * 3 + ["rarest"] * 2)

    async def wrong(messages, params):
        return CallResult("?")

    opt = MIPROv2(wrong, build_evaluator("exact_match"), settings(num_demo_sets=3, max_labeled_demos=4))
    await opt._demo_sets("Classify for {topic}.", [], train)
    first = opt.demo_sets[1]  # after the incumbent's (empty) set
    assert len(first) == 4 and {d["assistant"] for d in first} == {"common", "rare", "rarest"}


async def test_bootstrapping_asks_with_labelled_demos_in_context():
    """A model that is right only with demos in context still yields bootstrapped demos."""
    asked = []

    async def needs_demos(messages, params):
        asked.append(len(messages))
        user = messages[-1]["content"]
        return CallResult(user.upper() if len(messages) > 2 else user)

    opt = MIPROv2(needs_demos, build_evaluator("exact_match"), settings(num_demo_sets=4))
    await opt._demo_sets("Repeat for {topic}.", [], rows(30))
    bootstrapped = [s for s in opt.demo_sets[2:] if s and all(d["assistant"].isupper() for d in s)]
    assert bootstrapped and min(asked) > 2  # every bootstrap call had demos before the row


def test_light_preset_halves_the_instructions_when_demos_are_searched():
    """DSPy's light preset: with demos in the search, 3 instructions and 6 demo sets; zero-shot, 6."""
    s = Settings.auto("light")
    assert (s.num_instructions, s.num_demo_sets) == (3, 6)
    zero_shot = Settings.auto("light", max_labeled_demos=0, max_bootstrapped_demos=0)
    assert zero_shot.num_instructions == 6
    assert Settings.auto("light", num_instructions=5).num_instructions == 5  # an explicit count wins


async def test_labelled_demo_sets_each_cover_every_label_and_end_on_different_labels():
    labels = ["a", "b", "c", "d", "e"]
    train = labelled_rows([labels[i % 5] if i < 30 else "a" for i in range(50)])

    async def wrong(messages, params):
        return CallResult("?")  # nothing bootstraps: every extra set is labelled

    opt = MIPROv2(wrong, build_evaluator("exact_match"), settings(num_demo_sets=6, max_labeled_demos=6))
    await opt._demo_sets("Classify for {topic}.", [], train)
    labelled = opt.demo_sets[1:]
    assert len(labelled) == 5 and len({str(s) for s in labelled}) == 5  # five different draws
    for demos in labelled:
        assert len(demos) == 6 and {d["assistant"] for d in demos} == set(labels)
    last = [demos[-1]["assistant"] for demos in labelled]
    assert all(x != y for x, y in zip(last, last[1:], strict=False)), last


async def test_bootstrapped_sets_mix_the_models_answers_with_labelled_rows_of_the_missing_labels():
    labels = ["a", "b", "c", "d", "e"]
    train = labelled_rows([labels[i % 5] for i in range(40)])
    answers = {f"q{i}": labels[i % 5] for i in range(40)}

    async def right_with_demos(messages, params):
        return CallResult(answers[messages[-1]["content"]] if len(messages) > 2 else "?")

    opt = MIPROv2(
        right_with_demos,
        build_evaluator("exact_match"),
        settings(num_demo_sets=4, max_labeled_demos=6, max_bootstrapped_demos=4),
    )
    await opt._demo_sets("Classify for {topic}.", [], train)
    boot = opt.demo_sets[2]  # incumbent's, labelled, then bootstrapped
    assert len(boot) == 6 and {d["assistant"] for d in boot} == set(labels)
    assert len(opt._answers) >= 4  # four of them are the model's own answers, one label each at most


def fixed_demo_sets(opt: MIPROv2, sets: list[list[dict[str, str]]]) -> None:
    async def demo_sets(instruction, demos, train):
        opt.demo_sets = [list(demos)] + sets

    opt._demo_sets = demo_sets


async def test_every_demo_set_is_first_tried_with_the_current_instruction_on_the_same_rows():
    seen: list[tuple[int, int, list[int]]] = []
    opt = MIPROv2(
        make_task([]),
        build_evaluator("exact_match"),
        settings(num_trials=5, num_instructions=1, minibatch_size=4, full_eval_every=100),
    )
    fixed_demo_sets(opt, [[{"user": f"u{k}", "assistant": f"U{k}"}] for k in range(3)])
    evaluate = opt.evaluate

    async def recording(i, d, rows):
        seen.append((i, d, [r.row_id for r in rows]))
        return await evaluate(i, d, rows)

    opt.evaluate = recording
    res = await opt.run("t", "Repeat the user's text for {topic}.", [], split(rows(40), seed=1))
    assert [(t["instruction"], t["demo_set"]) for t in res.trials[:3]] == [(0, 1), (0, 2), (0, 3)]
    screening = seen[1:4]  # after the incumbent's full validation score
    assert len({tuple(rows) for _, _, rows in screening}) == 1 and len(screening[0][2]) == 4


async def test_the_winner_is_the_best_on_all_of_validation_not_the_best_minibatch():
    """One demo set is right only on the first rows it is asked (a lucky minibatch), another on
    about half of every row: full rescoring finds the lucky one out, and no candidate is rescored
    twice."""
    lucky_rows: set[str] = set()

    async def task(messages, params):
        user = messages[-1]["content"]
        demo = messages[1]["content"] if len(messages) > 2 else None
        if demo == "lucky" and (len(lucky_rows) < 5 or user in lucky_rows):
            lucky_rows.add(user)
            return CallResult(user.upper())
        if demo == "steady" and int(user.split()[-1]) % 2 == 0:
            return CallResult(user.upper())
        return CallResult(user)

    s = settings(num_trials=6, num_instructions=1, minibatch_size=5, full_eval_every=2)
    opt = MIPROv2(task, build_evaluator("exact_match"), s)
    fixed_demo_sets(opt, [[{"user": "lucky", "assistant": "L"}], [{"user": "steady", "assistant": "S"}]])
    res = await opt.run("t", "Repeat the user's text for {topic}.", [], split(rows(60), seed=1))
    full = [(tuple(t["full_candidate"]), t["full_score"]) for t in res.trials if t["full_score"] is not None]
    assert [c for c, _ in full][:2] == [(0, 1), (0, 2)] and len(full) == len({c for c, _ in full})
    assert res.trials[0]["minibatch_score"] == 1.0 > res.trials[1]["minibatch_score"]
    assert dict(full)[(0, 1)] < dict(full)[(0, 2)]
    assert res.winner == (0, 2) and res.winner_val == dict(full)[(0, 2)]
