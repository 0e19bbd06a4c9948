"""The `rswitch` command line (typer): serve, template …, config check."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from rswitch.config import Config, ConfigError, find_config, load_config
from rswitch.templates import MissingVariables, Template, TemplateError, TemplateRegistry, check_id

app = typer.Typer(help="rswitch: a self-hosted LLM gateway.", no_args_is_help=True, add_completion=False)
template_app = typer.Typer(help="Register, list, show and render prompt templates.", no_args_is_help=True)
config_app = typer.Typer(help="Validate configuration files.", no_args_is_help=True)
dataset_app = typer.Typer(
    help="Look at, export and bring in the examples a template's traffic produced.", no_args_is_help=True
)
app.add_typer(dataset_app, name="dataset")
route_app = typer.Typer(help="Inspect query-aware routing.", no_args_is_help=True)
app.add_typer(route_app, name="route")
package_app = typer.Typer(help="Export, import and inspect portable prompt packages.", no_args_is_help=True)
app.add_typer(package_app, name="package")
app.add_typer(template_app, name="template")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $RSWITCH_CONFIG, then ./config.yaml, then the built-in default).",
    ),
]

SAMPLES = Path(__file__).resolve().parent.parent / "sample_prompts"


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def load(config: str | None) -> Config:
    path = find_config(config)
    try:
        if path is None:
            from rswitch.defaults import default_config

            return default_config()[0]
        return load_config(path)
    except ConfigError as exc:
        raise fail(f"invalid config: {exc}") from None


def parse_addr(addr: str) -> tuple[str | None, int]:
    """Accept the seeds' Go-style --addr: ':8080', 'host:8080' or '[::1]:8080'."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise fail(f"--addr must look like ':8080' or 'HOST:PORT'; got {addr!r}")
    host = host.strip("[]")
    return (host or "0.0.0.0"), int(port)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default: gateway.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: gateway.port, 8080; 0 picks a free one).")
    ] = None,
    addr: Annotated[
        str | None, typer.Option(help="Go-style listen address, e.g. ':8080' (same as --host/--port).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level for rswitch's own messages.")] = "info",
) -> None:
    """Run the gateway headless."""
    import asyncio

    import uvicorn

    from rswitch.core import Core
    from rswitch.server import create_app

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    cfg = load(config)
    if addr:
        host, port = parse_addr(addr)
    host = host or cfg.gateway.host
    port = cfg.gateway.port if port is None else port
    try:
        core = Core(cfg)
    except ConfigError as exc:
        raise fail(f"invalid config: {exc}") from None
    except Exception as exc:
        raise fail(f"rswitch could not start: {type(exc).__name__}: {exc}") from None

    class GatewayServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises a caught SIGTERM/SIGINT after shutdown, which kills the process
            # before it can report; the lifespan has drained the recorder by then, so exit 0.
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    server = GatewayServer(
        uvicorn.Config(
            create_app(core),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            loop="uvloop",
            http="httptools",
            timeout_graceful_shutdown=10,
        )
    )

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.05)
        if server.started:
            bound = [s.getsockname() for srv in server.servers for s in srv.sockets]
            where = f"http://{bound[0][0]}:{bound[0][1]}" if bound else f"http://{host}:{port}"
            typer.echo("\n".join(core.summary(where)), err=False)
            typer.echo("  press Ctrl+C to stop (queued records are written before exit)")
            sys.stdout.flush()
        await task

    try:
        import uvloop  # uvicorn's loop="uvloop" is skipped when we drive server.serve() ourselves

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run())
    if not server.started:
        raise typer.Exit(1)
    typer.echo(f"rswitch stopped; {core.recorder.written} record(s) written, {core.recorder.dropped} dropped")


