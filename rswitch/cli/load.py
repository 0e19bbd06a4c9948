"""`rswitch load`: replay sample inputs (or a JSONL file) through a running gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rswitch.cli.common import DEFAULT_URL, JsonlError, fail, read_jsonl


def request_body(example: Any, template_id: str | None) -> dict[str, Any]:
    """A chat request from one JSONL line: its own body, aimed at its template if it names one."""
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list):
        raise ValueError("each example needs a 'messages' array")
    body = {k: v for k, v in example.items() if k not in ("expected", "template_id")}
    tid = example.get("template_id") or template_id
    if tid and "model" not in body:
        body["model"] = tid
    return body


def file_requests(path: Path, template_id: str | None = None) -> list[dict[str, Any]]:
    """Each line: a chat request body, optionally with `template_id` and `expected`."""
    return [body for _, body in read_jsonl(path, lambda ex: request_body(ex, template_id))]


def sample_requests(
    folder: Path, template_id: str | None = None, served: set[str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The `examples.jsonl` next to each sample template's manifest, for `template_id` or for
    every template in `served` (None: all); and the sample templates left out."""
    from rswitch.loadgen import LoadError
    from rswitch.templates import TemplateRegistry

    templates, _ = TemplateRegistry.read_dir(folder)
    have = [t.id for t in templates if (folder / t.id / "examples.jsonl").exists()]
    if template_id is not None:
        if template_id not in have:
            raise LoadError(f"no sample template '{template_id}' in {folder}; have: {', '.join(have)}")
        wanted = [template_id]
    else:
        wanted = [t for t in have if served is None or t in served]
    skipped = [t for t in have if t not in wanted]
    if not wanted:
        if served is not None and have:
            raise LoadError(
                f"the gateway serves none of the sample templates ({', '.join(have)}); "
                "give --file with requests for what it serves"
            )
        raise LoadError(f"no examples found under {folder}")
    out: list[dict[str, Any]] = []
    for t in wanted:
        out.extend(file_requests(folder / t / "examples.jsonl", t))
    return out, skipped


def load_traffic(
    url: Annotated[str, typer.Option(help="The running gateway.")] = DEFAULT_URL,
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
        str | None,
        typer.Option(
            "--template", help="Only this sample template's examples (default: those the gateway serves)."
        ),
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

    from rswitch.defaults import SAMPLES
    from rswitch.loadgen import LoadError, run_load, served_templates

    if rate is not None and concurrency is not None:
        raise fail("give --rate or --concurrency, not both")
    if requests is None and duration is None:
        requests = 100
    skipped: list[str] = []
    try:
        if file:
            bodies = file_requests(file, template)
        else:
            # only the samples of templates this gateway serves: others could only fail
            served = None if template else asyncio.run(served_templates(url))
            bodies, skipped = sample_requests(SAMPLES, template, served)
    except JsonlError as exc:
        raise exc.exit() from None
    except LoadError as exc:
        raise fail(str(exc)) from None
    if skipped and not template:
        typer.echo(
            f"skipping sample template(s) the gateway at {url} does not serve: {', '.join(skipped)}", err=True
        )

    with Progress(
        TextColumn("[bold]load"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        transient=True,
        disable=json_out,
    ) as progress:
        task = progress.add_task("load", total=requests, info="")

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
    if not file and not template:
        s["skipped_templates"] = skipped
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
    if skipped:
        typer.echo(f"  skipped    {', '.join(skipped)} (not served by this gateway)")
    if s["requests"] and not s["succeeded"]:
        raise typer.Exit(1)
