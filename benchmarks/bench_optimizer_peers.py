#!/usr/bin/env python3
"""rswitch's optimizer beside DSPy's MIPROv2 and GEPA, on the same rows, model, endpoint and metric.

For each seed it:
  1. starts one Core (the embedded SmolLM2-135M through llama.cpp, provider `local`; real SQLite
     and DuckDB files in a temp dir) and serves it on loopback with rswitch's own HTTP app, as
     `rswitch serve` does; every peer gets a client key of its own (gateway.auth.keys), so the
     analytics store records whose call each one was (the `client` column);
  2. imports the task's labelled.jsonl and splits it with rswitch's own
     `split(load_examples(...), seed)`: the train rows and the validation rows rswitch's search
     uses (the first `max_val`) are handed to DSPy as they are, and both are scored on the same
     test rows with the same metric function (`test_score`);
  3. runs rswitch's `optimize(...)` in-process (`dry_run=True`), then each DSPy optimizer in a
     subprocess (`dspy-worker`): `dspy.LM("openai/<model>", api_base=<the served endpoint>)`, so
     the model behind both is the same and no call is uncounted;
  4. reads model calls and tokens per optimizer FROM THE ANALYTICS STORE (DuckDB, after the core
     has drained its recorder), never from the libraries' own counters; wall time per phase.

DSPy is only a benchmark dependency (`pip install -e '.[peers]'`); rswitch itself never imports it,
and neither does this script outside the worker.

Usage: python benchmarks/bench_optimizer_peers.py [--task intent-bench] [--seeds 0,1,2]
           [--peers rswitch,dspy-mipro,dspy-gepa] [--quick] [--json out.json] [--markdown out.md]
See benchmarks/OPTIMIZER.md ("Side by side with DSPy").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_optimizer import REFLECTIVE, SAMPLES, SETTINGS, label_of, read_rows  # noqa: E402
from bench_optimizer import TASKS as BENCH_TASKS  # noqa: E402

# rswitch's two searches run in-process, each on a combination named after it (so the analytics
# store tells their calls apart); DSPy's are clients of the served endpoint with keys of their own.
RSWITCH = ("rswitch", "rswitch-reflective")
PEERS = (*RSWITCH, "dspy-mipro", "dspy-gepa")
MODEL = "smollm2-135m-instruct"
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


@dataclass(frozen=True)
class Task:
    """What a benchmark task is: a template with labelled rows, the evaluator both optimizers
    optimise, the metric the test rows are scored with, and what the app sends with each call."""

    template_id: str
    evaluator: str  # an rswitch evaluator: the search objective of every optimizer
    test_metric: str  # "accuracy" (the label exactly, ignoring case and punctuation) or an evaluator
    task_params: dict[str, Any]
    output: str  # the DSPy signature's output field
    settings: dict[str, Any] = field(default_factory=dict)  # rswitch Settings overrides

    @property
    def labelled(self) -> Path:
        return SAMPLES / self.template_id / "labelled.jsonl"


# bench_optimizer.py's tasks (template, evaluator, task params), with the test metric and the
# DSPy output field: intent-bench's label accuracy, extract-bench's json_fields (partial credit)
OUTPUT_FIELD = {"intent-bench": "label", "extract-bench": "json"}
TASKS: dict[str, Task] = {
    name: Task(
        t.template_id,
        t.evaluator,
        "accuracy" if t.strict == "label" else t.evaluator,
        dict(t.task_params),
        OUTPUT_FIELD.get(name, "answer"),
        dict(SETTINGS),
    )
    for name, t in BENCH_TASKS.items()
}
# --quick: the whole pipeline on every 5th row and a few trials, to check it runs (numbers mean nothing)
QUICK = {"every": 5, "val": 8, "trials": 2, "candidates": 2, "gepa_calls": 24}


# -- the metric both are scored with ----------------------------------------------------------------


def test_score(task: Task, answer: str, expected: str) -> float:
    """One test row's score, the same function for every optimizer's answers."""
    if task.test_metric == "accuracy":
        return float(label_of(answer) == expected.lower())
    return evaluate(task.test_metric, answer, expected).value


def evaluate(name: str, answer: str, expected: str) -> Any:
    """An rswitch evaluator's Score (value, reason), called synchronously (none of these awaits)."""
    from rswitch.optimizer.evaluators import build_evaluator

    coro = build_evaluator(name).score(output=answer, expected=expected, inputs={})
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError(f"evaluator {name!r} awaited something; it cannot score synchronously")


