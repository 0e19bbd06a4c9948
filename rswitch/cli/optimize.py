"""`rswitch optimize ID`: run MIPROv2 (or the reflective search) here, or `--watch` a running
gateway's background run."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from rswitch.cli import through
from rswitch.cli.common import DEFAULT_URL, ConfigOpt, admin_key, fail, get_template, load, new_core, registry


def optimize(
    template_id: str,
    config: ConfigOpt = None,
    combination: Annotated[
        str | None, typer.Option(help="Optimize for this combination (default: the template's primary).")
    ] = None,
    strategy: Annotated[
        str,
        typer.Option(
            help="mipro: MIPROv2 (instructions x demo sets); reflective: a proposer rewrites the "
            "instruction from the failures (GEPA-style)."
        ),
    ] = "mipro",
    auto: Annotated[str, typer.Option(help="MIPROv2 preset: light | medium | heavy.")] = "light",
    trials: Annotated[
        int | None,
        typer.Option(
            help="Search trials (default: from the preset); reflective: rounds (default 12).", min=1
        ),
    ] = None,
    minibatch_size: Annotated[
        int | None,
        typer.Option("--minibatch-size", help="reflective: training rows a round shows (default 3).", min=1),
    ] = None,
    pool_size: Annotated[
        int | None,
        typer.Option(
            "--pool-size", help="reflective: candidates kept in the Pareto pool (default 8).", min=1
        ),
    ] = None,
    instructions: Annotated[
        int | None, typer.Option(help="Instruction candidates, the current one included.", min=1)
    ] = None,
    demo_sets: Annotated[int | None, typer.Option("--demo-sets", help="Demo-set candidates.", min=1)] = None,
    evaluator: Annotated[
        str,
        typer.Option(
            help="similarity | exact_match | keyword_match | token_f1 | fuzzy | json_fields | llm_judge"
        ),
    ] = "similarity",
    proposer: Annotated[
        str | None, typer.Option(help="Combination whose model proposes instructions (default: the task's).")
    ] = None,
    judge: Annotated[str | None, typer.Option(help="Combination whose model judges (llm_judge).")] = None,
    budget_calls: Annotated[
        int, typer.Option("--budget-calls", help="Hard cap on model calls.", min=1)
    ] = 2000,
    budget_cost: Annotated[float, typer.Option("--budget-cost", help="Hard cap on cost (USD).", min=0)] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed for splits, sampling and search.")] = 0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Run and report, but write nothing back.")
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="Follow the background optimizer's run in a running gateway, trial by trial."
        ),
    ] = False,
    url: Annotated[
        str | None, typer.Option(help=f"With --watch: the running gateway (default {DEFAULT_URL}).")
    ] = None,
    request: Annotated[
        bool, typer.Option("--request", help="With --watch: ask the gateway to start a run now.")
    ] = False,
) -> None:
    """Run MIPROv2 on a template's recorded, labelled traffic; promote the winner only if it beats the incumbent on test."""
    local_only = {
        "--combination": combination is not None,
        "--strategy": strategy != "mipro",
        "--minibatch-size": minibatch_size is not None,
        "--pool-size": pool_size is not None,
        "--auto": auto != "light",
        "--trials": trials is not None,
        "--instructions": instructions is not None,
        "--demo-sets": demo_sets is not None,
        "--evaluator": evaluator != "similarity",
        "--proposer": proposer is not None,
        "--judge": judge is not None,
        "--budget-calls": budget_calls != 2000,
        "--budget-cost": budget_cost != 5.0,
        "--seed": seed != 0,
        "--dry-run": dry_run,
    }
    if watch:
        given = [name for name, used in local_only.items() if used]
        if config is not None:
            given.append("--config")
        if given:
            raise fail(
                f"{', '.join(given)}: only for a run here; with --watch the gateway's own "
                "gateway.optimization settings apply"
            )
        watch_optimizer(url or DEFAULT_URL, template_id, request=request)
        return
    if url is not None or request:
        raise fail("--url and --request go with --watch (following a running gateway's optimizer)")
    gateway = through.owner(load(config))
    if gateway is not None:  # it holds the stores: it runs the optimization, and this follows it
        given = [name for name, used in local_only.items() if used]
        if given:
            raise fail(
                f"{', '.join(given)}: only for a run here; the gateway at {gateway.admin_url} owns this "
                "data and runs optimizations with its own gateway.optimization settings (stop it to run here)"
            )
        watch_optimizer(gateway.admin_url, template_id, request=True, owner=True)
        return
    run_here(
        template_id,
        config,
        combination=combination,
        strategy=strategy,
        auto=auto,
        trials=trials,
        minibatch_size=minibatch_size,
        pool_size=pool_size,
        instructions=instructions,
        demo_sets=demo_sets,
        evaluator=evaluator,
        proposer=proposer,
        judge=judge,
        budget_calls=budget_calls,
        budget_cost=budget_cost,
        seed=seed,
        dry_run=dry_run,
    )


