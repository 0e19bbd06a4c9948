"""Which model should serve a template? Replay its labelled rows through candidate combinations.

Each candidate (a configured combination, or any `provider/model`) answers the same rows with
the template's current prompt and demos — the incumbent's — and the same evaluator as the
optimizer scores each answer. Rows go out one at a time to every candidate at once, so a run a
budget stops early still compares every candidate on the same rows. Calls go through the
gateway's providers and rate limits and are recorded with `kind = 'eval'`, never as live
traffic.

The report, per candidate: mean quality with a 95% bootstrap interval, the paired bootstrap of
its difference from the incumbent (the promotion gate's test: better / worse / no significant
difference), cost per 1,000 calls, p50 and p95 latency, failures. Then the Pareto front over
quality, cost and latency, and one recommendation: the cheapest candidate whose quality is not
significantly below the best one's (a failed call scores 0).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from rswitch.gateway.balancer import Combination
from rswitch.optimizer.data import Example, load_examples, split
from rswitch.optimizer.evaluators import EvaluationError, build_evaluator
from rswitch.optimizer.mipro import Candidate as Prompt
from rswitch.optimizer.mipro import paired_bootstrap
from rswitch.optimizer.service import OptimizeError, on_gateway_loop, pick_combination
from rswitch.providers.base import UpstreamError
from rswitch.providers.pricing import estimate_tokens, message_text

SPLITS = ("test", "all")
RESAMPLES = 1000
CONFIDENCE = 0.95
EVAL_PARAMS: dict[str, Any] = {"temperature": 0}
MAX_ANSWER_TOKENS = 1024


def answer_budget(rows: list[Example]) -> int:
    """max_tokens for the replayed calls: twice the longest label and 16 tokens more (at most
    1,024), so a model that rambles costs a bounded amount and a right answer is never cut."""
    longest = max((estimate_tokens(r.target or "") for r in rows), default=0)
    return min(MAX_ANSWER_TOKENS, 2 * longest + 16)


class CompareBusy(Exception):
    """Another comparison is running (the admin API answers 409)."""


class CompareError(OptimizeError):
    """The comparison cannot run: unknown template, candidate or evaluator, no labelled rows."""


@dataclass
class Contender:
    """One candidate: the combination its calls go through."""

    id: str
    combination: Combination
    incumbent: bool = False
    prompt: Prompt | None = None  # an earlier version's prompt and demos (`ID@vN`); None: the current
    version: int | None = None


@dataclass
class Outcome:
    """What one candidate did on the rows it answered."""

    id: str
    provider: str
    model: str
    incumbent: bool
    scores: list[float] = field(default_factory=list)  # per row, in row order; a failure is 0
    ms: list[float] = field(default_factory=list)  # answered calls' latencies
    failures: int = 0
    cost: float = 0.0
    tokens: int = 0
    priced: bool = True  # False: no price known for a remote model (its cost shows as unknown)
    # filled by `summarise`
    mean: float | None = None
    ci: tuple[float, float] | None = None
    delta: float | None = None  # mean(this − incumbent) over the same rows
    delta_ci: tuple[float, float] | None = None
    verdict: str = ""
    cost_per_1k: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    on_front: bool = False

    @property
    def calls(self) -> int:
        return len(self.scores)

    def view(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("scores", "ms")}
        out["calls"] = self.calls
        out["ci"] = list(self.ci) if self.ci else None
        out["delta_ci"] = list(self.delta_ci) if self.delta_ci else None
        return out


@dataclass
class Comparison:
    run_id: str
    template_id: str
    version: int | None
    split: str
    evaluator: str
    rows: int  # rows every candidate answered
    planned_rows: int
    outcomes: list[Outcome]
    recommended: str | None = None
    reason: str = ""
    stopped: str | None = None  # "budget" when a cap ended it early
    applied: str | None = None  # what --apply changed (or why it changed nothing)
    seconds: float = 0.0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC).replace(tzinfo=None))

    @property
    def calls(self) -> int:
        return sum(o.calls for o in self.outcomes)

    @property
    def cost(self) -> float:
        return sum(o.cost for o in self.outcomes)

    def record(self) -> dict[str, Any]:
        """The analytics row (compare_runs)."""
        return {
            "run_id": self.run_id,
            "template_id": self.template_id,
            "template_version": self.version,
            "started_at": self.started_at,
            "seconds": self.seconds,
            "split": self.split,
            "evaluator": self.evaluator,
            "rows": self.rows,
            "planned_rows": self.planned_rows,
            "calls": self.calls,
            "cost": self.cost,
            "stopped": self.stopped,
            "recommended": self.recommended,
            "reason": self.reason,
            "applied": self.applied,
            "candidates": [o.view() for o in self.outcomes],
        }


@dataclass
class Estimate:
    rows: int
    calls: int
    cost: dict[str, float | None]  # per candidate; None: no price known for its model

    @property
    def total(self) -> float | None:
        known = [c for c in self.cost.values() if c is not None]
        return sum(known) if known else None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def contenders(core: Any, template_id: str, combination_ids: list[str], models: list[str]) -> list[Contender]:
    """The incumbent (the combination the optimizer would tune: primary, else heaviest) first, then
    each named combination and `provider/model`, once each."""
    if core.registry.get(template_id) is None:
        raise CompareError(f"unknown template id '{template_id}'")
    combos = core.gateway.combinations
    try:
        incumbent = pick_combination(core, template_id, None)
    except OptimizeError as exc:
        raise CompareError(str(exc)) from None
    out = [Contender(incumbent.id, incumbent, incumbent=True)]
    for name in combination_ids:
        cid, at, version = name.partition("@")
        combo = combos.get(cid)
        if combo is None:
            known = ", ".join(sorted(combos)) or "none"
            raise CompareError(f"unknown combination id '{cid}'; configured: {known}")
        prompt, number = _version(core, template_id, version, name) if at else (None, None)
        label = f"{cid}@v{number}" if number is not None else cid
        if all(c.id != label for c in out):
            out.append(Contender(label, combo, prompt=prompt, version=number))
    for spec in models:
        provider, sep, model = spec.partition("/")
        if not sep or not provider or not model:
            raise CompareError(f"--models takes provider/model, e.g. openai/gpt-4o-mini; got {spec!r}")
        if provider not in core.gateway.providers:
            known = ", ".join(sorted(core.gateway.providers))
            raise CompareError(f"unknown provider '{provider}' in {spec!r}; configured: {known}")
        if all(c.id != spec for c in out):
            out.append(Contender(spec, Combination(spec, template_id, model, provider, name=spec)))
    if len(out) < 2:
        raise CompareError(
            f"nothing to compare with the incumbent '{incumbent.id}': name --candidates or --models"
        )
    return out


def _version(core: Any, template_id: str, text: str, name: str) -> tuple[Prompt | None, int]:
    """The prompt and demos of `template_id` version `text` ("3" or "v3"); None for the current."""
    digits = text[1:] if text[:1] in "vV" else text
    if not digits.isdigit():
        raise CompareError(f"{name!r}: after @ comes a template version, e.g. {name.partition('@')[0]}@v1")
    number = int(digits)
    current = core.registry.get(template_id)
    if current is not None and current.version == number:
        return None, number
    for manifest in core.registry.history(template_id):
        if manifest.get("version") == number:
            return Prompt(str(manifest.get("template", "")), list(manifest.get("demos") or [])), number
    known = sorted(
        {m.get("version") for m in core.registry.history(template_id)}
        | {getattr(current, "version", None)} - {None}
    )
    raise CompareError(
        f"template '{template_id}' has no version {number} (versions: {', '.join(map(str, known))})"
    )


def rows_for(core: Any, template_id: str, which: str, limit: int | None, seed: int) -> list[Example]:
    """The labelled rows to replay: the optimizer's test split (newest inputs, never trained on) or
    all of them; at most `limit`, a seeded sample."""
    if which not in SPLITS:
        raise CompareError(f"--split must be one of {', '.join(SPLITS)}; got {which!r}")
    core.recorder.flush()
    reference = frozenset(core.config.gateway.optimization.reference_combinations)
    examples = load_examples(core.datasets, template_id, reference=reference)
    if not examples:
        raise CompareError(
            f"template '{template_id}' has no labelled rows to compare on "
            "(label rows with POST /v1/feedback or rswitch dataset import)"
        )
    if which == "test":
        try:
            examples = split(examples, seed=seed).test
        except ValueError as exc:
            raise CompareError(f"template '{template_id}': {exc}; or use --split all") from None
    if limit is not None and len(examples) > limit:
        examples = sorted(random.Random(seed).sample(examples, limit), key=lambda e: e.row_id)
    return examples


def estimate(core: Any, template_id: str, candidates: list[Contender], rows: list[Example]) -> Estimate:
    """Calls and cost before any call: each row's prompt as rendered, and its label's length as
    the answer's (or the template's max_tokens, when that is smaller)."""
    prompt = _prompt(core, template_id)
    costs: dict[str, float | None] = {}
    for c in candidates:
        if not _priced(core, c.combination):
            costs[c.id] = None
            continue
        total = 0.0
        for row in rows:
            pt = estimate_tokens(message_text((c.prompt or prompt).messages(row)))
            ct = estimate_tokens(row.target or "")
            total += core.gateway.prices.cost(c.combination.model, pt, ct)
        costs[c.id] = total
    return Estimate(len(rows), len(rows) * len(candidates), costs)


FREE_PROVIDERS = ("local", "encoder")  # in-process models: no price, and nothing to pay


def _priced(core: Any, combo: Combination) -> bool:
    provider = core.gateway.providers.get(combo.provider)
    if getattr(provider, "type", None) in FREE_PROVIDERS:
        return True
    return core.gateway.prices.lookup(combo.model) is not None


def _prompt(core: Any, template_id: str) -> Prompt:
    tpl = core.registry.get(template_id)
    return Prompt(tpl.template, list(tpl.demos))


async def compare(
    core: Any,
    template_id: str,
    candidates: list[Contender],
    rows: list[Example],
    *,
    split_name: str = "test",
    evaluator: str = "similarity",
    budget_calls: int | None = None,
    budget_cost: float | None = None,
    concurrency: int = 4,
    seed: int = 0,
    on_row: Callable[[int, list[Outcome]], None] | None = None,
    run_id: str | None = None,
) -> Comparison:
    """Replay `rows` through every candidate and summarise. A budget is checked before each row:
    the row's calls all go out or none do, so every candidate answers the same rows."""
    try:
        scorer = build_evaluator(evaluator)
    except ValueError as exc:
        raise CompareError(str(exc)) from None
    tpl = core.registry.get(template_id)
    prompt = _prompt(core, template_id)
    outcomes = [
        Outcome(
            c.id,
            c.combination.provider,
            c.combination.model,
            c.incumbent,
            priced=_priced(core, c.combination),
        )
        for c in candidates
    ]
    result = Comparison(
        run_id or new_run_id(),
        template_id,
        getattr(tpl, "version", None),
        split_name,
        evaluator,
        0,
        len(rows),
        outcomes,
    )
    started = time.perf_counter()
    gate = asyncio.Semaphore(max(1, concurrency))
    params = dict(EVAL_PARAMS, max_tokens=answer_budget(rows))

    async def one(c: Contender, o: Outcome, row: Example) -> tuple[float, float | None, float, int]:
        async with gate:
            try:
                done = await on_gateway_loop(
                    core,
                    core.gateway.call_direct(
                        c.combination, (c.prompt or prompt).messages(row), params, kind="eval"
                    ),
                )
            except UpstreamError:
                return 0.0, None, 0.0, 0
        try:
            score = await scorer.score(output=done.text, expected=row.target, inputs=row.variables)
        except EvaluationError:
            return 0.0, done.ms, done.cost, done.tokens
        return score.value, done.ms, done.cost, done.tokens

    for i, row in enumerate(rows):
        spent_calls = sum(o.calls for o in outcomes)
        spent_cost = sum(o.cost for o in outcomes)
        if (budget_calls is not None and spent_calls + len(candidates) > budget_calls) or (
            budget_cost is not None and spent_cost >= budget_cost
        ):
            result.stopped = "budget"
            break
        answers = await asyncio.gather(*(one(c, o, row) for c, o in zip(candidates, outcomes, strict=True)))
        for o, (score, ms, cost, tokens) in zip(outcomes, answers, strict=True):
            o.scores.append(score)
            o.cost += cost
            o.tokens += tokens
            if ms is None:
                o.failures += 1
            else:
                o.ms.append(ms)
        result.rows = i + 1
        if on_row is not None:
            on_row(i + 1, outcomes)
    result.seconds = time.perf_counter() - started
    summarise(result, seed=seed)
    return result