# -- config, handoff, serving, counting -------------------------------------------------------------


def config_data(
    tmp: Path,
    task: Task,
    keys: dict[str, str],
    provider: dict[str, Any] | None = None,
    model: str = MODEL,
    threads: int | None = None,
) -> dict[str, Any]:
    """One provider, the sample templates, one combination for the task, a client key per peer."""
    from rswitch.auth import hash_key

    return {
        "model_providers": {
            "local": provider
            or {"type": "local", "local": {"n_ctx": 4096, "queue_size": 64, "n_threads": threads}},
        },
        "template_dirs": [str(SAMPLES)],
        "gateway": {
            "combinations": [
                {"id": peer, "template_id": task.template_id, "model": model, "provider": "local"}
                for peer in RSWITCH
            ],
            "auth": {"keys": [{"name": name, "hash": hash_key(key)} for name, key in keys.items()]},
            "request_timeout_seconds": 600,
        },
        "dataset": {"base_path": str(tmp / "prompts")},
        "analytics": {"path": str(tmp / "analytics.duckdb")},
        "recorder": {"flush_interval_ms": 50},
    }


def peer_keys(peers: list[str]) -> dict[str, str]:
    """A fresh key for each DSPy optimizer's search and one for its test scoring."""
    names = [p for p in peers if p not in RSWITCH]
    return {n: secrets.token_urlsafe(32) for peer in names for n in (peer, f"{peer}-test")}


def row_json(e: Any) -> dict[str, Any]:
    return {"row_id": e.row_id, "user": e.user_text(), "variables": e.variables, "expected": e.target}


def handoff(core: Any, task: Task, seed: int, max_val: int) -> dict[str, list[dict]]:
    """rswitch's own split of the task's rows, as the JSON rows DSPy is given: train, the
    validation rows rswitch's search uses (its first `max_val`), and test."""
    from rswitch.optimizer.data import load_examples, split

    core.recorder.flush()
    s = split(load_examples(core.datasets, task.template_id), seed=seed)
    return {"train": [row_json(e) for e in s.train], "val": [row_json(e) for e in s.val[:max_val]],
            "test": [row_json(e) for e in s.test]}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def served(core: Any) -> AsyncIterator[str]:
    """rswitch's HTTP app for a started core, on loopback, on the caller's loop (so the core's
    providers and the in-process optimizer share it); yields the base URL."""
    import uvicorn

    from rswitch.server import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(core, manage_lifecycle=False, bind_host="127.0.0.1"),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    running = asyncio.create_task(server.serve())
    while not server.started:
        if running.done():
            running.result()  # raises why it stopped
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await running


def usage(analytics_path: Path) -> dict[str, dict[str, int]]:
    """Calls and tokens per caller, from the analytics store's `invocations` (after the recorder
    has flushed): a client key's name, or for the in-process calls their
    combination (`rswitch`, `rswitch-reflective`: the optimizer's calls, kind `optimizer`), with
    `-test` for this script's test scoring of the winner."""
    import duckdb

    # a plain connection: in the process whose core has the file open DuckDB hands out the same
    # database (a read-only one would conflict with it); afterwards it simply opens the file
    con = duckdb.connect(str(analytics_path))
    try:
        rows = con.execute(
            """SELECT coalesce(client, combination_id || CASE WHEN kind = 'optimizer' THEN '' ELSE '-test' END),
                      count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
                      count(*) FILTER (WHERE NOT success)
               FROM invocations GROUP BY 1"""
        ).fetchall()
    finally:
        con.close()
    return {
        who: {"calls": n, "prompt_tokens": pt, "completion_tokens": ct, "failed": bad}
        for who, n, pt, ct, bad in rows
    }