def run_here(
    template_id: str,
    config: str | None,
    *,
    combination: str | None,
    strategy: str,
    auto: str,
    trials: int | None,
    minibatch_size: int | None,
    pool_size: int | None,
    instructions: int | None,
    demo_sets: int | None,
    evaluator: str,
    proposer: str | None,
    judge: str | None,
    budget_calls: int,
    budget_cost: float,
    seed: int,
    dry_run: bool,
) -> None:
    """The search in this process, with its own gateway core, and a live progress line (on a
    terminal; elsewhere, e.g. in a log, one line per stage)."""
    import asyncio
    import difflib

    from rswitch.optimizer.evaluators import EVALUATORS
    from rswitch.optimizer.mipro import Budget, Settings
    from rswitch.optimizer.reflective import ReflectiveSettings
    from rswitch.optimizer.service import OptimizeError
    from rswitch.optimizer.service import optimize as run_optimize

    # everything that can be checked without starting a gateway is checked first
    if evaluator not in EVALUATORS:
        raise fail(f"unknown evaluator {evaluator!r}; choose one of: {', '.join(EVALUATORS)}")
    if evaluator == "llm_judge" and not judge:
        raise fail("the llm_judge evaluator needs --judge COMBINATION_ID")
    if strategy not in ("mipro", "reflective"):
        raise fail(f"--strategy must be mipro or reflective; got {strategy!r}")
    only = (
        {"--auto": auto != "light", "--instructions": instructions, "--demo-sets": demo_sets}
        if strategy == "reflective"
        else {"--minibatch-size": minibatch_size, "--pool-size": pool_size}
    )
    given = [name for name, used in only.items() if used]
    if given:
        other = "mipro" if strategy == "reflective" else "reflective"
        raise fail(f"{', '.join(given)}: only for --strategy {other}")
    cfg = load(config)
    settings: Settings | ReflectiveSettings
    try:
        if strategy == "reflective":
            defaults = cfg.gateway.optimization.reflective
            settings = ReflectiveSettings(
                seed=seed,
                max_proposals=trials or defaults.max_proposals,
                minibatch_size=minibatch_size or defaults.minibatch_size,
                pool_size=pool_size or defaults.pool_size,
            )
        else:
            settings = Settings.auto(
                auto, seed=seed, num_trials=trials, num_instructions=instructions, num_demo_sets=demo_sets
            )
    except ValueError as exc:
        raise fail(str(exc)) from None
    get_template(registry(config), template_id)
    core = new_core(cfg)

    async def main() -> Any:
        await core.start()
        try:
            with _Progress(settings.trials()) as progress:
                return await run_optimize(
                    core,
                    template_id,
                    settings=settings,
                    combination_id=combination,
                    evaluator=evaluator,
                    proposer=proposer,
                    judge=judge,
                    budget=Budget(budget_calls, budget_cost),
                    dry_run=dry_run,
                    on_trial=progress.trial,
                    on_stage=progress.stage,
                )
        finally:
            await core.stop()

    try:
        result, version = asyncio.run(main())
    except OptimizeError as exc:
        raise fail(str(exc)) from None

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    typer.echo(
        f"run {result.run_id}: {len(result.trials)} trial(s), {sum(result.calls.values())} call(s) {result.calls}, "
        f"{result.tokens} tokens, ${result.cost:.4f}, {result.seconds:.1f} s"
    )
    typer.echo(f"validation  seed {fmt(result.baseline_val)}  winner {fmt(result.winner_val)}")
    typer.echo(f"test        seed {fmt(result.incumbent_test)}  winner {fmt(result.winner_test)}")
    typer.echo(f"verdict     {result.verdict}")
    winner = result.winner_candidate
    if winner is not None and result.winner != (0, 0):
        diff = difflib.unified_diff(
            result.instructions[0].splitlines(),
            winner.instruction.splitlines(),
            "current",
            "winner",
            lineterm="",
        )
        typer.echo("\n".join(diff))
        typer.echo(f"winner demos: {len(winner.demos)}")
    if version is not None:
        typer.echo(
            f"wrote template '{template_id}' version {version} (rswitch template rollback {template_id} N to undo)"
        )