@app.command()
def tui(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address the in-process gateway binds.")] = None,
    port: Annotated[int | None, typer.Option(help="Its port (0 picks a free one).")] = None,
    theme: Annotated[
        str | None,
        typer.Option(help="A theme from themes/ or <data dir>/themes/ (default: tui.theme, then brutalist)."),
    ] = None,
    headless: Annotated[
        bool,
        typer.Option(
            "--headless", help="Run the app without a terminal (benchmarks); SIGTERM quits.", hidden=True
        ),
    ] = False,
) -> None:
    """The operator console: the gateway in-process, with live panes and keys that steer it."""
    from rswitch.core import Core
    from rswitch.tui.app import RSwitchApp
    from rswitch.tui.server import GatewayThread

    cfg = load(config)
    log_file = cfg.dataset_dir.parent / "rswitch-tui.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level="INFO", filename=log_file, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        core = Core(cfg)
    except Exception as exc:
        raise fail(f"rswitch could not start: {type(exc).__name__}: {exc}") from None
    core.on_demand_optimizer = True  # the optimize key works even when no periodic optimizer is set

    gateway = GatewayThread(core, host or cfg.gateway.host, cfg.gateway.port if port is None else port)
    try:
        url = gateway.start()
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    try:
        app = RSwitchApp(
            gateway,
            url=url,
            refresh=cfg.tui.refresh_seconds,
            theme=theme or cfg.tui.theme,
            keys=cfg.tui.keys,
            export_dir=cfg.dataset_dir.parent / "packages",
        )
        if headless:
            import signal

            signal.signal(signal.SIGTERM, lambda *_: app.call_later(app.exit))
        app.run(headless=headless)
    finally:
        gateway.stop()  # drains the recorder and stops the optimizer
    typer.echo(
        f"rswitch stopped; {core.recorder.written} record(s) written, {core.recorder.dropped} dropped (log: {log_file})"
    )


# -- templates ------------------------------------------------------------------------------


def registry(config: str | None) -> TemplateRegistry:
    from rswitch.core import open_registry

    try:
        return open_registry(load(config))
    except ConfigError as exc:
        raise fail(f"invalid config: {exc}") from None


@template_app.command("register")
def template_register(
    template_id: Annotated[str, typer.Option("--template-id", help="Id apps use in metadata.template_id.")],
    config: ConfigOpt = None,
    name: Annotated[str | None, typer.Option(help="Human-readable name.")] = None,
    prompt_text: Annotated[
        str | None, typer.Option("--prompt-text", help="The template text, with {var} placeholders.")
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", help="Read the template text from a file.")
    ] = None,
    variables: Annotated[
        str | None, typer.Option(help="Comma-separated variable names (default: the placeholders found).")
    ] = None,
    default_model: Annotated[str | None, typer.Option("--default-model")] = None,
    default_provider: Annotated[str | None, typer.Option("--default-provider")] = None,
) -> None:
    """Register (or update, as a new version) a template."""
    if (prompt_text is None) == (prompt_file is None):
        raise fail("give exactly one of --prompt-text or --prompt-file")
    if prompt_file is not None:
        try:
            prompt_text = prompt_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot read --prompt-file {prompt_file}: {exc.strerror}") from None
    if not (prompt_text or "").strip():
        raise fail("the template text is empty")
    cfg = load(config)
    if default_provider is not None and default_provider not in cfg.model_providers:
        raise fail(
            f"--default-provider {default_provider!r} is not a provider in the config; known: {', '.join(cfg.model_providers) or 'none'}"
        )
    names = [v.strip() for v in variables.split(",") if v.strip()] if variables else []
    try:
        check_id(template_id)
        tpl = Template(
            id=template_id,
            template=prompt_text or "",
            name=name or template_id,
            variables=names,
            default_model=default_model,
            default_provider=default_provider,
        )
        tpl = TemplateRegistry(cfg.dataset_dir).register(tpl)
    except TemplateError as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"registered template '{tpl.id}' version {tpl.version} → {cfg.dataset_dir / tpl.id / 'manifest.yaml'}"
    )
    typer.echo(f"  variables: {', '.join(tpl.variables) or '(none)'}")


@template_app.command("list")
def template_list(config: ConfigOpt = None) -> None:
    """List registered templates (and those defined in the config)."""
    reg = registry(config)
    items = reg.list()
    if not items:
        typer.echo(f"no templates under {reg.base_dir}")
        return
    typer.echo(f"{'ID':<24} {'VER':>3}  {'SOURCE':<8} {'VARIABLES':<28} NAME")
    for t in items:
        typer.echo(f"{t.id:<24} {t.version:>3}  {t.source:<8} {', '.join(t.variables)[:28]:<28} {t.name}")
    for e in reg.load_errors:
        typer.secho(f"warning: {e}", err=True, fg=typer.colors.YELLOW)


