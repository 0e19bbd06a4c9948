"""MIPROv2 (Opsahl-Ong et al., "Optimizing Instructions and Demonstrations for Multi-Stage
Language Model Programs"; DSPy's `MIPROv2`) for one prompt: search instruction × demo set.

1. Demo sets: zero-shot, class-balanced labelled-only sets, and sets bootstrapped by running
   the task model on train rows (labelled demos in context) and keeping answers that score at
   or above the evaluator's threshold, filled up with labelled rows of the labels they lack.
2. Instruction candidates: the current instruction (always candidate 0) plus proposals from
   a proposer model, grounded in a summary of the data, the current instruction, sample demos
   and a random tip. Proposals that copy long spans of training rows, or change the
   template's variables, are rejected.
3. Search: optuna's TPE sampler (seeded, multivariate), maximising, a fresh study per run,
   seeded with the incumbent's score; the current instruction is tried with every demo set
   first; each trial is scored on a minibatch of validation rows (the same rows for every
   candidate's k-th minibatch), and every few trials the best minibatch average not yet
   rescored is scored on the full validation set. The winner is the best full-validation
   score — never a minibatch fluke, never the minimum.
4. Gate: the winner replaces the incumbent only if, on the held-out test split, a paired
   bootstrap confidence interval of (winner − incumbent) lies above zero.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from rswitch.optimizer.data import Example, Splits
from rswitch.optimizer.evaluators import EvaluationError, Evaluator
from rswitch.templates import placeholders, render

optuna.logging.set_verbosity(optuna.logging.WARNING)

# DSPy's presets: n candidates (instructions and demo sets each) and the validation size.
AUTO = {
    "light": {"n": 6, "val_size": 100},
    "medium": {"n": 12, "val_size": 300},
    "heavy": {"n": 18, "val_size": 1000},
}

TIPS = [
    "Be concise: say only what the task needs.",
    "Be precise about the expected output format.",
    "Describe the task step by step.",
    "Mention the most common mistake to avoid.",
    "Write it as an expert in this domain would.",
    "Make the instruction short and direct.",
    "Explain what a perfect answer looks like.",
]
# the proposal prompt's headings (_proposal_prompt): a proposal that writes them back continued it
PROPOSAL_HEADINGS = ("Task summary:", "Current instruction:", "Example inputs and", "Tip:")
COPY_SPAN_WORDS = 8  # a proposal sharing this many consecutive words with a training row is a copy


@dataclass
class CallResult:
    text: str
    cost: float = 0.0
    tokens: int = 0


TaskFn = Callable[[list[dict[str, Any]], dict[str, Any]], Awaitable[CallResult]]


class BudgetExhausted(Exception):
    pass


class Cancelled(Exception):
    pass


@dataclass
class Budget:
    max_calls: int = 2000
    max_cost: float = 5.0
    calls: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    tokens: int = 0

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def check(self) -> None:
        if self.total_calls >= self.max_calls:
            raise BudgetExhausted(f"the call budget ({self.max_calls}) is used up")
        if self.cost >= self.max_cost:
            raise BudgetExhausted(f"the cost budget (${self.max_cost:g}) is used up")

    def charge(self, kind: str, result: CallResult) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.cost += result.cost
        self.tokens += result.tokens


@dataclass
class Settings:
    seed: int = 0
    num_trials: int | None = None
    num_instructions: int = 6
    num_demo_sets: int = 6
    max_bootstrapped_demos: int = 3
    max_labeled_demos: int = 3
    minibatch_size: int = 10
    full_eval_every: int = 5
    max_val: int = 100
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    task_params: dict[str, Any] = field(default_factory=lambda: {"temperature": 0})

    @classmethod
    def auto(cls, preset: str, **overrides: Any) -> Settings:
        if preset not in AUTO:
            raise ValueError(f"--auto must be one of {', '.join(AUTO)}; got {preset!r}")
        n = AUTO[preset]["n"]
        base = {"num_instructions": n, "num_demo_sets": n, "max_val": AUTO[preset]["val_size"]}
        base.update({k: v for k, v in overrides.items() if v is not None})
        demos = base.get("max_labeled_demos", cls.max_labeled_demos) or base.get(
            "max_bootstrapped_demos", cls.max_bootstrapped_demos
        )
        if demos and overrides.get("num_instructions") is None:
            # DSPy: with demos in the search, half as many instructions (demos are the better spend)
            base["num_instructions"] = max(1, n // 2)
        return cls(**base)

    def trials(self) -> int:
        if self.num_trials:
            return self.num_trials
        # DSPy: max(2 · variables · log2(candidates), 1.5 · candidates), with 2 variables here
        n = max(self.num_instructions, self.num_demo_sets)
        return int(max(2 * 2 * math.log2(max(n, 2)), 1.5 * n))


@dataclass
class Candidate:
    instruction: str
    demos: list[dict[str, str]]

    def messages(self, row: Example) -> list[dict[str, Any]]:
        system = render(self.instruction, row.variables)
        turns: list[dict[str, Any]] = [{"role": "system", "content": system}]
        for d in self.demos:
            turns += [
                {"role": "user", "content": d["user"]},
                {"role": "assistant", "content": d["assistant"]},
            ]
        return turns + list(row.messages)


@dataclass
class RunResult:
    run_id: str
    template_id: str
    instructions: list[str]
    demo_sets: list[list[dict[str, str]]]
    trials: list[dict[str, Any]]
    baseline_val: float | None = None
    winner: tuple[int, int] | None = None
    winner_val: float | None = None
    incumbent_test: float | None = None
    winner_test: float | None = None
    ci: tuple[float, float] | None = None
    promote: bool = False
    verdict: str = ""
    stopped: str | None = None  # budget | cancelled
    calls: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def winner_candidate(self) -> Candidate | None:
        if self.winner is None:
            return None
        return Candidate(self.instructions[self.winner[0]], self.demo_sets[self.winner[1]])


def paired_bootstrap(
    a: list[float], b: list[float], *, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Confidence interval of mean(b − a) over paired rows."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - confidence) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + confidence) / 2 * resamples))]
    return lo, hi


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def copies_training(proposal: str, rows: list[Example], span: int = COPY_SPAN_WORDS) -> bool:
    words = _words(proposal)
    shingles = {tuple(words[i : i + span]) for i in range(len(words) - span + 1)}
    if not shingles:
        return False
    for row in rows:
        for text in (row.user_text(), row.target or ""):
            w = _words(text)
            if any(tuple(w[i : i + span]) in shingles for i in range(len(w) - span + 1)):
                return True
    return False


_FENCE = re.compile(r"\A```[\w-]*\n(.*?)\n?```\s*\Z", re.S)
_PREAMBLE = re.compile(
    r"\A(?:(?:here(?:'s| is)|this is) (?:an? |the |my )?(?:new |improved |updated |corrected |revised )?"
    r"instruction\s*[:.]|(?:new |improved |updated |corrected |revised )?instruction\s*:)\s*",
    re.I,
)


def clean_proposal(text: str) -> str:
    """The instruction a proposer wrote, without a code fence or a preamble ("New instruction:",
    "Here's a corrected instruction:")."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    return _PREAMBLE.sub("", text).strip()