def _bootstrap_mean(values: list[float], *, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(RESAMPLES))
    return means[int((1 - CONFIDENCE) / 2 * RESAMPLES)], means[
        min(RESAMPLES - 1, int((1 + CONFIDENCE) / 2 * RESAMPLES))
    ]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(result: Comparison, *, seed: int = 0) -> None:
    """Means and intervals, verdicts against the incumbent, the front and the recommendation."""
    outcomes = result.outcomes
    if not result.rows:
        result.reason = "no row was compared (the budget allowed none)"
        return
    incumbent = next(o for o in outcomes if o.incumbent)
    for o in outcomes:
        o.mean = sum(o.scores) / len(o.scores)
        o.ci = _bootstrap_mean(o.scores, seed=seed)
        o.cost_per_1k = o.cost / o.calls * 1000 if o.calls else 0.0
        o.p50_ms, o.p95_ms = _quantile(o.ms, 0.5), _quantile(o.ms, 0.95)
        if o is incumbent:
            o.verdict = "incumbent"
            continue
        o.delta = o.mean - incumbent.mean
        o.delta_ci = paired_bootstrap(
            incumbent.scores, o.scores, resamples=RESAMPLES, confidence=CONFIDENCE, seed=seed
        )
        o.verdict = _verdict(o.delta_ci, "the incumbent")
    answered = [o for o in outcomes if o.ms]  # a candidate that never answered is on no front
    for o in answered:
        o.on_front = not any(_dominates(other, o) for other in answered if other is not o)
    if not answered:
        result.reason = "no candidate answered"
        return
    best = max(answered, key=lambda o: (o.mean, -_cost_key(o)))
    close = [best]
    for o in answered:
        if o is best:
            continue
        lo, hi = paired_bootstrap(
            best.scores, o.scores, resamples=RESAMPLES, confidence=CONFIDENCE, seed=seed
        )
        if hi >= 0:  # not significantly below the best
            close.append(o)
    pick = min(close, key=lambda o: (_cost_key(o), o.p50_ms or 0.0, -(o.mean or 0.0)))
    result.recommended = pick.id
    if pick is best:
        cheaper = [o for o in answered if _cost_key(o) < _cost_key(best)]
        result.reason = f"the best quality ({best.mean:.3f})" + (
            ", significantly above every cheaper candidate" if cheaper else ", and no candidate is cheaper"
        )
    else:
        result.reason = (
            f"quality {pick.mean:.3f} is not significantly below the best ({best.id}, {best.mean:.3f}; "
            f"{CONFIDENCE:.0%} paired bootstrap), at ${pick.cost_per_1k:.4f} per 1,000 calls against "
            + (f"${best.cost_per_1k:.4f}" if best.priced else "an unknown price")
        )


