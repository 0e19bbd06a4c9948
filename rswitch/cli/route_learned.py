"""`rswitch route fit --step NAME` on a learned step: fit it on the template's recorded rows that
carry labels or feedback scores, save the model beside the routing state, and report the fit."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import typer

from rswitch.cli.common import fail, postgres_datasets
from rswitch.config import Config


def _datasets(cfg: Config) -> Any:
    from rswitch.storage.datasets import DatasetStore

    if cfg.storage.backend == "postgres":
        return postgres_datasets(cfg)
    return DatasetStore(cfg.dataset_dir, cfg.dataset.max_records)


def fit_learned_step(
    cfg: Config,
    runtime: Any,  # route._RoutingRuntime
    template: str | None,
    where: str,
    index: int,
    examples: Path | None,
) -> None:
    import asyncio

    from rswitch.routing.learned import LearnedStep, NotEnoughLabels

    if examples is not None:
        raise fail("a learned step fits on the template's recorded rows (labels, feedback): drop --examples")
    step = runtime.chain(template).steps[index]
    assert isinstance(step, LearnedStep)
    datasets = _datasets(cfg)
    step.source = partial(datasets.examples, step.template)

    async def run() -> Any:
        async with runtime:
            return await step.fit()

    try:
        report = asyncio.run(run())
    except NotEnoughLabels as exc:
        raise fail(f"step '{step.name}' not fitted: {exc}") from None
    finally:
        datasets.close()
    typer.echo(f"step      {where}[{index}] '{step.name}' ({step.encoder_id}), template '{step.template}'")
    arms = ", ".join(f"{a} {n}" for a, n in report.per_arm.items())
    typer.echo(f"labelled  {report.rows} rows over {report.prompts} prompts: {arms}")
    chosen = f"ridge per arm on {report.features}, alpha={report.alpha:g}"
    if report.blend >= 1:
        chosen = f"the {report.knn_k} nearest labelled prompts' mean quality"
    elif report.blend > 0:
        chosen += f", blended {report.blend:g} with the {report.knn_k} nearest labelled prompts"
    typer.echo(f"model     {chosen} (chosen by {report.objective})")
    for key, value in sorted(report.cv.items(), key=lambda kv: -kv[1]):
        typer.echo(f"  {key:<32} {value:.4f}")
    typer.echo(
        f"knob      strong_share {step.strong_share:g}: gain threshold {report.threshold:.4f}, "
        f"{report.share_past_cheapest:.0%} of the labelled prompts past {step.arms[0]}"
    )
    typer.echo(f"wrote     {report.path} (a running gateway loads it within refit.check_seconds)")