# -- the two sides -----------------------------------------------------------------------------------


async def run_rswitch(
    peer: str, core: Any, task: Task, rows: dict[str, list[dict]], seed: int, args: Any
) -> dict:
    """rswitch's optimizer (the service `rswitch optimize` calls), then its winner on the test rows."""
    from rswitch.optimizer.mipro import Candidate, Settings
    from rswitch.optimizer.reflective import ReflectiveSettings
    from rswitch.optimizer.service import optimize

    overrides = dict(task.settings)
    if args.quick:
        overrides |= {"num_trials": QUICK["trials"], "max_val": QUICK["val"], "num_instructions": QUICK["candidates"],
                      "num_demo_sets": QUICK["candidates"]}  # fmt: skip
    settings: Any = Settings.auto("light", seed=seed, task_params=dict(task.task_params), **overrides)
    if peer == "rswitch-reflective":
        quick = {"max_proposals": QUICK["trials"], "max_val": QUICK["val"]} if args.quick else {}
        settings = ReflectiveSettings(seed=seed, task_params=dict(task.task_params), **REFLECTIVE | quick)
    started = time.perf_counter()
    result, _ = await optimize(
        core, task.template_id, settings=settings, combination_id=peer,
        evaluator=task.evaluator, dry_run=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    seed_cand = Candidate(result.instructions[0], result.demo_sets[0] if result.demo_sets else [])
    winner = result.winner_candidate or seed_cand
    combo = core.gateway.combinations[peer]
    from rswitch.optimizer.data import load_examples

    by_id = {e.row_id: e for e in load_examples(core.datasets, task.template_id)}
    answers = []
    for r in rows["test"]:
        done = await core.gateway.call_direct(
            combo, winner.messages(by_id[r["row_id"]]), task.task_params, kind="benchmark"
        )
        answers.append(done.text)
    return {
        "answers": answers,
        "wall_seconds": wall,
        "verdict": result.verdict,
        "promote": result.promote,
        "own_calls": dict(result.calls),
        "instruction": winner.instruction,
        "demos": winner.demos,
    }


async def run_dspy(
    peer: str, url: str, keys: dict[str, str], task: Task, rows: dict, seed: int, args: Any
) -> dict:
    """One DSPy optimizer in a subprocess (DSPy is synchronous and its own dependency set): a
    client of the served endpoint like any app."""
    template = next(p for p in (SAMPLES / task.template_id).glob("manifest.y*ml"))
    import yaml

    manifest = yaml.safe_load(template.read_text(encoding="utf-8"))
    spec = {
        "peer": peer,
        "seed": seed,
        "api_base": url + "/v1",
        "model": MODEL,
        "key": keys[peer],
        "test_key": keys[f"{peer}-test"],
        "instruction": dspy_instruction(manifest["template"]),
        "inputs": ["message", *manifest.get("variables", [])],
        "output": task.output,
        "evaluator": task.evaluator,
        "max_tokens": task.task_params.get("max_tokens", 64) + 32,  # room for DSPy's field markers
        "quick": args.quick,
        "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="rswitch-peer-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            args.peer_python, str(Path(__file__).resolve()), "dspy-worker", str(spec_path), str(out_path),
            stdout=None if args.verbose else subprocess.DEVNULL, stderr=None if args.verbose else subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await proc.communicate()
        finally:
            if proc.returncode is None:  # interrupted (Ctrl-C): the worker must not run on alone
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            tail = (err or b"").decode(errors="replace")[-3000:]
            raise RuntimeError(f"{peer} worker failed (exit {proc.returncode}):\n{tail}")
        out = json.loads(out_path.read_text())
        out["process_seconds"] = time.perf_counter() - started
        return out


def dspy_instruction(template: str) -> str:
    """The seed instruction for DSPy: the template with each `{var}` naming its input field."""
    return (
        _PLACEHOLDER.sub(lambda m: f"`{m.group(1)}`", template).replace("{{", "{").replace("}}", "}").strip()
    )


# -- the worker (the only code that imports DSPy) ---------------------------------------------------


def dspy_worker(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="dspy-cache-"))
    import dspy

    spec = json.loads(Path(spec_path).read_text())
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)

    def lm(key: str, **kw: Any) -> Any:
        return dspy.LM(f"openai/{spec['model']}", api_base=spec["api_base"], api_key=key, cache=False, **kw)

    task_lm = lm(spec["key"], temperature=0.0, max_tokens=spec["max_tokens"])
    # the proposer / reflector: the same model through the same key, its answers capped at 300
    # tokens as rswitch's instruction proposals are (the 135M model otherwise rambles to the limit)
    prompt_lm = lm(spec["key"], temperature=1.0, max_tokens=300)
    dspy.configure(lm=task_lm)
    out_field = spec["output"]
    fields: dict[str, Any] = {name: (str, dspy.InputField()) for name in spec["inputs"]}
    fields[out_field] = (str, dspy.OutputField())
    program = dspy.Predict(dspy.Signature(fields, spec["instruction"]))

    def example(r: dict[str, Any]) -> Any:
        values = {
            "message": r["user"],
            **{k: str(v) for k, v in r["variables"].items()},
            out_field: r["expected"],
        }
        return dspy.Example(**values).with_inputs(*spec["inputs"])

    train = [example(r) for r in spec["rows"]["train"]]
    val = [example(r) for r in spec["rows"]["val"]]

    def answer_of(pred: Any) -> str:
        return str(getattr(pred, out_field, "") or "")

    def metric(gold: Any, pred: Any, trace: Any = None) -> float:
        return evaluate(spec["evaluator"], answer_of(pred), gold[out_field]).value

    def feedback_metric(
        gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> Any:
        s = evaluate(spec["evaluator"], answer_of(pred), gold[out_field])
        return dspy.Prediction(
            score=s.value, feedback=f"{s.reason}; the expected answer is {gold[out_field]!r}"
        )

    failed_proposals = keep_instruction_when_proposal_fails(dspy)
    quick = spec["quick"]
    started = time.perf_counter()
    if spec["peer"] == "dspy-mipro":
        opts: dict[str, Any] = (
            {"auto": None, "num_candidates": QUICK["candidates"]} if quick else {"auto": "light"}
        )
        opt = dspy.MIPROv2(metric=metric, prompt_model=prompt_lm, task_model=task_lm, seed=spec["seed"],
                           num_threads=2, **opts)  # fmt: skip
        extra = {"num_trials": QUICK["trials"], "minibatch_size": 4} if quick else {}
        compiled = opt.compile(program, trainset=train, valset=val, seed=spec["seed"], **extra)
    elif spec["peer"] == "dspy-gepa":
        budget = {"max_metric_calls": QUICK["gepa_calls"]} if quick else {"auto": "light"}
        opt = dspy.GEPA(
            metric=feedback_metric, reflection_lm=prompt_lm, seed=spec["seed"], num_threads=2, **budget
        )
        compiled = opt.compile(program, trainset=train, valset=val)
    else:
        raise SystemExit(f"unknown peer {spec['peer']!r}")
    compile_s = time.perf_counter() - started

    answers, errors = [], 0
    test_lm = lm(spec["test_key"], temperature=0.0, max_tokens=spec["max_tokens"])
    with dspy.context(lm=test_lm):
        for r in spec["rows"]["test"]:
            inputs = {k: v for k, v in example(r).items() if k != out_field}
            try:
                answers.append(answer_of(compiled(**inputs)))
            except Exception:  # an answer DSPy's adapter cannot parse scores 0, as in DSPy's own Evaluate
                answers.append("")
                errors += 1
    predictor = compiled.predictors()[0]
    Path(out_path).write_text(
        json.dumps(
            {
                "answers": answers,
                "parse_errors": errors,
                "failed_proposals": failed_proposals[0],
                "wall_seconds": compile_s,
                "instruction": predictor.signature.instructions,
                "demos": [{k: v for k, v in dict(d).items() if isinstance(v, str)} for d in predictor.demos],
                "dspy_version": dspy.__version__,
            }
        )
    )


def keep_instruction_when_proposal_fails(dspy: Any) -> list[int]:
    """DSPy 3.4.1's grounded proposer raises when the model's proposal cannot be parsed (the 135M
    model rarely writes DSPy's `[[ ## proposed_instruction ## ]]` field), and that ends the whole
    compile. Here such a proposal keeps the predictor's current instruction instead, as rswitch's
    proposer drops a proposal that fails its checks; returns a live count of the failures."""
    from dspy.propose.grounded_proposer import GroundedProposer

    failures = [0]
    propose = GroundedProposer.propose_instruction_for_predictor

    def forgiving(self: Any, program: Any, predictor: Any, *args: Any, **kwargs: Any) -> str:
        try:
            return propose(self, program, predictor, *args, **kwargs)
        except dspy.utils.exceptions.AdapterParseError:
            failures[0] += 1
            return predictor.signature.instructions

    GroundedProposer.propose_instruction_for_predictor = forgiving  # type: ignore[method-assign]
    return failures


# -- one seed, the table -----------------------------------------------------------------------------


async def one_seed(
    task: Task,
    seed: int,
    args: Any,
    provider: dict[str, Any] | None = None,
    on_peer: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every optimizer in `args.peers` on one seed's split; `on_peer` gets the seed's record so
    far after each one (scored, and counted in the store the core is still writing)."""
    from rswitch.config import parse_config
    from rswitch.core import Core

    keys = peer_keys(args.peers)
    record: dict[str, Any] = {"seed": seed, "peers": {}, "failed": {}}
    with tempfile.TemporaryDirectory(prefix=f"rswitch-peers-{seed}-") as tmp:
        store = Path(tmp) / "analytics.duckdb"
        threads = getattr(args, "threads", None)
        core = Core(parse_config(config_data(Path(tmp), task, keys, provider, threads=threads)))
        await core.start()
        try:
            labelled = read_rows(task.labelled)
            core.datasets.import_rows(
                task.template_id, labelled[:: QUICK["every"]] if args.quick else labelled
            )
            max_val = QUICK["val"] if args.quick else ({"max_val": 100} | task.settings)["max_val"]
            rows = handoff(core, task, seed, max_val)
            record |= {
                "sizes": {k: len(v) for k, v in rows.items()},
                "row_ids": {k: [r["row_id"] for r in v] for k, v in rows.items()},
                "test_expected": [r["expected"] for r in rows["test"]],
            }
            async with served(core) as url:
                for peer in args.peers:
                    print(f"  seed {seed}: {peer}…", flush=True)
                    try:
                        if peer in RSWITCH:
                            res = await run_rswitch(peer, core, task, rows, seed, args)
                        else:
                            res = await run_dspy(peer, url, keys, task, rows, seed, args)
                    except Exception as exc:  # one optimizer's failure is a result; the others still run
                        print(f"  seed {seed}: {peer} FAILED: {exc}", flush=True)
                        record["failed"][peer] = f"{type(exc).__name__}: {exc}"[-2000:]
                        continue
                    record["peers"][peer] = res
                    core.recorder.flush(30)
                    tally(task, record, usage(store))
                    print(
                        f"  seed {seed}: {peer} test {task.test_metric} {100 * res['test_score']:.1f}, "
                        f"{res.get('usage_calls', 0)} calls, {res['wall_seconds']:.0f} s",
                        flush=True,
                    )
                    if on_peer:
                        on_peer(record)
        finally:
            await core.stop()
        tally(task, record, usage(store))  # final: the recorder drained
    return record


def tally(task: Task, record: dict[str, Any], counted: dict[str, dict[str, int]]) -> None:
    """Each finished optimizer's test score and its calls and tokens as the store counts them."""
    record["usage"] = counted
    for peer, res in record["peers"].items():
        scores = [
            test_score(task, a, e) for a, e in zip(res["answers"], record["test_expected"], strict=True)
        ]
        res["test_score"] = statistics.mean(scores)
        res["test_scores"] = scores
        res |= {f"usage_{k}": v for k, v in counted.get(peer, {}).items()}
        res["test_usage"] = counted.get(f"{peer}-test", {})


def in_order(peer: str) -> int:
    """An optimizer's place in tables: PEERS' order (rswitch's searches first)."""
    return PEERS.index(peer) if peer in PEERS else len(PEERS)


def mean_sd(values: list[float], scale: float = 100, digits: int = 1) -> str:
    """Mean ± sd over seeds; one seed's value alone (it has no spread to show)."""
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f} (1 seed)"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(task: Task, seeds: list[dict[str, Any]]) -> str:
    """optimizer | test score mean ± sd | per-seed scores | model calls | tokens | wall time."""
    peers = list(dict.fromkeys(p for s in seeds for p in (*s["peers"], *s.get("failed", {}))))
    peers.sort(key=in_order)  # rswitch's first, however the runs were merged
    lines = [
        f"| optimizer | test {task.test_metric} (mean ± sd) | per seed ({', '.join(str(s['seed']) for s in seeds)}) "
        "| model calls | tokens (prompt + completion) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for peer in peers:
        runs = [s["peers"][peer] for s in seeds if peer in s["peers"]]
        each = [
            f"{100 * s['peers'][peer]['test_score']:.1f}" if peer in s["peers"]
            else ("failed" if peer in s.get("failed", {}) else "–")
            for s in seeds
        ]  # fmt: skip
        if not runs:
            lines.append(f"| {peer} | – | {' / '.join(each)} | – | – | – |")
            continue
        calls = [r.get("usage_calls", 0) for r in runs]
        scores = [r["test_score"] for r in runs]
        tokens = [r.get("usage_prompt_tokens", 0) + r.get("usage_completion_tokens", 0) for r in runs]
        lines.append(
            f"| {peer} | {mean_sd(scores)} "
            f"| {' / '.join(each)} "
            f"| {mean_sd(calls, 1, 0)} | {mean_sd(tokens, 1, 0)} | {mean_sd([r['wall_seconds'] for r in runs], 1, 0)} |"
        )
    return "\n".join(lines)


def versus(seeds: list[dict[str, Any]], ours: str = "rswitch", theirs: str = "dspy-mipro") -> str:
    """Seed by seed, ours against theirs: the score difference and the calls each made, and
    whether ours scored at least theirs with no more calls on every seed both finished."""
    both = [s for s in seeds if ours in s["peers"] and theirs in s["peers"]]
    if not both:
        return ""
    parts, held = [], True
    for s in both:
        a, b = s["peers"][ours], s["peers"][theirs]
        diff = 100 * (a["test_score"] - b["test_score"])
        ca, cb = a.get("usage_calls", 0), b.get("usage_calls", 0)
        held &= diff >= 0 and ca <= cb
        parts.append(f"seed {s['seed']} {diff:+.1f} points, {ca} vs {cb} calls")
    verdict = (
        "at least as good with no more calls on every seed"
        if held
        else "NOT at least as good with no more calls on every seed"
    )
    return f"{ours} − {theirs}: {'; '.join(parts)}: {verdict}."


def pick(record: dict[str, Any], wanted: set[str], name: str) -> dict[str, Any]:
    """A run's record with only the optimizers named (`--merge FILE:rswitch,dspy-gepa`): a later
    run of one of them, on the same splits, can then replace the earlier one's rows."""
    unknown = sorted(wanted - set(PEERS))
    if unknown:
        raise SystemExit(
            f"--merge {name}: unknown optimizer {', '.join(unknown)}; choose from {', '.join(PEERS)}"
        )
    out = {k: v for k, v in record.items() if k != "seeds"} | {"seeds": []}
    for s in record["seeds"]:
        peers = {p: r for p, r in s["peers"].items() if p in wanted}
        failed = {p: why for p, why in s.get("failed", {}).items() if p in wanted}
        if peers or failed:
            out["seeds"].append(copy.deepcopy(s) | {"peers": peers, "failed": failed})
    if not out["seeds"]:
        raise SystemExit(f"--merge {name}: no seed of this run has {', '.join(sorted(wanted))}")
    return out


def load_runs(specs: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """`--merge` arguments, each FILE or FILE:optimizer,optimizer, as records and their names."""
    records, names = [], []
    for spec in specs:
        path, _, only = spec.rpartition(":") if not Path(spec).exists() and ":" in spec else (spec, "", "")
        if not Path(path).is_file():
            raise SystemExit(f"--merge: {path} is not a file")
        record = json.loads(Path(path).read_text())
        name = Path(path).name + (f":{only}" if only else "")
        if only:
            record = pick(record, {p.strip() for p in only.split(",") if p.strip()}, name)
        records.append(record)
        names.append(name)
    return records, names


def merge(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Runs of one task (some optimizers in one run, the rest in another) as one record. Each seed's
    rows must be the same in every run, and an optimizer may appear once a seed."""
    if len(records) == 1:  # one run: its own table, with its own command
        return records[0]
    tasks = sorted({r["task"] for r in records})
    if len(tasks) != 1:
        raise SystemExit(f"--merge: the runs are of different tasks ({', '.join(tasks)})")
    if len({bool(r.get("quick")) for r in records}) != 1:
        raise SystemExit("--merge: --quick runs and full runs do not go in one table")
    by_seed: dict[int, dict[str, Any]] = {}
    for record, name in zip(records, names, strict=True):
        for s in record["seeds"]:
            have = by_seed.get(s["seed"])
            if have is None:
                by_seed[s["seed"]] = copy.deepcopy(s) | {"from": {p: name for p in s["peers"]}}
                continue
            if have["row_ids"] != s["row_ids"]:
                raise SystemExit(f"--merge: seed {s['seed']}'s rows differ in {name}: not the same split")
            twice = sorted(set(have["peers"]) & set(s["peers"]))
            if twice:
                raise SystemExit(f"--merge: seed {s['seed']} has {', '.join(twice)} in more than one run")
            have["peers"].update(s["peers"])
            have["from"].update({p: name for p in s["peers"]})
            have["failed"] = {
                p: why
                for p, why in (have.get("failed", {}) | s.get("failed", {})).items()
                if p not in have["peers"]
            }
    return {
        "task": tasks[0],
        "commit": ", ".join(dict.fromkeys(r["commit"] for r in records)),
        "quick": records[0].get("quick", False),
        "threads": ", ".join(dict.fromkeys(str(r.get("threads")) for r in records)),
        "merged_from": names,
        "seeds": [by_seed[k] for k in sorted(by_seed)],
    }


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "rswitch/optimizer"], cwd=ROOT, capture_output=True, text=True
        )
        return head.stdout.strip() + (" (rswitch/optimizer modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "dspy-worker":
        dspy_worker(sys.argv[2], sys.argv[3])
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`: stop the DSPy worker too
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="intent-bench", choices=sorted(TASKS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of: {', '.join(PEERS)}")
    ap.add_argument("--quick", action="store_true", help="a few rows and trials: checks the pipeline only")
    ap.add_argument(
        "--threads", type=int, help="llama.cpp's CPU threads (1 on a machine other jobs share: no spinning)"
    )
    ap.add_argument("--peer-python", default=sys.executable, help="the Python with DSPy installed")
    ap.add_argument("--json", type=Path, help="write every seed's results here")
    ap.add_argument("--markdown", type=Path, help="write the table and settings here")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the DSPy workers' output")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="FILE[:OPTIMIZERS]",
        help="no run: the --json files of earlier runs of one task (the same seeds' rows) as one table; "
        "FILE:rswitch,dspy-gepa takes only those optimizers' rows from FILE",
    )
    args = ap.parse_args()
    if args.merge:
        record = merge(*load_runs(args.merge))
        task = TASKS[record["task"]]
        args.peers = list(dict.fromkeys(p for s in record["seeds"] for p in s["peers"]))
        if args.json:
            args.json.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        if args.markdown:
            args.markdown.write_text(markdown(task, record, table(task, record["seeds"]), args))
        print(table(task, record["seeds"]))
        print(versus(record["seeds"]))
        return
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    task = TASKS[args.task]
    if not task.labelled.exists():
        raise SystemExit(f"--task {args.task}: {task.labelled} does not exist yet")
    commit = git_commit()
    print(
        f"{args.task}: {', '.join(args.peers)} on SmolLM2-135M (local, served on loopback); commit {commit}"
    )
    seeds: list[dict[str, Any]] = []

    def save(current: dict[str, Any] | None = None) -> None:
        """After every optimizer of every seed, so a long run's finished parts are kept."""
        done = seeds + ([current] if current is not None else [])
        record = {"task": args.task, "commit": commit, "quick": args.quick, "threads": args.threads}
        record["seeds"] = done
        if args.json:
            args.json.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        if args.markdown:
            args.markdown.write_text(markdown(task, record, table(task, done), args))

    for seed in (int(s) for s in args.seeds.split(",")):
        print(f"seed {seed}…", flush=True)
        seeds.append(asyncio.run(one_seed(task, seed, args, on_peer=save)))
        save()
    print()
    print(table(task, seeds))
    print(versus(seeds))


def markdown(task: Task, record: dict[str, Any], out: str, args: Any) -> str:
    sizes = record["seeds"][0]["sizes"]
    threads = f" --threads {record['threads']}" if record.get("threads") else ""
    seeds = ",".join(str(s["seed"]) for s in record["seeds"])
    if record.get("merged_from"):
        every = [s["seed"] for s in record["seeds"]]
        runs = {}
        for n in record["merged_from"]:  # each run's optimizers, and its seeds when not all of them
            has = {s["seed"]: sorted(p for p, f in s["from"].items() if f == n) for s in record["seeds"]}
            has = {seed: peers for seed, peers in has.items() if peers}
            what = ",".join(sorted({p for peers in has.values() for p in peers}))
            if sorted(has) != every:
                what += f" (seed{'s' if len(has) > 1 else ''} {', '.join(str(k) for k in sorted(has))})"
            runs[n] = what
        command = (
            f"runs of `python benchmarks/bench_optimizer_peers.py --task {task.template_id} --seeds {seeds} "
            f"--peers …`, one for {', one for '.join(runs.values())} (llama.cpp threads "
            f"{record['threads']}), merged by `--merge {' '.join(runs)}`; rswitch at commit(s) {record['commit']}"
        )
    else:
        command = (
            f"`python benchmarks/bench_optimizer_peers.py --task {task.template_id} --seeds "
            f"{seeds} --peers {','.join(args.peers)}{threads}`; rswitch at commit {record['commit']}"
        )
    lines = [
        f"# {task.template_id}: rswitch's optimizer beside DSPy's",
        "",
        f"{command}. Rows: {sizes['train']} train, {sizes['val']} validation, "
        f"{sizes['test']} test, the same for every optimizer. Search metric `{task.evaluator}`; test metric "
        f"`{task.test_metric}`. Calls and tokens are counted in the analytics store; they do not include "
        "this script's scoring of each winner on the test rows (one call a row).",
        "",
        out,
        "",
        versus(record["seeds"]),
        "",
        "| seed | optimizer | test | calls | failed calls | instruction (first 80 characters) | demos | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in record["seeds"]:
        for peer, r in sorted(s["peers"].items(), key=lambda pr: in_order(pr[0])):
            notes = []
            if "verdict" in r:
                notes.append(f"gate: {r['verdict']}")
            if r.get("failed_proposals"):
                notes.append(f"{r['failed_proposals']} proposals unparsable (kept the instruction)")
            if r.get("parse_errors"):
                notes.append(f"{r['parse_errors']} test answers unparsable (scored 0)")
            instruction = " ".join(str(r.get("instruction", "")).split())[:80].replace("|", "\\|")
            lines.append(
                f"| {s['seed']} | {peer} | {100 * r['test_score']:.1f} | {r.get('usage_calls', 0)} "
                f"| {r.get('usage_failed', 0)} | {instruction} | {len(r.get('demos') or [])} | {'; '.join(notes)} |"
            )
        for peer, why in s.get("failed", {}).items():
            lines.append(f"| {s['seed']} | {peer} | failed | | | | | {why.splitlines()[0][:200]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
