"""`rswitch compare TEMPLATE`: which candidate model should serve a template, on its own labelled rows."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rswitch.admin.actions import CompareSpec
from rswitch.cli import through
from rswitch.cli.common import ConfigOpt, fail, get_template, load, new_core, registry


def _ids(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def compare(
    template_id: str,
    config: ConfigOpt = None,
    candidates: Annotated[
        str | None, typer.Option("--candidates", help="Combination ids, comma-separated.")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option("--models", help="provider/model pairs, comma-separated (the incumbent's prompt)."),
    ] = None,
    rows: Annotated[
        int | None, typer.Option("--rows", help="At most N rows (a seeded sample).", min=1)
    ] = None,
    split: Annotated[
        str, typer.Option(help="test: the optimizer's held-out newest rows; all: every labelled row.")
    ] = "test",
    evaluator: Annotated[
        str | None, typer.Option(help="How answers are scored (default: gateway.optimization.evaluator).")
    ] = None,
    budget_calls: Annotated[
        int | None, typer.Option("--budget-calls", help="Stop before more model calls than this.", min=1)
    ] = None,
    budget_cost: Annotated[
        float | None, typer.Option("--budget-cost", help="Stop once this much (USD) is spent.", min=0)
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, the sample and the bootstrap.")] = 0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only estimate the calls and their cost; call nothing.")
    ] = False,
    apply: Annotated[
        bool,
        typer.Option("--apply", help="Give the recommended combination the template's traffic (reweight)."),
    ] = False,
) -> None:
    """Replay a template's labelled rows through candidate models; compare quality, cost and latency."""
    from rswitch.optimizer import compare as cmp
    from rswitch.optimizer.evaluators import EVALUATORS

    cfg = load(config)
    evaluator = evaluator or cfg.gateway.optimization.evaluator
    if evaluator not in EVALUATORS or evaluator == "llm_judge":
        usable = [e for e in EVALUATORS if e != "llm_judge"]
        raise fail(f"--evaluator must be one of {', '.join(usable)}; got {evaluator!r}")
    if split not in cmp.SPLITS:
        raise fail(f"--split must be one of {', '.join(cmp.SPLITS)}; got {split!r}")
    if not _ids(candidates) and not _ids(models):
        raise fail("name what to compare: --candidates COMBINATION,… and/or --models PROVIDER/MODEL,…")
    get_template(registry(config), template_id)
    spec = CompareSpec(
        candidates=_ids(candidates),
        models=_ids(models),
        rows=rows,
        split=split,
        evaluator=evaluator,
        budget_calls=budget_calls,
        budget_cost=budget_cost,
        seed=seed,
        apply=apply,
        dry_run=dry_run,
    )
    gateway = through.owner(cfg)
    if gateway is not None:  # it holds the stores and the live weights: it runs the comparison
        record = _through(gateway, template_id, spec)
    else:
        if apply and not dry_run:
            raise fail(
                "--apply changes a running gateway's weights, and none is running on this data: start "
                "`rswitch serve` and compare again, or set the weights in the config"
            )
        record = _here(cfg, template_id, spec)
    if record is not None:
        typer.echo(render(record))
        if record.get("applied"):
            typer.echo(f"applied   {record['applied']}")


def _bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]rows"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )


def _live(means: dict[str, float]) -> str:
    return "  ".join(f"{cid} {m:.2f}" for cid, m in means.items())


def _here(cfg: Any, template_id: str, spec: CompareSpec) -> dict[str, Any] | None:
    """In this process, with its own gateway core (stopped after)."""
    import asyncio

    from rswitch.optimizer import compare as cmp

    core = new_core(cfg)

    async def main() -> Any:
        await core.start()
        try:
            who = cmp.contenders(core, template_id, spec.candidates, spec.models)
            chosen = cmp.rows_for(core, template_id, spec.split, spec.rows, spec.seed)
            guess = cmp.estimate(core, template_id, who, chosen)
            _plan(
                guess.rows,
                spec.split,
                len(who),
                guess.calls,
                guess.total,
                [c for c, v in guess.cost.items() if v is None],
            )
            if spec.dry_run:
                return None
            with _bar() as bar:
                task = bar.add_task("compare", total=len(chosen), info="")

                def on_row(done: int, outcomes: list[cmp.Outcome]) -> None:
                    bar.update(
                        task,
                        completed=done,
                        info=_live({o.id: sum(o.scores) / len(o.scores) for o in outcomes}),
                    )

                result = await cmp.compare(
                    core,
                    template_id,
                    who,
                    chosen,
                    split_name=spec.split,
                    evaluator=spec.evaluator or "similarity",
                    budget_calls=spec.budget_calls,
                    budget_cost=spec.budget_cost,
                    seed=spec.seed,
                    on_row=on_row,
                )
            core.analytics.record_compare(result.record())
            return result.record()
        finally:
            await core.stop()

    try:
        return asyncio.run(main())
    except cmp.CompareError as exc:
        raise fail(str(exc)) from None