def _echoes(proposal: str, current: str, headings: tuple[str, ...]) -> bool:
    """Whether a proposal writes back the proposer prompt's own headings at the start of a line
    ("Task summary:", "Current instruction:"), which the current instruction does not have: the
    proposer continued its prompt instead of writing an instruction."""
    pattern = re.compile(r"^\s*(?:" + "|".join(headings) + ")", re.I | re.M)
    return bool(pattern.search(proposal)) and not pattern.search(current)


def refusal(
    proposal: str,
    current: str,
    candidates: list[str],
    train: list[Example],
    headings: tuple[str, ...],
    max_chars: int,
) -> str | None:
    """Why a proposed instruction cannot be a candidate, or None when it can; both searches ask.
    `headings`: the proposer prompt's own (see `_echoes`); `max_chars`: longer is a ramble."""
    if not proposal:
        return "empty"
    if proposal in (x.strip() for x in candidates):
        return "already a candidate"
    if set(placeholders(proposal)) != set(placeholders(current)):
        return "changes the template's variables"  # it must render with the variables traffic sends
    if len(proposal) > max_chars:
        return "too long"
    lines = [ln.strip() for ln in proposal.splitlines() if ln.strip()]
    if len(lines) >= 4 and len(set(lines)) < len(lines) / 2:
        return "mostly repeated lines"  # a degenerate generation
    if copies_training(proposal, train):
        return "copies training rows"
    if _echoes(proposal, current, headings):
        return "copies the proposer prompt's layout"
    return None


