"""`rswitch route …`: how the router chain would route a prompt; fit a semantic step's thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from rswitch.cli.common import ConfigOpt, JsonlError, fail, load, read_jsonl, write_fitted_step
from rswitch.config import Config, ConfigError

app = typer.Typer(help="Inspect query-aware routing.", no_args_is_help=True)


class _RoutingRuntime:
    """The router chains of a config with the providers they need (encoders, judges), started in
    the running loop: what `route explain` and `route fit` run, without the rest of the gateway."""

    def __init__(self, cfg: Config) -> None:
        from rswitch.core import caller_factory, embedder_factory, routing_providers
        from rswitch.routing.chains import build_chains

        self.providers = routing_providers(cfg)
        cache = cfg.dataset_dir.parent / "routing"
        try:
            self.default, self.per_template = build_chains(
                cfg.routing, embedder_factory(self.providers), cache, caller_factory(self.providers)
            )
        except ConfigError as exc:  # e.g. a trained step's file is missing or made for other routes
            raise fail(f"invalid config: {exc}") from None

    async def __aenter__(self) -> _RoutingRuntime:
        for p in self.providers.values():
            await p.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for p in self.providers.values():
            await p.close()

    def chain(self, template: str | None) -> Any:
        return (self.per_template.get(template) if template else None) or self.default


@app.command("explain")
def route_explain(
    prompt: str,
    config: ConfigOpt = None,
    template: Annotated[
        str | None, typer.Option("--template", help="Route as a request for this template.")
    ] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--metadata", help="A metadata tag as key=value; repeat for more.")
    ] = None,
) -> None:
    """Show how the router chain would route a prompt, without calling the chat models.

    Semantic steps do embed the prompt, and judge steps do ask their judge: that is how they decide."""
    import asyncio

    from rswitch.routing.base import Query

    cfg = load(config)
    tags: dict[str, str] = {}
    for item in meta or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise fail(f"--metadata must be key=value; got {item!r}")
        tags[k] = v
    runtime = _RoutingRuntime(cfg)
    chain = runtime.chain(template)
    if chain is None:
        typer.echo("no routing chain is configured: the balancer decides among the combinations")
        return
    which = (
        f"template '{template}'"
        if template and template in runtime.per_template
        else "the gateway-wide chain"
    )

    async def run() -> Any:
        async with runtime:
            return await chain.route(Query([{"role": "user", "content": prompt}], {}, tags))

    outcome = asyncio.run(run())
    typer.echo(f"chain       {which}")
    for line in outcome.trace:
        typer.echo(f"  {line}")
    if outcome.decision is None:
        typer.echo("decision    pass: the balancer decides among the usual combinations")
    else:
        typer.echo(f"decision    {outcome.decision.target} → {', '.join(outcome.decision.combinations)}")
    typer.echo(f"took        {outcome.ms:.3f} ms")


OOS_LABELS = {"", "oos", "none", "out_of_scope", "out-of-scope"}


def _read_route_examples(path: Path, resolve: Any) -> list[tuple[str, str | None]]:
    """(text, route target or None for out of scope) from JSONL lines {"text": …, "route": …}."""
    if not path.is_file():
        raise fail(f"examples file not found: {path}")

    def example(row: Any) -> tuple[str, str | None]:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError('each line needs "text" (a non-empty string) and "route"')
        label = row.get("route")
        if label is not None and not isinstance(label, str):
            raise ValueError('"route" must be a string, or null for out of scope')
        if label is None or label.strip().lower() in OOS_LABELS:
            return row["text"], None
        try:
            return row["text"], resolve(label.strip())[0]
        except KeyError:
            raise ValueError(f"unknown tier in {label!r} (routing.tiers defines the tiers)") from None

    try:
        return [ex for _, ex in read_jsonl(path, example)]
    except JsonlError as exc:
        raise exc.exit() from None


@app.command("fit")
def route_fit(
    examples: Annotated[
        Path | None,
        typer.Option(
            "--examples",
            "-e",
            help='JSONL, one {"text": …, "route": …} a line; route null or "oos" = out of scope '
            "(a learned step fits on the template's recorded rows instead).",
        ),
    ] = None,
    config: ConfigOpt = None,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Fit this template's chain (default: the gateway-wide one)."),
    ] = None,
    step_name: Annotated[
        str | None, typer.Option("--step", help="The semantic step to fit (default: the chain's first).")
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="balanced (mean of in-scope accuracy and OOS recall) or accuracy; "
            "a judge step: balanced (mean of hard and easy recall), accuracy, or share (with --share)."
        ),
    ] = "balanced",
    share: Annotated[
        float | None,
        typer.Option(help="A judge step with --objective share: the share of prompts to send to hard."),
    ] = None,
    per_route: Annotated[
        bool, typer.Option("--per-route", help="A threshold per route (needs several examples per route).")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write the config with the fitted thresholds to this file (comments are not kept)."
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="A semantic step: similarity (fit its thresholds) or trained (learn a classifier "
            "from its utterances and the examples, written to --artifact)."
        ),
    ] = "similarity",
    artifact: Annotated[
        Path | None,
        typer.Option(
            help="--method trained: where to write the classifier "
            "(default: the step's artifact, or <config dir>/<step name>.routes.npz)."
        ),
    ] = None,
) -> None:
    """Calibrate a semantic step's thresholds on labelled examples; report accuracy and OOS recall.
    With --step naming a judge step: set the judge's threshold and report its AUROC.
    With --step naming a learned step: fit it on the template's recorded rows with labels or feedback."""
    from rswitch.routing.fit import OBJECTIVES

    cfg = load(config)
    if template is not None and template not in cfg.routing.templates:
        raise fail(f"no routing chain for template '{template}' (routing.templates has none)")
    steps_cfg = cfg.routing.templates[template] if template else cfg.routing.default
    where = f"routing.templates.{template}" if template else "routing.default"
    learned = [i for i, s in enumerate(steps_cfg) if s.type == "learned" and s.name == step_name]
    if learned:
        from rswitch.cli.route_learned import fit_learned_step

        fit_learned_step(cfg, _RoutingRuntime(cfg), template, where, learned[0], examples)
        return
    if examples is None:
        raise fail("--examples is needed to fit a semantic or judge step")
    judge = [i for i, s in enumerate(steps_cfg) if s.type == "judge" and s.name == step_name]
    if judge:
        from rswitch.cli.route_judge import fit_judge_step
        from rswitch.routing.chains import target_resolver

        rows = _read_route_examples(examples, target_resolver(cfg.routing.tiers))
        runtime = _RoutingRuntime(cfg)
        fit_judge_step(config, runtime, template, where, judge[0], rows, objective, share, output)
        return
    if objective not in OBJECTIVES:
        raise fail(f"--objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if share is not None:
        raise fail("--share is for a judge step (name it with --step)")
    if method not in ("similarity", "trained"):
        raise fail(f"--method must be similarity or trained; got {method!r}")
    if artifact is not None and method != "trained":
        raise fail("--artifact is for --method trained")
    job = _SemanticFit(
        cfg, config, template, where, steps_cfg, step_name, examples, objective, per_route, output
    )
    if method == "similarity":
        _fit_semantic(job)
    else:
        _fit_trained(job, artifact)


@dataclass(frozen=True)
class _SemanticFit:
    """What `route fit` was asked to fit on a semantic step, and where the result goes."""

    cfg: Config
    config: Path | None  # the config file given (None: the default one)
    template: str | None  # whose chain (None: routing.default)
    where: str  # the chain, as the messages name it
    steps_cfg: list[Any]
    step_name: str | None
    examples: Path
    objective: str
    per_route: bool  # a similarity threshold per route
    output: Path | None  # a config to write with the fitted step


def _fit_semantic(job: _SemanticFit) -> None:
    """`route fit` on a semantic step: thresholds fitted on the examples."""
    import asyncio

    import numpy as np

    from rswitch.routing.fit import evaluate, fit

    index, step, rows, labels, runtime = _semantic_step(job)
    objective, per_route, output = job.objective, job.per_route, job.output
    [vectors] = asyncio.run(_embed_texts(runtime, step, [[t for t, _ in rows]]))
    scores = step.score_many(vectors)
    before = evaluate(scores, labels, np.array([r.threshold for r in step.routes]))
    thresholds = fit(scores, labels, objective=objective, per_route=per_route)
    after = evaluate(scores, labels, thresholds)

    def line(name: str, m: Any) -> str:
        oos = f"{m.oos_recall:.1%}" if m.oos_recall is not None else "n/a (no out-of-scope examples)"
        return (
            f"{name:<8} accuracy {m.accuracy:.1%}   in-scope accuracy {m.in_scope_accuracy:.1%}   "
            f"out-of-scope recall {oos}"
        )

    typer.echo(f"step      {job.where}[{index}] '{step.name}' ({step.encoder_id})")
    typer.echo(f"examples  {len(rows)}: {before.in_scope} in scope, {before.out_of_scope} out of scope")
    typer.echo(line("current", before))
    typer.echo(line("fitted", after))
    if before.oos_recall is None:
        typer.echo("note      with no out-of-scope examples the fit can only lower thresholds; add some")
    typer.echo("route                          threshold  fitted   recall")
    for i, r in enumerate(step.routes):
        recall = after.per_route.get(i)
        shown = f"{recall:.0%}" if recall is not None else "-"
        typer.echo(f"  {r.target:<28} {r.threshold:>8.3f} {thresholds[i]:>8.3f}   {shown}")
    if output is None:
        typer.echo("(use --output FILE to write a config with the fitted thresholds)")
        return

    def set_thresholds(node: dict[str, Any]) -> None:
        for route, t in zip(node["routes"], thresholds, strict=True):
            route["threshold"] = round(float(t), 4)

    write_fitted_step(job.config, job.template, index, output, set_thresholds)
    typer.echo(f"wrote     {output}")


def _semantic_step(job: _SemanticFit) -> tuple[int, Any, list[tuple[str, str | None]], Any, _RoutingRuntime]:
    """(index, the built step, examples, their labels, runtime) for the semantic step to fit. The
    step is built as `method: similarity`: a trained step's file is what the fit writes."""
    import numpy as np

    from rswitch.routing.chains import target_resolver
    from rswitch.routing.fit import OUT_OF_SCOPE
    from rswitch.routing.semantic import SemanticStep

    cfg, template, where, step_name = job.cfg, job.template, job.where, job.step_name
    semantic = [(i, s) for i, s in enumerate(job.steps_cfg) if s.type == "semantic"]
    if step_name is not None:
        semantic = [(i, s) for i, s in semantic if s.name == step_name]
    if not semantic:
        what = f"named '{step_name}' " if step_name else ""
        raise fail(f"{where} has no semantic step {what}to fit")
    index = semantic[0][0]
    rows = _read_route_examples(job.examples, target_resolver(cfg.routing.tiers))
    cfg = cfg.model_copy(deep=True)
    (cfg.routing.templates[template] if template else cfg.routing.default)[index].method = "similarity"
    runtime = _RoutingRuntime(cfg)
    step = runtime.chain(template).steps[index]
    assert isinstance(step, SemanticStep)
    targets = [r.target for r in step.routes]
    unknown = sorted({t for _, t in rows if t is not None and t not in targets})
    if unknown:
        raise fail(
            f"examples name routes step '{step.name}' does not have: {', '.join(unknown)}; "
            f"its routes: {', '.join(targets)}"
        )
    labels = np.array([targets.index(t) if t is not None else OUT_OF_SCOPE for _, t in rows])
    return index, step, rows, labels, runtime


async def _embed_texts(runtime: _RoutingRuntime, step: Any, groups: list[list[str]]) -> list[Any]:
    """Each group of texts' vectors through the step's encoder (after warming the step)."""
    import numpy as np

    out = []
    async with runtime:
        await step.warm()
        for texts in groups:
            vectors = []
            for start in range(0, len(texts), 64):
                vectors.extend(np.asarray(await step.embed(texts[start : start + 64]), dtype=np.float32))
                typer.echo(f"\rembedded {min(start + 64, len(texts))}/{len(texts)}", nl=False, err=True)
            typer.echo("", err=True)
            out.append(np.vstack(vectors))
    return out


def _fit_trained(job: _SemanticFit, artifact: Path | None) -> None:
    """`route fit --method trained`: compare similarity and a trained classifier on a held-out
    quarter of the examples, then train on all of them and write the classifier's file."""
    import asyncio
    import os

    import numpy as np

    from rswitch.routing.fit import OUT_OF_SCOPE, Metrics, evaluate, fit
    from rswitch.routing.trained import FOLDS, Labelled, split_held_out, train

    index, step, rows, labels, runtime = _semantic_step(job)
    if len(rows) < 2:
        raise fail("--method trained needs at least two examples (its threshold is fitted on them)")
    objective, output = job.objective, job.output
    path = artifact if artifact is not None else job.steps_cfg[index].artifact_path(job.cfg.source)
    texts = [t for t, _ in rows]
    base_texts = [u for r in step.routes for u in r.utterances]
    base_labels = np.array([i for i, r in enumerate(step.routes) for _ in r.utterances])
    vectors, base_vectors = asyncio.run(_embed_texts(runtime, step, [texts, base_texts]))
    base = Labelled(base_texts, base_vectors, base_labels)
    every = Labelled(texts, vectors, labels)
    targets = [r.target for r in step.routes]

    def line(name: str, m: Metrics) -> str:
        oos = f"{m.oos_recall:.1%}" if m.oos_recall is not None else "n/a (no out-of-scope examples)"
        return (
            f"  {name:<22} accuracy {m.accuracy:.1%}   in-scope accuracy {m.in_scope_accuracy:.1%}   "
            f"out-of-scope recall {oos}"
        )

    n_in, n_out = int((labels != OUT_OF_SCOPE).sum()), int((labels == OUT_OF_SCOPE).sum())
    typer.echo(f"step      {job.where}[{index}] '{step.name}' ({step.encoder_id})")
    typer.echo(f"examples  {len(rows)}: {n_in} in scope, {n_out} out of scope")
    train_rows, held_rows = split_held_out(labels)
    try:
        if len(held_rows) and len(train_rows) >= 2:
            typer.echo(
                f"held out  {len(held_rows)} examples (a quarter of each route's and of the out-of-scope "
                f"ones, seed 0); fitted on the other {len(train_rows)} and the utterances:"
            )
            part, held = every.take(train_rows), every.take(held_rows)
            scores_part, scores_held = step.score_many(part.vectors), step.score_many(held.vectors)
            current = np.array([r.threshold for r in step.routes])
            fitted = fit(scores_part, part.labels, objective=objective, per_route=job.per_route)
            typer.echo(line("similarity, current", evaluate(scores_held, held.labels, current)))
            typer.echo(line("similarity, fitted", evaluate(scores_held, held.labels, fitted)))
            typer.echo("training  on the other examples…", err=True)
            model = train(base, part, targets, step.encoder_id, objective=objective)
            probs = model.probabilities_many(held.vectors, held.texts)
            typer.echo(line("trained", evaluate(probs, held.labels, np.full(len(targets), model.threshold))))
        else:
            typer.echo("held out  none: too few examples to compare the methods (give each route a few)")
        typer.echo("training  on every example…", err=True)
        model = train(base, every, targets, step.encoder_id, objective=objective)
    except ValueError as exc:
        raise fail(str(exc)) from None
    model.save(path)
    kb = path.stat().st_size / 1024
    typer.echo(
        f"trained   on {len(base)} utterances + {len(rows)} examples; threshold p >= {model.threshold:.3f} "
        f"(fitted on {min(FOLDS, len(rows))}-fold held-out probabilities, {objective})"
    )
    typer.echo(f"artifact  {path} ({kb:.0f} kB)")
    if output is None:
        typer.echo(
            f"(set method: trained and artifact: {path} on step '{step.name}', "
            "or use --output FILE to write that config)"
        )
        return
    here, where_file = output.resolve().parent, path.resolve()
    artifact = os.path.relpath(where_file, here) if where_file.is_relative_to(here) else str(where_file)
    write_fitted_step(
        job.config, job.template, index, output, lambda node: node.update(method="trained", artifact=artifact)
    )
    typer.echo(f"wrote     {output} (method: trained, artifact: {artifact})")
