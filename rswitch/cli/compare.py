"""`rswitch compare TEMPLATE`: which candidate model should serve a template, on its own labelled rows."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rswitch.cli import through
from rswitch.cli.common import ConfigOpt, fail, get_template, load, registry


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
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rswitch.core import Core
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
    gateway = through.owner(cfg)
    if gateway is not None:
        raise fail(
            f"the gateway at {gateway.admin_url} owns this data: stop it to compare here "
            f"(or POST {gateway.admin_url}/admin/templates/{template_id}/compare)"
        )
    try:
        core = Core(cfg)
    except Exception as exc:
        raise fail(f"rswitch could not start: {type(exc).__name__}: {exc}") from None

    async def main() -> Any:
        await core.start()
        try:
            who = cmp.contenders(core, template_id, _ids(candidates), _ids(models))
            chosen = cmp.rows_for(core, template_id, split, rows, seed)
            guess = cmp.estimate(core, template_id, who, chosen)
            _print_estimate(guess, split)
            if dry_run:
                return None
            with Progress(
                TextColumn("[bold]rows"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                transient=False,
            ) as bar:
                task = bar.add_task("compare", total=len(chosen), info="")

                def on_row(done: int, outcomes: list[cmp.Outcome]) -> None:
                    live = "  ".join(f"{o.id} {sum(o.scores) / len(o.scores):.2f}" for o in outcomes)
                    bar.update(task, completed=done, info=live)

                result = await cmp.compare(
                    core,
                    template_id,
                    who,
                    chosen,
                    split_name=split,
                    evaluator=evaluator,
                    budget_calls=budget_calls,
                    budget_cost=budget_cost,
                    seed=seed,
                    on_row=on_row,
                )
            if apply and result.recommended is not None:
                result_applied = await cmp.apply(core, result)
                typer.echo(result_applied)
            core.analytics.record_compare(result.record())
            return result
        finally:
            await core.stop()

    try:
        result = asyncio.run(main())
    except cmp.CompareError as exc:
        raise fail(str(exc)) from None
    if result is not None:
        typer.echo(render(result))


def _print_estimate(guess: Any, split: str) -> None:
    total = guess.total
    priced = f"about ${total:.4f}" if total is not None else "no known price"
    unknown = [cid for cid, c in guess.cost.items() if c is None]
    typer.echo(
        f"plan      {guess.rows} row(s) of the {split} split x {len(guess.cost)} candidate(s) = "
        f"{guess.calls} call(s), {priced}"
        + (f" (no price for {', '.join(unknown)})" if unknown and total is not None else "")
    )


def render(result: Any) -> str:
    """The comparison as an operator reads it: the table, the front, the recommendation."""

    def num(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    def versus(o: Any) -> str:
        if o.incumbent or not o.delta_ci:
            return ""
        return f"{num(o.delta, '+.3f')} [{o.delta_ci[0]:+.3f}, {o.delta_ci[1]:+.3f}]"

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
    for o in result.outcomes:
        table.append(
            (
                "*" if o.on_front else "",
                o.id,
                num(o.mean),
                "-" if not o.ci else f"[{o.ci[0]:.3f}, {o.ci[1]:.3f}]",
                versus(o),
                o.verdict,
                f"{o.cost_per_1k:.4f}" if o.priced else "unknown",
                num(o.p50_ms, ".0f"),
                num(o.p95_ms, ".0f"),
                f"{o.failures}/{o.calls}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    right = {2, 6, 7, 8, 9}  # numbers line up on the right
    lines = [
        f"run {result.run_id}: template '{result.template_id}' v{result.version}, {result.rows} of "
        f"{result.planned_rows} row(s) of the {result.split} split, evaluator {result.evaluator}, "
        f"{result.calls} call(s), ${result.cost:.4f}, {result.seconds:.1f} s"
        + (" (stopped: budget)" if result.stopped else ""),
        "",
    ]
    for row in table:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(" ".join(cells).rstrip())
    front = [o.id for o in result.outcomes if o.on_front]
    lines += [
        "",
        f"front     {', '.join(front) or '-'} (*: no other candidate is as good on quality, cost and "
        "latency and better on one)",
        f"recommend {result.recommended or '-'}: {result.reason}",
    ]
    return "\n".join(lines)
