"""`rswitch route fit --step NAME` on a judge step: score labelled prompts with the judge, set
its threshold, and say whether the judge ranks hard prompts above easy ones at all (AUROC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rswitch.cli.common import fail, write_fitted_step


def fit_judge_step(
    config: Path | None,
    runtime: Any,  # route._RoutingRuntime
    template: str | None,
    where: str,
    index: int,
    rows: list[tuple[str, str | None]],
    objective: str,
    share: float | None,
    output: Path | None,
) -> None:
    """Fit the judge step at `where[index]` on (text, route target or None) examples: the
    judge's hard target is hard; its easy target, or no route (null / "oos"), is easy."""
    import asyncio

    from rswitch.routing.judge import JudgeStep
    from rswitch.routing.judge_fit import OBJECTIVES, fit_judge, report, score_all

    if objective not in OBJECTIVES:
        raise fail(f"--objective for a judge step must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if objective == "share" and (share is None or not 0 <= share <= 1):
        raise fail("--objective share needs --share, the share of prompts to send to hard, in [0, 1]")
    if objective != "share" and share is not None:
        raise fail("--share goes with --objective share")
    step = runtime.chain(template).steps[index]
    assert isinstance(step, JudgeStep)
    hard_target, easy_target = step.hard[0], step.easy[0] if step.easy else None
    others = sorted({t for _, t in rows if t is not None and t not in (hard_target, easy_target)})
    if others:
        allowed = " or ".join(t for t in (hard_target, easy_target) if t) + ', or null / "oos" for easy'
        raise fail(
            f"examples name routes judge step '{step.name}' does not route to: {', '.join(others)}; "
            f"use {allowed}"
        )
    texts = [t for t, _ in rows]
    hard = [t == hard_target for _, t in rows]

    def progress(done: int, total: int) -> None:
        typer.echo(f"\rjudged {done}/{total}", nl=False, err=True)

    async def judge_all() -> list[float | None]:
        async with runtime:
            return await score_all(step, texts, progress=progress)

    scored = asyncio.run(judge_all())
    typer.echo("", err=True)
    try:
        fitted = fit_judge(step, scored, hard, objective, share)
    except ValueError as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"step      {where}[{index}] '{step.name}' (judge; hard → {hard_target}, easy → {easy_target or 'pass'})"
    )
    for line in report(fitted):
        typer.echo(line)
    if output is None:
        typer.echo("(use --output FILE to write a config with the fitted threshold)")
        return
    threshold = round(fitted.fitted.threshold, 4)
    write_fitted_step(config, template, index, output, lambda node: node.update(threshold=threshold))
    typer.echo(f"wrote     {output}")