class _Progress:
    """A run's progress: on a terminal one live line (the stage, a bar of trials done, the last
    trial's scores, calls and cost); elsewhere each stage printed once, as a line, in order."""

    def __init__(self, total: int) -> None:
        import sys

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.live = sys.stdout.isatty()
        self.last: str | None = None
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            disable=not self.live,
        )
        self.task = self.bar.add_task("starting", total=total, info="")

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def stage(self, name: str) -> None:
        if name == self.last:
            return
        self.last = name
        if self.live:
            self.bar.update(self.task, description=name)
        else:
            typer.echo(f"{name}…")

    def trial(self, t: dict[str, Any]) -> None:
        full = f" full {t['full_score']:.3f}" if t.get("full_score") is not None else ""
        self.bar.update(
            self.task,
            completed=t["trial"] + 1,
            info=f"score {t['minibatch_score']:.3f}{full}  best {t['best_score']:.3f}  "
            f"calls {t['calls']}  ${t['cost']:.4f}",
        )


# -- --watch --------------------------------------------------------------------------------------


def _new_entries(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries appended to the optimizer's bounded list of finished runs since `before`."""
    for shift in range(len(before) + 1):
        if now[: len(before) - shift] == before[shift:]:
            return now[len(before) - shift :]
    return now


class _Gateway:
    """The few optimizer endpoints of a running gateway, with errors an operator can act on."""

    def __init__(self, url: str) -> None:

        import httpx

        self.url = url.rstrip("/")
        key = admin_key(self.url)  # a gateway with keys asks for its admin key
        headers = {"authorization": f"Bearer {key}"} if key else None
        self.http = httpx.Client(base_url=self.url, timeout=10, headers=headers)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            resp = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise fail(
                f"cannot reach the gateway at {self.url} ({type(exc).__name__}); "
                "start it with `rswitch serve` or `rswitch tui`, or pass --url",
                1,
            ) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise fail(
                f"{self.url}{path} answered HTTP {resp.status_code}, not JSON: is it an rswitch gateway?", 1
            )
        if resp.status_code in (401, 403):  # a gateway with keys (gateway.auth)
            message = (body.get("error") or {}).get("message") or f"HTTP {resp.status_code}"
            raise fail(f"{self.url}{path}: {message}; set RSWITCH_ADMIN_KEY to the gateway's admin key", 1)
        return resp.status_code, body

    def status(self, template_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(finished runs recorded in analytics, the optimizer's live status)."""
        code, body = self._call("GET", "/v1/optimizer/runs", params={"template_id": template_id})
        if code != 200 or "optimizer" not in body:
            raise fail(f"{self.url}/v1/optimizer/runs answered HTTP {code}: is it an rswitch gateway?", 1)
        return body.get("runs") or [], body["optimizer"]

    def trials(self, template_id: str) -> list[dict[str, Any]]:
        code, body = self._call("GET", "/v1/optimizer/trials", params={"template_id": template_id})
        return body.get("trials") or [] if code == 200 else []

    def templates(self) -> set[str]:
        code, body = self._call("GET", "/v1/models")
        return {m["id"] for m in body.get("data") or [] if m.get("rswitch_kind") == "template"}

    def request(self, template_id: str) -> None:
        code, body = self._call("POST", "/v1/optimizer/runs", json={"template_id": template_id})
        if code != 202:
            message = (body.get("error") or {}).get("message") or f"HTTP {code}"
            raise fail(f"the gateway refused to start a run: {message}", 1)


def _trial_line(t: dict[str, Any]) -> str:
    full = f"  full {t['full_score']:.3f}" if t.get("full_score") is not None else ""
    best = f"  best {t['best_score']:.3f}" if t.get("best_score") is not None else ""
    return (
        f"run {t['run_id']} trial {t['trial']:>3}  instruction {t['instruction']}  demos {t['demo_set']}  "
        f"minibatch {t['minibatch_score']:.3f}{full}{best}  calls {t['calls']}  ${(t.get('cost') or 0):.4f}"
    )


# A run's stages, in the order it goes through them (optimizer/service.py, mipro.py and
# reflective.py name them). The search's own ("trial 3/12", "round 2/12: reflecting on 3
# failure(s)", "trial 5/12: rescoring the best on validation") are its loop: a watcher shows
# the trials' own lines for those. MIPROv2 goes through every stage; the reflective search
# through loading, scoring the current prompt, its rounds and the gate.
STAGES = (
    "loading examples",
    "bootstrapping demos",
    "summarising data",
    "proposing instructions",
    "scoring the current prompt",
    "trials",
    "rescoring the current instruction with the winning demos",
    "testing the winner",
)
TRIALS_STAGE = STAGES.index("trials")


def stage_kind(stage: str) -> str:
    """A stage's place in STAGES: a stage of the search loop is "trials"."""
    return "trials" if stage.startswith(("trial ", "round ")) else stage


class _StageLine:
    """Which stage to print after a poll's trials, so the lines read in the order things happened:
    a stage the run has left (one before the trials, once a trial is shown) is never printed, and
    a stage after the trials waits until every trial the run reports has been printed. The loop's
    stages are not printed: each trial prints its own line."""

    def __init__(self) -> None:
        self.shown: str | None = None

    def due(self, stage: Any, trials_shown: int, trials_run: int) -> str | None:
        if not isinstance(stage, str) or stage_kind(stage) in (self.shown, "trials"):
            return None
        rank = STAGES.index(stage) if stage in STAGES else None
        if rank is not None:
            before = STAGES.index(self.shown) if self.shown in STAGES else -1
            if rank < before or (rank < TRIALS_STAGE and trials_shown):
                return None  # polled before a later stage or trial that is already on screen
            if rank > TRIALS_STAGE and trials_shown < trials_run:
                return None  # some trials are not in analytics yet: they go first
        self.shown = stage
        return stage


def watch_optimizer(
    url: str,
    template_id: str,
    request: bool,
    poll: float = 0.5,
    timeout: float | None = None,
    owner: bool = False,
) -> None:
    """Print a template's trials as the gateway's background optimizer records them, until the
    run ends (with --request: the run it asked for; else the current or next run). `owner`: the
    gateway owns this command's data, so a run here is not the way out."""
    gw = _Gateway(url)
    finished_before, status = gw.status(template_id)
    if not status.get("enabled"):
        instead = (
            "and restart it, or stop it and run `rswitch optimize` here"
            if owner
            else f"in its config, or run `rswitch optimize {template_id}` here without --watch"
        )
        raise fail(
            f"the gateway at {gw.url} runs no background optimizer: set gateway.optimization.enabled {instead}",
            1,
        )
    if template_id not in gw.templates():
        raise fail(f"the gateway at {gw.url} has no template '{template_id}'", 1)
    old_runs = {r["run_id"] for r in finished_before}
    ended_before = list(status.get("runs") or [])
    if request:
        gw.request(template_id)
        typer.echo(
            f"asked {gw.url} to optimize '{template_id}'; watching (Ctrl+C stops watching, not the run)"
        )
    elif status.get("running") == template_id:
        typer.echo(f"watching the run of '{template_id}' on {gw.url} (Ctrl+C stops watching, not the run)")
    else:
        every = status.get("interval_seconds")
        when = (
            f"checks every {every:g} s" if status.get("periodic", True) and every else "runs only on request"
        )
        typer.echo(
            f"waiting for the next run of '{template_id}' on {gw.url} (its optimizer {when}; "
            "--request starts one now; Ctrl+C stops watching)"
        )
    shown: set[tuple[str, int]] = set()
    announced = ""
    stages = _StageLine()
    started = time.monotonic()
    try:
        while timeout is None or time.monotonic() - started < timeout:
            _, status = gw.status(template_id)  # first: the trials fetched next are at least as new
            mine = [
                r
                for r in _new_entries(ended_before, list(status.get("runs") or []))
                if r.get("template_id") == template_id
            ]
            for t in gw.trials(template_id):
                if t["run_id"] in old_runs or (t["run_id"], t["trial"]) in shown:
                    continue
                shown.add((t["run_id"], t["trial"]))
                typer.echo(_trial_line(t))
            if status.get("running") == template_id:  # the minutes before trial 0 are not silent
                stage = stages.due(status.get("stage"), len(shown), len(status.get("trials") or []))
                if stage:
                    typer.echo(f"'{template_id}': {stage}…")
            active = status.get("running") == template_id or template_id in (status.get("queued") or [])
            if mine and not active:
                end = mine[-1]
                if end.get("error"):
                    raise fail(f"the run of '{template_id}' failed: {end['error']}", 1)
                promoted = f" → version {end['new_version']}" if end.get("new_version") else ""
                typer.echo(
                    f"run {end.get('run_id')} finished: {end.get('verdict')}{promoted} "
                    f"({end.get('calls')} calls, ${(end.get('cost') or 0):.4f})"
                )
                return
            running = status.get("running")
            if running and running != template_id and template_id in (status.get("queued") or []):
                if announced != running:
                    typer.echo(f"queued behind the run of '{running}'")
                    announced = running
            time.sleep(poll)
    except KeyboardInterrupt:
        typer.echo("stopped watching; the gateway's run goes on")
        raise typer.Exit(130) from None
    raise fail(f"stopped watching after {timeout:g} s; the run had not finished", 1)