class Search:
    """What every search strategy shares: the task and proposer calls, charged to one budget and
    stopped by the cancel event, and the stage and trial callbacks. MIPROv2 and the reflective
    search (reflective.py) take the same constructor, so the service, scheduler and CLI run either."""

    def __init__(
        self,
        task: TaskFn,
        evaluator: Evaluator,
        settings: Any,
        *,
        proposer: TaskFn | None = None,
        budget: Budget | None = None,
        cancel: threading.Event | None = None,
        on_trial: Callable[[dict[str, Any]], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> None:
        self.task = task
        self.proposer = proposer or task
        self.evaluator = evaluator
        self.s = settings
        self.budget = budget or Budget()
        self.cancel = cancel or threading.Event()
        self.on_trial = on_trial
        self.on_stage = on_stage  # told what the run is doing, e.g. before trial 0 (which takes a while)
        self.rng = random.Random(settings.seed)

    def _before_call(self) -> None:
        """A strategy's own reason to stop before a call (the reflective search's gate reserve)."""

    async def _call(
        self, kind: str, fn: TaskFn, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> CallResult:
        if self.cancel.is_set():
            raise Cancelled("the run was cancelled")
        self._before_call()
        self.budget.check()
        result = await fn(messages, params)
        self.budget.charge(kind, result)
        return result

    def _stage(self, name: str) -> None:
        if self.on_stage:
            self.on_stage(name)

    def _finish(self, result: RunResult, started: float, demo_sets: list[list[dict[str, str]]]) -> RunResult:
        """What every run reports however it ended: its candidates, calls, cost, tokens and time."""
        result.instructions, result.demo_sets = self.instructions, demo_sets
        result.calls, result.cost, result.tokens = (
            dict(self.budget.calls),
            self.budget.cost,
            self.budget.tokens,
        )
        result.seconds = time.monotonic() - started
        return result


class MIPROv2(Search):
    def __init__(self, task: TaskFn, evaluator: Evaluator, settings: Settings, **kw: Any) -> None:
        super().__init__(task, evaluator, settings, **kw)
        self._scores: dict[tuple[int, int, int], float] = {}  # (instruction, demo set, row) → score
        self.instructions: list[str] = []
        self.demo_sets: list[list[dict[str, str]]] = []
        self._answers: dict[int, str] = {}  # row id → the model's own passing answer (bootstrapped)

    # -- calls ----------------------------------------------------------------------------------

    async def _score(self, i: int, d: int, row: Example) -> float:
        key = (i, d, row.row_id)
        if key not in self._scores:
            cand = Candidate(self.instructions[i], self.demo_sets[d])
            out = await self._call("task", self.task, cand.messages(row), self.s.task_params)
            try:
                s = await self.evaluator.score(
                    output=out.text,
                    expected=row.target,
                    inputs={"messages": row.messages, "variables": row.variables},
                )
                self._scores[key] = s.value
            except EvaluationError:
                self._scores[key] = 0.0
        return self._scores[key]

    async def evaluate(self, i: int, d: int, rows: list[Example]) -> list[float]:
        return [await self._score(i, d, r) for r in rows]

    # -- demo sets ---------------------------------------------------------------------------

    def _labelled_sets(self, labelled: list[Example], count: int) -> list[list[dict[str, str]]]:
        """`count` demo sets drawn from labelled rows (each its own seeded draw), class-balanced:
        each set takes one row of every distinct label it can before a second of any, so a
        classifier sees every class, and set j ends on a different label than set j-1 (a weak
        model leans towards the last demo's label). Identical draws are kept once."""
        size = min(self.s.max_labeled_demos, len(labelled))
        out: list[list[dict[str, str]]] = []
        for j in range(count):
            pick = self._balanced(labelled, [], size, random.Random(self.s.seed * 7919 + j), j)
            demos = [{"user": r.user_text(), "assistant": r.target or ""} for r in pick]
            if demos and demos not in out:
                out.append(demos)
        return out

    @staticmethod
    def _balanced(
        rows: list[Example], taken: list[Example], size: int, rng: random.Random, turn: int
    ) -> list[Example]:
        """`taken` filled up to `size` from `rows`, labels least represented first (ties at random),
        shuffled so that the last demo's label is the `turn`-th label in sorted order."""
        by_label: dict[str, list[Example]] = {}
        for r in rows:
            if r not in taken:
                by_label.setdefault(r.target or "", []).append(r)
        for pool in by_label.values():
            rng.shuffle(pool)
        counts: dict[str, int] = {lab: 0 for lab in by_label}
        for r in taken:
            counts[r.target or ""] = counts.get(r.target or "", 0) + 1
        pick = list(taken)
        while len(pick) < size and any(by_label.values()):
            open_labels = [lab for lab, pool in by_label.items() if pool]
            low = min(counts[lab] for lab in open_labels)
            lab = rng.choice(sorted(lab for lab in open_labels if counts[lab] == low))
            pick.append(by_label[lab].pop())
            counts[lab] += 1
        rng.shuffle(pick)
        labels = sorted({r.target or "" for r in pick})
        if len(labels) > 1:
            want = labels[turn % len(labels)]
            last = max(i for i, r in enumerate(pick) if (r.target or "") == want)
            pick.append(pick.pop(last))
        return pick

    async def _bootstrap(
        self, base_instruction: str, teacher: list[dict[str, str]], train: list[Example], k: int
    ) -> list[Example] | None:
        """Rows of one shuffle of train whose answer, asked with the teacher demos in context
        (DSPy's teacher: a weak model gets little right zero-shot), passes the evaluator; each
        row comes back carrying the model's own answer as its target."""
        rows = list(train)
        random.Random(self.s.seed + 1000 + k).shuffle(rows)
        # at most an even share per label, so a classifier's bootstrapped demos are not all one class
        cap = math.ceil(self.s.max_bootstrapped_demos / max(1, len({r.target for r in train})))
        per_label: dict[str | None, int] = {}
        kept: list[Example] = []
        for row in rows:
            if len(kept) >= self.s.max_bootstrapped_demos:
                break
            if per_label.get(row.target, 0) >= cap:
                continue
            context = [d for d in teacher if d["user"] != row.user_text()]
            out = await self._call(
                "task", self.task, Candidate(base_instruction, context).messages(row), self.s.task_params
            )
            try:
                s = await self.evaluator.score(
                    output=out.text,
                    expected=row.target,
                    inputs={"messages": row.messages, "variables": row.variables},
                )
            except EvaluationError:
                continue
            if self.evaluator.passed(s):
                kept.append(row)
                per_label[row.target] = per_label.get(row.target, 0) + 1
                self._answers[row.row_id] = out.text
        return kept

    async def _demo_sets(
        self, base_instruction: str, base_demos: list[dict[str, str]], train: list[Example]
    ) -> None:
        """The incumbent's demos (set 0, so candidate (0, 0) is the incumbent), zero-shot, then
        class-balanced labelled sets and bootstrapped sets in turn (DSPy's mix): a bootstrapped set
        is the model's own passing answers on a shuffle of train, filled up with labelled rows
        (labels it lacks first) to `max_labeled_demos`."""
        labelled = [r for r in train if r.expected is not None]
        sets: list[list[dict[str, str]]] = [list(base_demos)] + ([[]] if base_demos else [])
        first = len(sets)
        room = self.s.num_demo_sets - first
        labelled_sets = self._labelled_sets(labelled, room) if labelled and room > 0 else []
        teacher = labelled_sets[0] if labelled_sets else []
        boot_ok = bool(labelled) and self.s.max_bootstrapped_demos > 0
        size = max(self.s.max_labeled_demos, self.s.max_bootstrapped_demos)
        k = tries = 0
        while len(sets) < self.s.num_demo_sets and tries < 3 * max(room, 1):
            tries += 1
            if boot_ok and ((len(sets) - first) % 2 == 1 or not labelled_sets):
                kept = await self._bootstrap(base_instruction, teacher, train, k)
                k += 1
                if not kept:
                    boot_ok = False  # nothing passes even with demos: more shuffles will not help
                    continue
                rng = random.Random(self.s.seed * 104729 + k)
                pick = self._balanced(labelled, kept, size, rng, k)
                demos = [
                    {"user": r.user_text(), "assistant": self._answers.get(r.row_id, r.target or "")}
                    if r in kept
                    else {"user": r.user_text(), "assistant": r.target or ""}
                    for r in pick
                ]
            elif labelled_sets:
                demos = labelled_sets.pop(0)
            else:
                break
            if demos not in sets:
                sets.append(demos)
        self.demo_sets = sets

    # -- instruction proposals ----------------------------------------------------------------

    def _summary_prompt(self, train: list[Example]) -> list[dict[str, Any]]:
        sample = train[:8]
        lines = "\n".join(
            f"- input: {r.user_text()[:200]!r} → output: {(r.target or '')[:200]!r}" for r in sample
        )
        return [
            {
                "role": "system",
                "content": "You describe datasets. In 2-3 sentences, say what task these examples show, "
                "what the inputs look like and what a good output looks like.",
            },
            {"role": "user", "content": f"Examples:\n{lines}"},
        ]

    def _proposal_prompt(
        self, summary: str, current: str, demos: list[dict[str, str]], tip: str
    ) -> list[dict[str, Any]]:
        names = placeholders(current)
        keep = (
            f" Keep these placeholders exactly as written: {', '.join('{' + n + '}' for n in names)}."
            if names
            else ""
        )
        shown = "\n".join(f"- {d['user'][:200]!r} → {d['assistant'][:200]!r}" for d in demos[:3]) or "(none)"
        return [
            {
                "role": "system",
                "content": "You write the instruction (system prompt) for a language model task. "
                "Answer with the new instruction only, no preamble." + keep,
            },
            {
                "role": "user",
                "content": f"Task summary: {summary}\n\nCurrent instruction:\n{current}\n\n"
                f"Example inputs and good outputs:\n{shown}\n\nTip: {tip}\n\nWrite an improved instruction.",
            },
        ]

    def _acceptable(self, proposal: str, current: str, train: list[Example]) -> bool:
        limit = max(4 * len(current), 800)
        return refusal(proposal, current, self.instructions, train, PROPOSAL_HEADINGS, limit) is None

    async def _propose(self, current: str, train: list[Example]) -> None:
        self.instructions = [current]
        if self.s.num_instructions <= 1:
            return
        self._stage("summarising data")
        summary = (
            await self._call(
                "proposer", self.proposer, self._summary_prompt(train), {"temperature": 0, "max_tokens": 160}
            )
        ).text.strip()
        self._stage("proposing instructions")
        attempts = 0
        while len(self.instructions) < self.s.num_instructions and attempts < self.s.num_instructions * 3:
            attempts += 1
            tip = self.rng.choice(TIPS)
            demos = self.rng.choice(self.demo_sets) if self.demo_sets else []
            params = {"temperature": 1.0, "seed": self.s.seed * 1000 + attempts, "max_tokens": 300}
            text = (
                await self._call(
                    "proposer", self.proposer, self._proposal_prompt(summary, current, demos, tip), params
                )
            ).text
            text = clean_proposal(text)
            if self._acceptable(text, current, train):
                self.instructions.append(text)

    # -- the run -------------------------------------------------------------------------------

    async def run(
        self, template_id: str, instruction: str, demos: list[dict[str, str]], splits: Splits
    ) -> RunResult:
        started = time.monotonic()
        result = RunResult(uuid.uuid4().hex[:12], template_id, [], [], [])
        val = splits.val[: self.s.max_val]
        try:
            self._stage("bootstrapping demos")
            await self._demo_sets(instruction, demos, splits.train)
            await self._propose(instruction, splits.train)
            result.instructions, result.demo_sets = self.instructions, self.demo_sets
            self._stage("scoring the current prompt")
            baseline = await self.evaluate(0, 0, val)
            result.baseline_val = sum(baseline) / len(baseline)
            best, best_val = (0, 0), result.baseline_val
            sampler = optuna.samplers.TPESampler(
                seed=self.s.seed, multivariate=True, n_startup_trials=min(5, self.s.trials())
            )
            study = optuna.create_study(
                direction="maximize", sampler=sampler, study_name=f"rswitch-{result.run_id}"
            )
            dist = {
                "instruction": optuna.distributions.CategoricalDistribution(
                    list(range(len(self.instructions)))
                ),
                "demo_set": optuna.distributions.CategoricalDistribution(list(range(len(self.demo_sets)))),
            }
            means: dict[tuple[int, int], list[float]] = {}
            rescored: dict[tuple[int, int], float] = {(0, 0): best_val}
            # the incumbent's full score seeds the study (DSPy's default-program trial); then the
            # current instruction is tried with every demo set before TPE takes over, so each set
            # is seen at least once, on the same rows (the gain usually comes from the demos)
            study.add_trial(
                optuna.trial.create_trial(
                    params={"instruction": 0, "demo_set": 0}, distributions=dist, value=best_val
                )
            )
            for d in range(1, min(len(self.demo_sets), self.s.trials() + 1)):
                study.enqueue_trial({"instruction": 0, "demo_set": d})
            order = random.Random(self.s.seed).sample(val, len(val))
            drawn: dict[tuple[int, int], int] = {}
            for t in range(self.s.trials()):
                self._stage(f"trial {t + 1}/{self.s.trials()}")
                trial = study.ask(dist)
                cand = (trial.params["instruction"], trial.params["demo_set"])
                batch = self._minibatch(order, drawn.get(cand, 0))
                drawn[cand] = drawn.get(cand, 0) + 1
                score = sum(await self.evaluate(*cand, batch)) / len(batch)
                study.tell(trial, score)
                means.setdefault(cand, []).append(score)
                record = {
                    "run_id": result.run_id,
                    "template_id": template_id,
                    "trial": t,
                    "instruction": cand[0],
                    "instruction_text": self.instructions[cand[0]],
                    "demo_set": cand[1],
                    "minibatch_score": score,
                    "full_score": None,
                }
                fresh = [c for c in means if c not in rescored]
                if fresh and ((t + 1) % self.s.full_eval_every == 0 or t == self.s.trials() - 1):
                    # DSPy's schedule: the best minibatch average not yet scored on all of validation
                    top = max(fresh, key=lambda c: sum(means[c]) / len(means[c]))
                    self._stage(f"trial {t + 1}/{self.s.trials()}: rescoring the best on validation")
                    full = await self.evaluate(*top, val)
                    full_score = sum(full) / len(full)
                    record["full_score"], record["full_candidate"] = full_score, list(top)
                    rescored[top] = full_score
                    study.add_trial(
                        optuna.trial.create_trial(
                            params={"instruction": top[0], "demo_set": top[1]},
                            distributions=dist,
                            value=full_score,
                        )
                    )
                    best, best_val = self._better((best, best_val), (top, full_score))
                record.update(
                    best=list(best), best_score=best_val, calls=self.budget.total_calls, cost=self.budget.cost
                )
                result.trials.append(record)
                if self.on_trial:
                    self.on_trial(record)
            if best[0] != 0 and (0, best[1]) not in rescored:
                # the gain often comes from the demos alone: the incumbent's own instruction with
                # the winning demos is rescored too, and wins a tie (fewer changes, same score)
                self._stage("rescoring the current instruction with the winning demos")
                full = await self.evaluate(0, best[1], val)
                plain = sum(full) / len(full)
                if plain >= best_val:
                    best, best_val = (0, best[1]), plain
            result.winner, result.winner_val = best, best_val
            self._stage("testing the winner")
            await self._gate(result, splits.test)
        except BudgetExhausted as exc:
            result.stopped, result.verdict = "budget", f"stopped: {exc}; nothing promoted"
        except Cancelled:
            result.stopped, result.verdict = "cancelled", "stopped: cancelled; nothing promoted"
        return self._finish(result, started, self.demo_sets)

    def _minibatch(self, order: list[Example], k: int) -> list[Example]:
        """A candidate's k-th minibatch: the k-th slice of one seeded order of validation, the same
        rows for every candidate (paired, so minibatch means compare like with like), and rows a
        later full rescoring finds already scored."""
        m = min(self.s.minibatch_size, len(order))
        start = (k * m) % len(order)
        return (order + order)[start : start + m]

    def _size(self, cand: tuple[int, int]) -> int:
        demos = self.demo_sets[cand[1]]
        return len(self.instructions[cand[0]]) + sum(len(d["user"]) + len(d["assistant"]) for d in demos)

    def _better(
        self, current: tuple[tuple[int, int], float], challenger: tuple[tuple[int, int], float]
    ) -> tuple[tuple[int, int], float]:
        """The higher full-validation score; on a tie the shorter prompt (instruction + demos),
        which costs less per call, and the earlier one after that."""
        (c, cs), (n, ns) = current, challenger
        if ns > cs + 1e-12 or (abs(ns - cs) <= 1e-12 and self._size(n) < self._size(c)):
            return challenger
        return current

    async def _gate(self, result: RunResult, test: list[Example]) -> None:
        assert result.winner is not None
        incumbent = await self.evaluate(0, 0, test)
        winner = None if result.winner == (0, 0) else await self.evaluate(*result.winner, test)
        gate(result, incumbent, winner, self.s)


def gate(result: RunResult, incumbent: list[float], winner: list[float] | None, s: Any) -> None:
    """The promotion gate every search strategy ends with: the winner replaces the incumbent only
    if a paired bootstrap CI of (winner − incumbent) on the test rows lies above zero. `winner`
    None: the search kept the incumbent. `s` carries bootstrap_resamples, confidence and seed."""
    result.incumbent_test = sum(incumbent) / len(incumbent)
    if winner is None:
        result.winner_test = result.incumbent_test
        result.verdict = "kept the incumbent: no candidate beat it on validation"
        return
    result.winner_test = sum(winner) / len(winner)
    lo, hi = paired_bootstrap(
        incumbent, winner, resamples=s.bootstrap_resamples, confidence=s.confidence, seed=s.seed
    )
    result.ci = (lo, hi)
    pct = round(s.confidence * 100)
    if lo > 0:
        result.promote = True
        result.verdict = f"promote: test {result.incumbent_test:.3f} → {result.winner_test:.3f}, {pct}% CI of the gain [{lo:+.3f}, {hi:+.3f}]"
    else:
        result.verdict = (
            f"kept the incumbent: test {result.incumbent_test:.3f} vs {result.winner_test:.3f}, "
            f"{pct}% CI of the gain [{lo:+.3f}, {hi:+.3f}] does not exclude zero"
        )
