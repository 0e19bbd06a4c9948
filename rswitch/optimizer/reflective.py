"""Reflective instruction search for one prompt (GEPA: Agrawal et al., "GEPA: Reflective Prompt
Evolution Can Outperform Reinforcement Learning", 2025; DSPy's `GEPA`), `--strategy reflective`.

Where MIPROv2 picks among instructions proposed up front and demo sets, this search rewrites the
instruction alone, from what went wrong:

1. Pool: the incumbent instruction is candidate 0, scored on the validation rows.
2. Each round picks a parent from the Pareto pool (weighted by the validation rows it is best
   on), runs it on a small minibatch of training rows, and shows a proposer model the rows it
   got wrong with the evaluator's reasons (expected vs got, missing JSON fields…). The proposer
   writes a new instruction. Where it dropped some of the template's `{variables}` (small
   proposers often do), the parent's sentences holding them are carried over to its end; one
   that adds a variable the template does not have, rambles, copies training rows or writes back
   the reflection prompt's own headings ("Expected output:") is refused.
3. The child is scored on the same minibatch; only if it beats its parent there is it scored on
   every validation row and joins the pool. The pool keeps a candidate while it is the best on
   at least one validation row and no other kept candidate covers all of those rows; so a
   candidate that fixes a case the best-on-average one misses stays to be built on.
4. The search stops after `max_proposals` rounds, or when the call budget is spent: the calls
   the gate needs are set aside first, so the run still ends at the gate.
5. The winner is the best mean validation score (a tie keeps the incumbent), and it goes through
   the same promotion gate as MIPROv2's (`mipro.gate`): a paired bootstrap CI on the test rows.

The incumbent's demos are kept unchanged, so whatever this search wins, the instruction won.
The result is a `RunResult` like MIPROv2's (one demo set; each round is a trial record).
"""

from __future__ import annotations

import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rswitch.optimizer.data import Example, Splits
from rswitch.optimizer.evaluators import EvaluationError, Evaluator
from rswitch.optimizer.mipro import (
    BudgetExhausted,
    Cancelled,
    Candidate,
    RunResult,
    Search,
    TaskFn,
    clean_proposal,
    gate,
    refusal,
)
from rswitch.templates import placeholders

TIE = 1e-12


@dataclass
class ReflectiveSettings:
    seed: int = 0
    minibatch_size: int = 3  # training rows a round runs the parent on (GEPA's default)
    pool_size: int = 8  # candidates kept in the Pareto pool at most
    max_proposals: int = 12  # rounds, each asking the proposer once; the budget may stop it sooner
    max_val: int = 100
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    task_params: dict[str, Any] = field(default_factory=lambda: {"temperature": 0})
    proposer_params: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.7, "max_tokens": 400})

    def __post_init__(self) -> None:
        for name in ("minibatch_size", "pool_size", "max_proposals", "max_val"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"reflective search: {name} must be a whole number >= 1; got {value!r}")

    def trials(self) -> int:
        return self.max_proposals


@dataclass
class Outcome:
    output: str
    value: float
    reason: str
    passed: bool


class _SearchSpent(Exception):
    """The calls left are the gate's: the search stops here and the gate runs."""


def pareto_pool(scores: dict[int, list[float]], pool_size: int | None = None) -> dict[int, int]:
    """The candidates worth building on, each with the number of validation rows it is (one of)
    the best on. A candidate that is best on no row is out; so is one whose every such row also
    has a kept candidate that is as good there (dominated; the lower-mean one goes first, ties to
    the newer one). Beyond `pool_size`, the ones with the fewest rows go, then the lower mean."""
    if not scores:
        return {}
    n = len(next(iter(scores.values())))
    best = [max(s[j] for s in scores.values()) for j in range(n)]
    fronts = [{c for c, s in scores.items() if s[j] >= best[j] - TIE} for j in range(n)]
    kept = {c for front in fronts for c in front}

    def mean(c: int) -> float:
        return sum(scores[c]) / n

    for c in sorted(kept, key=lambda c: (mean(c), -c)):
        mine = [f for f in fronts if c in f]
        if all(any(o in kept and o != c for o in f) for f in mine):
            kept.discard(c)
    wins = {c: sum(1 for f in fronts if c in f) for c in kept}
    if pool_size is not None and len(wins) > pool_size:
        ranked = sorted(wins, key=lambda c: (wins[c], mean(c), -c), reverse=True)[:pool_size]
        wins = {c: wins[c] for c in ranked}
    return wins