def _cost_key(o: Outcome) -> float:
    """A candidate's cost per 1,000 calls for choosing; an unknown price is never the cheapest."""
    return o.cost_per_1k if o.priced else float("inf")


def _verdict(ci: tuple[float, float], against: str) -> str:
    lo, hi = ci
    if lo > 0:
        return f"better than {against}"
    if hi < 0:
        return f"worse than {against}"
    return "no significant difference"


def _dominates(a: Outcome, b: Outcome) -> bool:
    """a is at least as good as b on quality, cost and latency, and better on one."""
    la, lb = a.p50_ms or 0.0, b.p50_ms or 0.0
    ca, cb = _cost_key(a), _cost_key(b)
    at_least = (a.mean or 0) >= (b.mean or 0) and ca <= cb and la <= lb
    better = (a.mean or 0) > (b.mean or 0) or ca < cb or la < lb
    return at_least and better


def apply(core: Any, run: dict[str, Any]) -> str:
    """Give a comparison's (its record's) recommended combination its template's traffic: its
    weight (1 if it had none) and 0 for the template's other combinations; an operator change
    like a reweight, in the event log with the weights before, undone by resetting the weights
    (or setting them back)."""
    rec, tid = run.get("recommended"), run["template_id"]
    if rec is None:
        return "nothing applied: no candidate was recommended"
    cid, at, version = rec.partition("@")
    current = core.registry.get(tid)
    if at and (current is None or f"v{current.version}" != version):
        return (
            f"nothing applied: {rec} is an earlier version of the prompt; to serve it again: "
            f"rswitch template rollback {tid} {version.lstrip('v')}, then compare again"
        )
    rec = cid
    combo = core.gateway.combinations.get(rec)
    if combo is None or combo.template_id != tid:
        outcome = next(o for o in run["candidates"] if o["id"] == run["recommended"])
        return (
            f"nothing applied: {rec} is not a combination of '{tid}'; add one to gateway.combinations "
            f"(template_id: {tid}, provider: {outcome['provider']}, model: {outcome['model']}) to send it traffic"
        )
    pool = [c for c in core.gateway.combinations.values() if c.template_id == tid and not c.implicit]
    before = {c.id: (c.weight, c.enabled) for c in pool}
    changes = []
    for c in pool:
        weight = (c.weight or 1.0) if c.id == rec else 0.0
        if c.id == rec and not c.enabled:
            core.set_enabled(c.id, True)
        if weight != c.weight:
            core.reweight(c.id, weight)
        old_w, old_on = before[c.id]
        if (old_w, old_on) != (c.weight, c.enabled):
            was = f"{old_w:g}" + ("" if old_on else " (disabled)")
            changes.append(f"{c.id} {was} -> {c.weight:g}")
    if not changes:
        return f"nothing to change: {rec} already takes all of '{tid}''s traffic"
    text = f"weights of '{tid}': {', '.join(changes)}"
    core.event("operator", f"compare {run['run_id']}: {rec} takes the traffic ({text}); undo: reset weights")
    return text