def _get(reg: TemplateRegistry, template_id: str) -> Template:
    tpl = reg.get(template_id)
    if tpl is None:
        known = ", ".join(t.id for t in reg.list()) or "none"
        raise fail(f"unknown template id '{template_id}' (known: {known})")
    return tpl


@template_app.command("show")
def template_show(template_id: str, config: ConfigOpt = None) -> None:
    """Print a template's manifest."""
    tpl = _get(registry(config), template_id)
    typer.echo(
        yaml.safe_dump({**tpl.manifest(), "source": tpl.source}, sort_keys=False, allow_unicode=True).rstrip()
    )


@template_app.command("render")
def template_render(
    template_id: str,
    var: Annotated[
        list[str] | None, typer.Option("--var", help="A variable as name=value; repeat for more.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Render a template with --var name=value … and print the text."""
    values: dict[str, Any] = {}
    for item in var or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise fail(f"--var must be name=value; got {item!r}")
        values[k] = v
    tpl = _get(registry(config), template_id)
    try:
        typer.echo(tpl.render(values))
    except MissingVariables as exc:
        raise fail(f"{exc}; pass them as --var NAME=VALUE") from None


@template_app.command("history")
def template_history(template_id: str, config: ConfigOpt = None) -> None:
    """List a template's versions with their score and provenance."""
    reg = registry(config)
    tpl = _get(reg, template_id)
    versions = (
        [*reg.history(template_id), {**tpl.manifest()}] if tpl.source == "registry" else [tpl.manifest()]
    )
    for v in versions:
        prov = v.get("provenance") or {}
        why = ""
        if "run_id" in prov:
            why = f"optimizer run {prov['run_id']} ({prov.get('evaluator')}): test {prov.get('incumbent_test_score', 0):.3f} → {prov.get('test_score', 0):.3f}"
        elif "rollback_of" in prov:
            why = f"rollback to version {prov['rollback_of']}"
        current = " (current)" if v.get("version") == tpl.version else ""
        demos = len(v.get("demos") or [])
        typer.echo(f"v{v.get('version')}{current}  {v.get('updated_at')}  {demos} demo(s)  {why}")
        typer.echo(f"    {str(v.get('template')).splitlines()[0][:100] if v.get('template') else ''}")


@template_app.command("rollback")
def template_rollback(template_id: str, version: int, config: ConfigOpt = None) -> None:
    """Make an earlier version current again (recorded as a new version)."""
    reg = registry(config)
    _get(reg, template_id)
    try:
        tpl = reg.rollback(template_id, version)
    except TemplateError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"template '{template_id}' is now version {tpl.version}, a copy of version {version}")


# -- optimize ---------------------------------------------------------------------------------------


@app.command()
def optimize(
    template_id: str,
    config: ConfigOpt = None,
    combination: Annotated[
        str | None, typer.Option(help="Optimize for this combination (default: the template's primary).")
    ] = None,
    auto: Annotated[str, typer.Option(help="MIPROv2 preset: light | medium | heavy.")] = "light",
    trials: Annotated[
        int | None, typer.Option(help="Search trials (default: from the preset).", min=1)
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
) -> None:
    """Run MIPROv2 on a template's recorded, labelled traffic; promote the winner only if it beats the incumbent on test."""
    import asyncio
    import difflib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rswitch.core import Core
    from rswitch.optimizer.mipro import Budget, Settings
    from rswitch.optimizer.service import OptimizeError
    from rswitch.optimizer.service import optimize as run_optimize

    cfg = load(config)
    try:
        settings = Settings.auto(
            auto, seed=seed, num_trials=trials, num_instructions=instructions, num_demo_sets=demo_sets
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        core = Core(cfg)
    except Exception as exc:
        raise fail(f"rswitch could not start: {type(exc).__name__}: {exc}") from None

    async def main() -> Any:
        await core.start()
        try:
            with Progress(
                TextColumn("[bold]trial"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
            ) as bar:
                task = bar.add_task(
                    "optimize", total=settings.trials(), info="preparing demos and instructions…"
                )

                def on_trial(t: dict[str, Any]) -> None:
                    full = f" full {t['full_score']:.3f}" if t.get("full_score") is not None else ""
                    bar.update(
                        task,
                        completed=t["trial"] + 1,
                        info=f"score {t['minibatch_score']:.3f}{full}  best {t['best_score']:.3f}  "
                        f"calls {t['calls']}  ${t['cost']:.4f}",
                    )

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
                    on_trial=on_trial,
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


def watch_optimizer(
    url: str, template_id: str, request: bool, poll: float = 0.5, timeout: float | None = None
) -> None:
    """Print a template's trials as the gateway's background optimizer records them."""
    import time

    import httpx

    base = url.rstrip("/")
    try:
        before = {
            r["run_id"]
            for r in httpx.get(
                f"{base}/v1/optimizer/runs", params={"template_id": template_id}, timeout=10
            ).json()["runs"]
        }
        if request:
            r = httpx.post(f"{base}/v1/optimizer/runs", json={"template_id": template_id}, timeout=10)
            if r.status_code != 202:
                raise fail(f"the gateway refused: {r.json()['error']['message']}")
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach the gateway at {url} ({type(exc).__name__})") from None
    typer.echo(f"watching '{template_id}' on {base} (Ctrl+C to stop)")
    shown: set[tuple[str, int]] = set()
    started = time.monotonic()
    while timeout is None or time.monotonic() - started < timeout:
        trials = httpx.get(
            f"{base}/v1/optimizer/trials", params={"template_id": template_id}, timeout=10
        ).json()["trials"]
        for t in trials:
            if t["run_id"] in before or (t["run_id"], t["trial"]) in shown:
                continue
            shown.add((t["run_id"], t["trial"]))
            full = f"  full {t['full_score']:.3f}" if t.get("full_score") is not None else ""
            typer.echo(
                f"run {t['run_id']} trial {t['trial']:>3}  instruction {t['instruction']}  demos {t['demo_set']}  "
                f"minibatch {t['minibatch_score']:.3f}{full}  best {t['best_score']:.3f}  calls {t['calls']}  ${t['cost']:.4f}"
            )
        runs = httpx.get(f"{base}/v1/optimizer/runs", params={"template_id": template_id}, timeout=10).json()[
            "runs"
        ]
        done = [r for r in runs if r["run_id"] not in before]
        if done:
            r = done[0]
            typer.echo(
                f"run {r['run_id']} finished: {r['verdict']}"
                + (f" → version {r['new_version']}" if r.get("new_version") else "")
            )
            return
        time.sleep(poll)


# -- load -----------------------------------------------------------------------------------------


@app.command("load")
def load_traffic(
    url: Annotated[str, typer.Option(help="The running gateway.")] = "http://127.0.0.1:8080",
    rate: Annotated[float | None, typer.Option(help="Open loop: requests per second.", min=0.001)] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Closed loop: requests in flight (default 4).", min=1)
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests", "-n", help="Stop after N requests (default 100 unless --duration).", min=1
        ),
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after S seconds.", min=0.1)] = None,
    template: Annotated[
        str | None, typer.Option("--template", help="Only this sample template's examples.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="JSONL of request bodies instead of the samples.")
    ] = None,
    stream: Annotated[bool, typer.Option(help="Send streaming requests.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Replay sample inputs (or a JSONL file) through a running gateway and summarise."""
    import asyncio

    import orjson
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rswitch.loadgen import LoadError, read_jsonl, run_load, sample_requests

    if rate is not None and concurrency is not None:
        raise fail("give --rate or --concurrency, not both")
    if requests is None and duration is None:
        requests = 100
    try:
        bodies = read_jsonl(file, template) if file else sample_requests(SAMPLES, template)
    except LoadError as exc:
        raise fail(str(exc)) from None

    total = requests
    with Progress(
        TextColumn("[bold]load"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        transient=True,
        disable=json_out,
    ) as progress:
        task = progress.add_task("load", total=total, info="")

        def tick(r: Any) -> None:
            done = r.ok + sum(r.errors.values())
            progress.update(task, completed=done, info=f"ok {r.ok}  errors {sum(r.errors.values())}")

        try:
            result = asyncio.run(
                run_load(
                    url,
                    bodies,
                    concurrency=None if rate else (concurrency or 4),
                    rate=rate,
                    total=requests,
                    duration=duration,
                    stream=stream,
                    on_progress=tick,
                )
            )
        except LoadError as exc:
            raise fail(str(exc)) from None
    s = result.summary()
    if json_out:
        typer.echo(orjson.dumps(s, option=orjson.OPT_INDENT_2).decode())
        return
    lat = s["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    typer.echo(
        f"requests     {s['requests']}  ({s['succeeded']} ok, {s['requests'] - s['succeeded']} failed) in {s['elapsed_s']:.2f} s"
    )
    typer.echo(f"throughput   {s['throughput_rps']:.1f} req/s")
    typer.echo(f"latency      p50 {ms(lat['p50'])}  p95 {ms(lat['p95'])}  p99 {ms(lat['p99'])}")
    typer.echo(f"tokens       {s['tokens']['prompt']} prompt, {s['tokens']['completion']} completion")
    typer.echo(f"cost         ${s['cost_usd']:.6f}" + ("  (streams: see /status)" if stream else ""))
    for combo, n in sorted(s["by_combination"].items()):
        typer.echo(f"  served by  {combo:<24} {n}")
    for err, n in sorted(s["errors"].items()):
        typer.echo(f"  error      {err:<24} {n}")
    if s["requests"] and not s["succeeded"]:
        raise typer.Exit(1)


# -- routing --------------------------------------------------------------------------------------


class _RoutingRuntime:
    """The router chains of a config with the providers they need (encoders, judges), started in
    the running loop: what `route explain` and `route fit` run, without the rest of the gateway."""

    def __init__(self, cfg: Config) -> None:
        from rswitch.core import caller_factory, embedder_factory, routing_providers
        from rswitch.routing.chains import build_chains

        self.providers = routing_providers(cfg)
        cache = cfg.dataset_dir.parent / "routing"
        self.default, self.per_template = build_chains(
            cfg.routing, embedder_factory(self.providers), cache, caller_factory(self.providers)
        )

    async def __aenter__(self) -> _RoutingRuntime:
        for p in self.providers.values():
            await p.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for p in self.providers.values():
            await p.close()

    def chain(self, template: str | None) -> Any:
        return (self.per_template.get(template) if template else None) or self.default


@route_app.command("explain")
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
    out: list[tuple[str, str | None]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise fail(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise fail(f'{path}:{n}: each line needs "text" (a non-empty string) and "route"')
        label = row.get("route")
        if label is not None and not isinstance(label, str):
            raise fail(f'{path}:{n}: "route" must be a string, or null for out of scope')
        if label is None or label.strip().lower() in OOS_LABELS:
            out.append((row["text"], None))
            continue
        try:
            out.append((row["text"], resolve(label.strip())[0]))
        except KeyError:
            raise fail(f"{path}:{n}: unknown tier in {label!r} (routing.tiers defines the tiers)") from None
    if not out:
        raise fail(f"{path}: no examples")
    return out


@route_app.command("fit")
def route_fit(
    examples: Annotated[
        Path,
        typer.Option(
            "--examples",
            "-e",
            help='JSONL, one {"text": …, "route": …} a line; route null or "oos" = out of scope.',
        ),
    ],
    config: ConfigOpt = None,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Fit this template's chain (default: the gateway-wide one)."),
    ] = None,
    step_name: Annotated[
        str | None, typer.Option("--step", help="The semantic step to fit (default: the chain's first).")
    ] = None,
    objective: Annotated[
        str, typer.Option(help="balanced (mean of in-scope accuracy and OOS recall) or accuracy.")
    ] = "balanced",
    per_route: Annotated[
        bool, typer.Option("--per-route", help="A threshold per route (needs several examples per route).")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write the config with the fitted thresholds to this file (comments are not kept)."
        ),
    ] = None,
) -> None:
    """Calibrate a semantic step's thresholds on labelled examples; report accuracy and OOS recall."""
    import asyncio

    import numpy as np

    from rswitch.routing.chains import target_resolver
    from rswitch.routing.fit import OBJECTIVES, OUT_OF_SCOPE, evaluate, fit
    from rswitch.routing.semantic import SemanticStep

    if objective not in OBJECTIVES:
        raise fail(f"--objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    cfg = load(config)
    if template is not None and template not in cfg.routing.templates:
        raise fail(f"no routing chain for template '{template}' (routing.templates has none)")
    steps_cfg = cfg.routing.templates[template] if template else cfg.routing.default
    where = f"routing.templates.{template}" if template else "routing.default"
    semantic = [(i, s) for i, s in enumerate(steps_cfg) if s.type == "semantic"]
    if step_name is not None:
        semantic = [(i, s) for i, s in semantic if s.name == step_name]
    if not semantic:
        what = f"named '{step_name}' " if step_name else ""
        raise fail(f"{where} has no semantic step {what}to fit")
    index, step_cfg = semantic[0]
    rows = _read_route_examples(examples, target_resolver(cfg.routing.tiers))
    runtime = _RoutingRuntime(cfg)
    chain = runtime.chain(template)
    step = chain.steps[index]
    assert isinstance(step, SemanticStep)
    targets = [r.target for r in step.routes]
    unknown = sorted({t for _, t in rows if t is not None and t not in targets})
    if unknown:
        raise fail(
            f"examples name routes step '{step.name}' does not have: {', '.join(unknown)}; "
            f"its routes: {', '.join(targets)}"
        )
    labels = np.array([targets.index(t) if t is not None else OUT_OF_SCOPE for _, t in rows])

    async def embed_all() -> np.ndarray:
        async with runtime:
            await step.warm()
            vectors = []
            texts = [t for t, _ in rows]
            for start in range(0, len(texts), 64):
                vectors.extend(np.asarray(await step.embed(texts[start : start + 64]), dtype=np.float32))
                typer.echo(f"\rembedded {min(start + 64, len(texts))}/{len(texts)}", nl=False, err=True)
            typer.echo("", err=True)
            return np.vstack(vectors)

    scores = step.score_many(asyncio.run(embed_all()))
    before = evaluate(scores, labels, np.array([r.threshold for r in step.routes]))
    thresholds = fit(scores, labels, objective=objective, per_route=per_route)
    after = evaluate(scores, labels, thresholds)

    def line(name: str, m: Any) -> str:
        oos = f"{m.oos_recall:.1%}" if m.oos_recall is not None else "n/a (no out-of-scope examples)"
        return (
            f"{name:<8} accuracy {m.accuracy:.1%}   in-scope accuracy {m.in_scope_accuracy:.1%}   "
            f"out-of-scope recall {oos}"
        )

    typer.echo(f"step      {where}[{index}] '{step.name}' ({step.encoder_id})")
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
    source = find_config(config)
    if source is None:
        raise fail("--output needs a config file (the built-in default has no routing to fit)")
    data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    node = data["routing"]["templates"][template] if template else data["routing"]["default"]
    for route, t in zip(node[index]["routes"], thresholds, strict=True):
        route["threshold"] = round(float(t), 4)
    output.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    typer.echo(f"wrote     {output}")


# -- datasets -------------------------------------------------------------------------------------


def _dataset(config: str | None, template_id: str) -> Any:
    from rswitch.storage.datasets import DatasetStore

    cfg = load(config)
    _get(registry(config), template_id)  # unknown ids are an error that lists the known ones
    return DatasetStore(cfg.dataset_dir, cfg.dataset.max_records)


def _example(row: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "request_id",
        "created_at",
        "combination_id",
        "model",
        "variables",
        "messages",
        "output",
        "success",
        "label_expected",
        "label_score",
        "label_comment",
        "label_source",
        "origin",
    )
    return {k: row.get(k) for k in keys}


@dataset_app.command("show")
def dataset_show(
    template_id: str,
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="Newest N rows.", min=1)] = 20,
    labelled: Annotated[bool, typer.Option("--labelled", help="Only rows with a label.")] = False,
) -> None:
    """Print a template's newest examples, as the optimizer will see them."""
    store = _dataset(config, template_id)
    rows = [
        r
        for r in store.recent(template_id, limit if not labelled else 100_000)
        if not labelled or _is_labelled(r)
    ][:limit]
    if not rows:
        typer.echo(f"no {'labelled ' if labelled else ''}examples for '{template_id}' yet")
        return
    for r in rows:
        last_user = next((m.get("content") for m in reversed(r["messages"]) if m.get("role") == "user"), "")
        label = r.get("label_expected") if r.get("label_expected") is not None else r.get("label_score")
        typer.echo(
            f"{r['created_at']}  {'ok ' if r['success'] else 'ERR'}  {r['combination_id'] or r.get('origin', ''):<18} "
            f"in: {str(last_user)[:40]!r}  out: {r['output'][:40]!r}"
            + (f"  label: {str(label)[:30]!r}" if label is not None else "")
        )


def _is_labelled(r: dict[str, Any]) -> bool:
    return r.get("label_expected") is not None or r.get("label_score") is not None


@dataset_app.command("export")
def dataset_export(
    template_id: str,
    config: ConfigOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSONL file (default: standard output).")
    ] = None,
    labelled: Annotated[bool, typer.Option("--labelled", help="Only rows with a label.")] = False,
) -> None:
    """Write a template's examples as JSONL (oldest first)."""
    import orjson

    store = _dataset(config, template_id)
    rows = [
        _example(r)
        for r in reversed(store.recent(template_id, 10_000_000))
        if not labelled or _is_labelled(r)
    ]
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    if output is None:
        sys.stdout.write(data.decode())
    else:
        output.write_bytes(data)
        typer.echo(f"wrote {len(rows)} example(s) to {output}", err=True)


@dataset_app.command("import")
def dataset_import(template_id: str, file: Path, config: ConfigOpt = None) -> None:
    """Bring in labelled examples: JSONL lines of {"messages" or "input", "variables", "expected", "score", "output"}."""
    import orjson

    store = _dataset(config, template_id)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror}") from None
    rows: list[dict[str, Any]] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise fail(f"{file}:{n}: not valid JSON ({exc}); nothing imported") from None
        problem = _import_problem(row)
        if problem:
            raise fail(f"{file}:{n}: {problem}; nothing imported")
        if "input" in row and "messages" not in row:
            row["messages"] = [{"role": "user", "content": row.pop("input")}]
        rows.append(row)
    if not rows:
        raise fail(f"{file} holds no examples")
    count = store.import_rows(template_id, rows)
    store.close()
    labelled = sum(1 for r in rows if r.get("expected") is not None or r.get("score") is not None)
    typer.echo(f"imported {count} example(s) into '{template_id}' ({labelled} labelled)")


def _import_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    if "messages" in row:
        msgs = row["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and "role" in m for m in msgs)
        ):
            return "'messages' must be a non-empty array of {role, content}"
    elif not isinstance(row.get("input"), str) or not row["input"]:
        return "give 'messages' or a non-empty 'input' string"
    if "variables" in row and not isinstance(row["variables"], dict):
        return "'variables' must be an object"
    if row.get("expected") is not None and not isinstance(row["expected"], str):
        return "'expected' must be a string"
    score = row.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1
    ):
        return f"'score' must be a number from 0 to 1; got {score!r}"
    return None


# -- packages -------------------------------------------------------------------------------------


def _stores(cfg: Config) -> Any:
    from rswitch.packaging import Stores

    return Stores(cfg.dataset_dir, cfg.analytics_file)


@package_app.command("export")
def package_export(
    template_id: Annotated[str, typer.Option("--template-id", help="The template to package.")],
    config: ConfigOpt = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where the package goes.")] = Path("."),
    include_analytics: Annotated[bool, typer.Option("--include-analytics/--no-include-analytics")] = True,
    logs_limit: Annotated[
        int, typer.Option("--logs-limit", help="Newest records in logs/recent.jsonl.", min=0)
    ] = 1000,
    archive: Annotated[
        bool, typer.Option("--archive", help="Write one .tar.gz instead of a folder.")
    ] = False,
) -> None:
    """Export a template, its dataset, recent logs and analytics as a package."""
    from rich.progress import BarColumn, Progress, TextColumn

    from rswitch.config import resolve_api_key
    from rswitch.packaging import PackageError, export_package

    cfg = load(config)
    reg = registry(config)
    secrets = [k for name, pc in cfg.model_providers.items() if (k := resolve_api_key(name, pc)[0])]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        transient=True,
    ) as bar:
        task = bar.add_task("snapshot", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=f"{stage} snapshot", completed=done, total=total)

        try:
            out = export_package(
                reg,
                _stores(cfg),
                template_id,
                output_dir,
                include_analytics=include_analytics,
                logs_limit=logs_limit,
                archive=archive,
                secrets=secrets,
                progress=progress,
            )
        except PackageError as exc:
            raise fail(str(exc)) from None
    typer.echo(f"exported '{template_id}' → {out}")


@package_app.command("import")
def package_import(
    path: Path,
    config: ConfigOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing template and its dataset.")
    ] = False,
    restore_analytics: Annotated[bool, typer.Option("--restore-analytics/--no-restore-analytics")] = True,
) -> None:
    """Import a package folder or archive (verified first; all or nothing)."""
    from rswitch.packaging import PackageError, import_package

    cfg = load(config)
    try:
        result = import_package(
            path, registry(config), _stores(cfg), overwrite=overwrite, restore_analytics=restore_analytics
        )
    except PackageError as exc:
        raise fail(f"import refused: {exc}") from None
    verb = "replaced" if result["replaced"] else "imported"
    typer.echo(
        f"{verb} '{result['template_id']}' → {result['path']}: {result['dataset_rows']} dataset row(s), "
        f"{result['analytics_rows_added']} analytics row(s) added"
    )


@package_app.command("inspect")
def package_inspect(path: Path) -> None:
    """Show what a package holds and whether its checksums hold, without importing it."""
    from rswitch.packaging import PackageError, inspect_package

    try:
        info = inspect_package(path)
    except PackageError as exc:
        raise fail(str(exc)) from None
    tpl = info["template"] or {}
    typer.echo(f"package     {info['path']}")
    typer.echo(
        f"template    {info['template_id']}  ({tpl.get('name')}), version {tpl.get('version')}; versions {info['versions']}"
    )
    typer.echo(f"variables   {', '.join(tpl.get('variables') or []) or '(none)'}")
    typer.echo(
        f"created     {info['created_at']} by rswitch {info['rswitch_version']} (format {info['format_version']})"
    )
    if info.get("time_range"):
        typer.echo(f"records     {info['time_range']['first']} … {info['time_range']['last']}")
    for f in info["files"]:
        rows = f" {f['rows']} rows" if "rows" in f else ""
        typer.echo(
            f"  {f.get('path', '?'):<22} {f.get('size', 0):>10} bytes{rows}  sha256 {str(f.get('sha256', ''))[:12]}…"
        )
    if info["checksums_ok"]:
        typer.echo("checksums   OK")
    else:
        typer.secho(f"checksums   FAILED: {info['problem']}", fg=typer.colors.RED)
        raise typer.Exit(1)


# -- config -----------------------------------------------------------------------------------


@config_app.command("check")
def config_check(path: Path) -> None:
    """Validate a config file and print every problem with its key path."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        typer.secho(f"{path}: {len(exc.problems)} problem(s)", err=True, fg=typer.colors.RED)
        for p in exc.problems:
            typer.echo(f"  {p}", err=True)
        raise typer.Exit(1) from None
    from rswitch.core import build_combinations, open_registry

    try:
        build_combinations(cfg, open_registry(cfg))
    except ConfigError as exc:
        typer.secho(f"{path}: {len(exc.problems)} problem(s)", err=True, fg=typer.colors.RED)
        for p in exc.problems:
            typer.echo(f"  {p}", err=True)
        raise typer.Exit(1) from None
    from rswitch.config import config_warnings

    for w in config_warnings(cfg):
        typer.secho(f"warning: {w}", err=True, fg=typer.colors.YELLOW)
    typer.echo(
        f"{path}: ok — {len(cfg.model_providers)} provider(s), {len(cfg.gateway.combinations)} combination(s), strategy {cfg.gateway.strategy}"
    )


def main() -> None:  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
