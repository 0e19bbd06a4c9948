"""Running MIPROv2 against a live core: its providers, limits, datasets and registry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from rswitch.gateway.balancer import Combination
from rswitch.optimizer.data import load_examples, split
from rswitch.optimizer.evaluators import build_evaluator
from rswitch.optimizer.mipro import Budget, CallResult, MIPROv2, RunResult, Settings
from rswitch.optimizer.reflective import ReflectiveSearch, ReflectiveSettings
from rswitch.templates import Template

T = TypeVar("T")


class OptimizeError(ValueError):
    """The optimizer cannot run: unknown template, no combination, too little labelled data."""


def pick_combination(core: Any, template_id: str, combination_id: str | None) -> Combination:
    combos = core.gateway.combinations
    if combination_id is not None:
        combo = combos.get(combination_id)
        if combo is None:
            raise OptimizeError(f"unknown combination id '{combination_id}'")
        if combo.template_id != template_id:
            raise OptimizeError(
                f"combination '{combination_id}' serves template '{combo.template_id}', not '{template_id}'"
            )
        return combo
    mine = sorted(
        (c for c in combos.values() if c.template_id == template_id and c.enabled),
        key=lambda c: (not c.is_primary, -c.weight),
    )
    if mine:
        return mine[0]
    try:
        return core.gateway.template_pool(template_id)[0]
    except Exception:
        raise OptimizeError(
            f"template '{template_id}' has no combination to optimize for; add one or pass --combination"
        ) from None


async def on_gateway_loop(core: Any, coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` on the gateway's loop (its providers' clients live there), wherever the
    caller runs: from a background thread only the waiting happens on the caller's loop."""
    home = getattr(core, "loop", None)
    if home is not None and home is not asyncio.get_running_loop():
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, home))
    return await coro


def _caller(core: Any, combo: Combination, kind: str) -> Callable[..., Any]:
    async def call(messages: list[dict[str, Any]], params: dict[str, Any]) -> CallResult:
        done = await on_gateway_loop(core, core.gateway.call_direct(combo, messages, params, kind=kind))
        return CallResult(done.text, done.cost, done.tokens)

    return call


async def optimize(
    core: Any,
    template_id: str,
    *,
    settings: Settings | ReflectiveSettings,
    combination_id: str | None = None,
    evaluator: str = "similarity",
    proposer: str | None = None,
    judge: str | None = None,
    budget: Budget | None = None,
    dry_run: bool = False,
    cancel: threading.Event | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[RunResult, int | None]:
    """Run MIPROv2 (given ReflectiveSettings, the reflective search) for one template; write the
    winner back as a new version when the gate says so (and not `dry_run`). Returns the run and
    the new version number, if any."""
    tpl = core.registry.get(template_id)
    if tpl is None:
        raise OptimizeError(f"unknown template id '{template_id}'")
    combo = pick_combination(core, template_id, combination_id)
    if proposer and proposer not in core.gateway.combinations:
        raise OptimizeError(f"unknown proposer combination id '{proposer}'")
    propose_with = (
        pick_combination(core, core.gateway.combinations[proposer].template_id, proposer)
        if proposer
        else combo
    )
    options: dict[str, Any] = {}
    if evaluator == "llm_judge":
        if not judge or judge not in core.gateway.combinations:
            raise OptimizeError("the llm_judge evaluator needs --judge COMBINATION_ID")
        judge_call = _caller(core, core.gateway.combinations[judge], "optimizer")
        budget = budget or Budget()

        async def ask(messages: list[dict[str, Any]]) -> str:
            budget.check()  # judge calls count against the run's budget like every other call
            result = await judge_call(messages, {"temperature": 0, "max_tokens": 8})
            budget.charge("judge", result)
            return result.text

        options["judge"] = ask
    try:
        scorer = build_evaluator(evaluator, **options)
    except ValueError as exc:
        raise OptimizeError(str(exc)) from None
    if on_stage:
        on_stage("loading examples")
    core.recorder.flush()
    # a reference combination's answers label the rows of the others (never its own optimization)
    reference = frozenset(core.config.gateway.optimization.reference_combinations) - {combo.id}
    examples = load_examples(core.datasets, template_id, reference=reference)
    try:
        splits = split(examples, seed=settings.seed)
    except ValueError as exc:
        raise OptimizeError(
            f"template '{template_id}': {exc} (label rows with POST /v1/feedback or rswitch dataset import)"
        ) from None

    def trial_hook(t: dict[str, Any]) -> None:
        core.analytics.record_trial(t["run_id"], t)  # so a watcher (TUI, --watch) sees trials live
        if on_trial:
            on_trial(t)

    search = ReflectiveSearch if isinstance(settings, ReflectiveSettings) else MIPROv2
    mipro = search(
        _caller(core, combo, "optimizer"),
        scorer,
        settings,
        proposer=_caller(core, propose_with, "optimizer"),
        budget=budget,
        cancel=cancel,
        on_trial=trial_hook,
        on_stage=on_stage,
    )
    started = datetime.now(UTC).replace(tzinfo=None)
    result = await mipro.run(template_id, tpl.template, list(tpl.demos), splits)
    new_version = None
    winner = result.winner_candidate
    if result.promote and winner is not None and not dry_run:
        promoted = core.registry.register(
            Template(
                id=tpl.id,
                template=winner.instruction,
                name=tpl.name,
                variables=list(tpl.variables),
                default_model=tpl.default_model,
                default_provider=tpl.default_provider,
                demos=winner.demos,
                provenance={
                    "run_id": result.run_id,
                    "strategy": "reflective" if search is ReflectiveSearch else "mipro",
                    "evaluator": evaluator,
                    "combination": combo.id,
                    "validation_score": result.winner_val,
                    "test_score": result.winner_test,
                    "incumbent_test_score": result.incumbent_test,
                    "ci": list(result.ci or ()),
                    "previous_version": tpl.version,
                },
            )
        )
        new_version = promoted.version
    elif result.promote and dry_run:
        result.verdict += " (dry run: nothing written)"
    core.analytics.record_run(
        {
            "run_id": result.run_id,
            "template_id": template_id,
            "combination_id": combo.id,
            "evaluator": evaluator,
            "started_at": started,
            "seconds": result.seconds,
            "trials": len(result.trials),
            "baseline_val": result.baseline_val,
            "winner_val": result.winner_val,
            "incumbent_test": result.incumbent_test,
            "winner_test": result.winner_test,
            "ci_low": result.ci[0] if result.ci else None,
            "ci_high": result.ci[1] if result.ci else None,
            "promoted": new_version is not None,
            "new_version": new_version,
            "verdict": result.verdict,
            "stopped": result.stopped,
            "calls": sum(result.calls.values()),
            "cost": result.cost,
            "winner_instruction": winner.instruction if winner else None,
        }
    )
    return result, new_version