# the headings of the reflection prompt itself: a proposer that writes them back is continuing
# that prompt (a small model's habit), not writing an instruction for the task model
HEADINGS = (r"#+\s*Example \d+", "Input:", "Model output:", "Expected output:", "Current instruction:")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def restore_variables(proposal: str, parent: str) -> tuple[str, list[str]]:
    """The proposal with the parent's sentences that hold the variables it dropped appended, and
    the names restored. A small proposer rewriting "Which topic is this about: {labels}?" often
    drops `{labels}`; the rewrite is kept and the parent's sentence carried over, instead of the
    whole proposal being lost. A proposal that drops nothing is returned as it is."""
    kept = set(placeholders(proposal))
    missing = [n for n in placeholders(parent) if n not in kept]
    if not missing or not proposal:
        return proposal, []
    carried = [s.strip() for s in _SENTENCE.split(parent) if s.strip() and set(placeholders(s)) - kept]
    return proposal.rstrip() + "\n\n" + " ".join(carried), missing


class ReflectiveSearch(Search):
    """Same constructor and `run` as MIPROv2 (mipro.Search), so the service, scheduler and CLI run either."""

    def __init__(self, task: TaskFn, evaluator: Evaluator, settings: ReflectiveSettings, **kw: Any) -> None:
        super().__init__(task, evaluator, settings, **kw)
        self.instructions: list[str] = []
        self.demos: list[dict[str, str]] = []
        self.val_scores: dict[int, list[float]] = {}  # candidate → its score on each validation row
        self._outcomes: dict[tuple[int, int], Outcome] = {}  # (candidate, row id) → outcome
        self._limit: int | None = None  # total calls the search may reach; the rest is the gate's

    # -- calls ------------------------------------------------------------------------------------

    def _before_call(self) -> None:
        if self._limit is not None and self.budget.total_calls >= self._limit:
            raise _SearchSpent()

    async def outcome(self, i: int, row: Example) -> Outcome:
        key = (i, row.row_id)
        if key not in self._outcomes:
            cand = Candidate(self.instructions[i], self.demos)
            out = await self._call("task", self.task, cand.messages(row), self.s.task_params)
            try:
                s = await self.evaluator.score(
                    output=out.text,
                    expected=row.target,
                    inputs={"messages": row.messages, "variables": row.variables},
                )
                self._outcomes[key] = Outcome(out.text, s.value, s.reason, self.evaluator.passed(s))
            except EvaluationError as exc:
                self._outcomes[key] = Outcome(out.text, 0.0, f"could not be scored: {exc}", False)
        return self._outcomes[key]

    async def evaluate(self, i: int, rows: list[Example]) -> list[float]:
        return [(await self.outcome(i, r)).value for r in rows]

    # -- reflection -------------------------------------------------------------------------------

    def _reflection_prompt(
        self, current: str, rows: list[Example], outcomes: list[Outcome]
    ) -> list[dict[str, Any]]:
        names = placeholders(self.instructions[0])
        keep = (
            f" Keep these placeholders exactly as written: {', '.join('{' + n + '}' for n in names)}."
            if names
            else ""
        )
        shown = []
        for k, (row, o) in enumerate(zip(rows, outcomes, strict=True), 1):
            verdict = "right" if o.passed else "WRONG"
            shown.append(
                f"### Example {k} ({verdict}, score {o.value:.2f}: {o.reason})\n"
                f"Input: {row.user_text()[:400]}\nModel output: {o.output[:400]}\n"
                f"Expected output: {(row.target or '')[:400]}"
            )
        return [
            {
                "role": "system",
                "content": "You improve the instruction (system prompt) that a language model follows for "
                "a task. You see the current instruction and examples of the model following it, each "
                "with the expected output and why its answer was scored as it was. Work out what the "
                "model got wrong and what the task needs (output format, labels, rules the examples "
                "imply), then write a complete new instruction that fixes those mistakes and keeps what "
                "already works. State general rules: do not copy the examples. Answer with the new "
                "instruction only, no preamble." + keep,
            },
            {
                "role": "user",
                "content": f"Current instruction:\n{current}\n\n"
                + "\n\n".join(shown)
                + "\n\nNew instruction:",
            },
        ]

    def _refusal(self, proposal: str, train: list[Example]) -> str | None:
        """Why a proposal cannot be a candidate, or None when it can."""
        current = self.instructions[0]
        return refusal(proposal, current, self.instructions, train, HEADINGS, max(6 * len(current), 2000))

    # -- the run ----------------------------------------------------------------------------------

    def _minibatches(self, train: list[Example]) -> Any:
        """Training rows in shuffled passes, `minibatch_size` at a time (every row before repeats)."""
        rng = random.Random(self.s.seed + 1)
        size = min(self.s.minibatch_size, len(train))
        while True:
            rows = list(train)
            rng.shuffle(rows)
            for k in range(0, len(rows) - size + 1, size):
                yield rows[k : k + size]

    def pick_parent(self) -> int:
        """A candidate from the Pareto pool, as likely as the number of validation rows it wins."""
        pool = pareto_pool(self.val_scores, self.s.pool_size)
        parents = sorted(pool)
        return self.rng.choices(parents, weights=[pool[c] for c in parents])[0]

    def _mean(self, c: int) -> float:
        scores = self.val_scores[c]
        return sum(scores) / len(scores)

    def best(self) -> int:
        """The best mean validation score; a tie goes to the older candidate (the incumbent first)."""
        return max(self.val_scores, key=lambda c: (self._mean(c), -c))

    async def run(
        self, template_id: str, instruction: str, demos: list[dict[str, str]], splits: Splits
    ) -> RunResult:
        started = time.monotonic()
        result = RunResult(uuid.uuid4().hex[:12], template_id, [], [], [])
        self.instructions, self.demos = [instruction], list(demos)
        val, train = splits.val[: self.s.max_val], splits.train
        # the gate runs the incumbent and the winner on every test row: those calls are set aside
        self._limit = self.budget.max_calls - 2 * len(splits.test)
        spent = False
        try:
            try:
                self._stage("scoring the current prompt")
                self.val_scores[0] = await self.evaluate(0, val)
                result.baseline_val = self._mean(0)
                await self._search(result, template_id, val, train)
            except _SearchSpent:
                if not self.val_scores or len(self.val_scores[0]) < len(val):
                    raise BudgetExhausted(
                        f"the call budget ({self.budget.max_calls}) does not cover scoring the current "
                        f"prompt on {len(val)} validation rows and the gate's {2 * len(splits.test)} calls"
                    ) from None
                spent = True
            self._limit = None
            winner = self.best()
            result.winner, result.winner_val = (winner, 0), self._mean(winner)
            self._stage("testing the winner")
            incumbent = await self.evaluate(0, splits.test)
            challenger = None if winner == 0 else await self.evaluate(winner, splits.test)
            gate(result, incumbent, challenger, self.s)
            if spent:
                result.verdict += (
                    f" (the search stopped after {len(result.trials)} of {self.s.max_proposals} rounds "
                    "at the call budget, keeping the gate's calls)"
                )
        except BudgetExhausted as exc:
            result.stopped, result.verdict = "budget", f"stopped: {exc}; nothing promoted"
        except Cancelled:
            result.stopped, result.verdict = "cancelled", "stopped: cancelled; nothing promoted"
        return self._finish(result, started, [self.demos])

    async def _search(
        self, result: RunResult, template_id: str, val: list[Example], train: list[Example]
    ) -> None:
        batches = self._minibatches(train)
        n = self.s.max_proposals
        for t in range(n):
            parent = self.pick_parent()
            batch = next(batches)
            who = "the current prompt" if parent == 0 else f"candidate #{parent}"
            self._stage(f"round {t + 1}/{n}: running {who} on {len(batch)} training rows")
            seen = [await self.outcome(parent, r) for r in batch]
            parent_score = sum(o.value for o in seen) / len(seen)
            record: dict[str, Any] = {
                "run_id": result.run_id,
                "template_id": template_id,
                "trial": t,
                "parent": parent,
                "instruction": parent,
                "instruction_text": self.instructions[parent],
                "demo_set": 0,
                "minibatch_score": parent_score,
                "full_score": None,
            }
            failures = sum(1 for o in seen if not o.passed)
            if not failures:
                record["note"] = "no failures to reflect on"
            else:
                self._stage(f"round {t + 1}/{n}: reflecting on {failures} failure(s)")
                reply = await self._call(
                    "proposer",
                    self.proposer,
                    self._reflection_prompt(self.instructions[parent], batch, seen),
                    {**self.s.proposer_params, "seed": self.s.seed * 1000 + t},
                )
                proposal, restored = restore_variables(clean_proposal(reply.text), self.instructions[parent])
                refused = self._refusal(proposal, train)
                if refused:
                    record["note"] = f"proposal refused: {refused}"
                    record["refused_text"] = proposal[:500]
                else:
                    notes = (
                        [f"kept {', '.join(f'{{{n}}}' for n in restored)} from the parent"]
                        if restored
                        else []
                    )
                    self.instructions.append(proposal)
                    k = len(self.instructions) - 1
                    self._stage(f"round {t + 1}/{n}: evaluating candidate #{k}")
                    child = sum(await self.evaluate(k, batch)) / len(batch)
                    record.update(instruction=k, instruction_text=proposal, minibatch_score=child)
                    if child > parent_score + TIE:
                        self.val_scores[k] = await self.evaluate(k, val)
                        record["full_score"] = self._mean(k)
                    else:
                        notes.append(f"no better than #{parent} on its minibatch")
                    if notes:
                        record["note"] = "; ".join(notes)
            top = self.best()
            record.update(
                best=[top, 0],
                best_score=self._mean(top),
                pool=sorted(pareto_pool(self.val_scores, self.s.pool_size)),
                calls=self.budget.total_calls,
                cost=self.budget.cost,
            )
            result.trials.append(record)
            if self.on_trial:
                self.on_trial(record)