class Jobs:
    """Comparisons a running gateway runs in the background (the admin API's), one at a time, each
    stored when done; `running` is the one going, with its progress."""

    def __init__(self) -> None:
        self.running: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(
        self,
        core: Any,
        template_id: str,
        *,
        candidates: list[str],
        models: list[str],
        rows: int | None,
        split_name: str,
        evaluator: str | None,
        budget_calls: int | None,
        budget_cost: float | None,
        seed: int,
        apply_result: bool,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Check everything, start the run on this loop and return its plan; CompareError names
        what is wrong (and nothing starts)."""
        if self.running is not None:
            raise CompareBusy(
                f"a comparison of '{self.running['template_id']}' is running (run {self.running['run_id']})"
            )
        evaluator = evaluator or core.config.gateway.optimization.evaluator
        try:
            build_evaluator(evaluator)
        except ValueError as exc:
            raise CompareError(str(exc)) from None
        who = contenders(core, template_id, candidates, models)
        chosen = rows_for(core, template_id, split_name, rows, seed)
        guess = estimate(core, template_id, who, chosen)
        run_id = new_run_id()
        plan = {
            "run_id": run_id,
            "template_id": template_id,
            "candidates": [c.id for c in who],
            "rows": guess.rows,
            "calls": guess.calls,
            "estimated_cost": guess.total,
            "status": "planned" if dry_run else "running",
        }
        if dry_run:
            return plan
        self.running = dict(plan, rows_done=0, means={})

        def on_row(done: int, outcomes: list[Outcome]) -> None:
            if self.running is not None:
                self.running["rows_done"] = done
                self.running["means"] = {o.id: sum(o.scores) / len(o.scores) for o in outcomes}

        async def run() -> None:
            try:
                result = await compare(
                    core,
                    template_id,
                    who,
                    chosen,
                    split_name=split_name,
                    evaluator=evaluator,
                    budget_calls=budget_calls,
                    budget_cost=budget_cost,
                    seed=seed,
                    on_row=on_row,
                    run_id=run_id,
                )
                if apply_result:
                    result.applied = apply(core, result.record())
                await asyncio.to_thread(core.analytics.record_compare, result.record())
                core.event(
                    "compare",
                    f"compare {run_id} of '{template_id}': {result.rows} row(s), recommend "
                    f"{result.recommended or 'nothing'}",
                )
            except Exception as exc:  # said, not lost: the run's error is the last event
                core.event(
                    "compare", f"compare {run_id} of '{template_id}' failed: {type(exc).__name__}: {exc}"
                )
            finally:
                self.running = None

        core.event("compare", f"compare {run_id} of '{template_id}': {guess.calls} call(s) planned")
        self._task = asyncio.get_running_loop().create_task(run())
        return plan

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