def _through(gateway: Any, template_id: str, spec: CompareSpec) -> dict[str, Any] | None:
    """Started by the gateway that owns the data (its admin API), followed row by row here."""
    import asyncio

    async def main(op: Any) -> Any:
        plan = await op.compare(template_id, spec)
        _plan(plan.rows, spec.split, len(plan.candidates), plan.calls, plan.estimated_cost, [])
        if spec.dry_run:
            return None
        with _bar() as bar:
            task = bar.add_task("compare", total=plan.rows, info="")
            while True:
                runs = await op.compare_runs(template_id)
                done = next((r for r in runs.runs if r["run_id"] == plan.run_id), None)
                if done is not None:
                    bar.update(task, completed=done["rows"])
                    return done
                running = runs.running
                if running is None or running.get("run_id") != plan.run_id:
                    raise fail(f"the gateway's comparison {plan.run_id} ended without a result: see its log")
                bar.update(task, completed=running["rows_done"], info=_live(running["means"]))
                await asyncio.sleep(0.5)

    return through.call(gateway, main)


def _plan(
    n_rows: int, split: str, n_candidates: int, calls: int, total: float | None, unknown: list[str]
) -> None:
    priced = f"about ${total:.4f}" if total is not None else "no known price"
    typer.echo(
        f"plan      {n_rows} row(s) of the {split} split x {n_candidates} candidate(s) = {calls} call(s), {priced}"
        + (f" (no price for {', '.join(unknown)})" if unknown and total is not None else "")
    )


def render(run: dict[str, Any]) -> str:
    """A comparison's record (`Comparison.record()`, or a stored run) as an operator reads it: the
    table, the front, the recommendation."""

    def num(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    def versus(o: dict[str, Any]) -> str:
        if o["incumbent"] or not o["delta_ci"]:
            return ""
        lo, hi = o["delta_ci"]
        return f"{num(o['delta'], '+.3f')} [{lo:+.3f}, {hi:+.3f}]"

    head = (
        "",
        "candidate",
        "quality",
        "95% CI",
        "vs incumbent",
        "verdict",
        "$/1k calls",
        "p50 ms",
        "p95 ms",
        "failed",
    )
    table = [head]
    for o in run["candidates"]:
        table.append(
            (
                "*" if o["on_front"] else "",
                o["id"],
                num(o["mean"]),
                "-" if not o["ci"] else f"[{o['ci'][0]:.3f}, {o['ci'][1]:.3f}]",
                versus(o),
                o["verdict"],
                f"{o['cost_per_1k']:.4f}" if o["priced"] else "unknown",
                num(o["p50_ms"], ".0f"),
                num(o["p95_ms"], ".0f"),
                f"{o['failures']}/{o['calls']}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    right = {2, 6, 7, 8, 9}  # numbers line up on the right
    lines = [
        f"run {run['run_id']}: template '{run['template_id']}' v{run['template_version']}, {run['rows']} of "
        f"{run['planned_rows']} row(s) of the {run['split']} split, evaluator {run['evaluator']}, "
        f"{run['calls']} call(s), ${run['cost']:.4f}, {run['seconds']:.1f} s"
        + (" (stopped: budget)" if run["stopped"] else ""),
        "",
    ]
    for row in table:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(" ".join(cells).rstrip())
    front = [o["id"] for o in run["candidates"] if o["on_front"]]
    lines += [
        "",
        f"front     {', '.join(front) or '-'} (*: no other candidate is as good on quality, cost and "
        "latency and better on one)",
        f"recommend {run['recommended'] or '-'}: {run['reason']}",
    ]
    return "\n".join(lines)
