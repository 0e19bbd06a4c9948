#!/usr/bin/env python3
"""MIPROv2 on the embedded SmolLM2-135M: does `rswitch optimize` make a weak prompt better?

For each seed (default 0, 1, 2) it:
  1. writes a fresh config in a temp dir: one `local` provider (SmolLM2-135M-Instruct through
     llama.cpp), the sample templates from sample_prompts/ and one combination for the
     `intent-bench` template; real SQLite datasets and a real DuckDB store;
  2. starts a Core and imports sample_prompts/intent-bench/labelled.jsonl into the template's
     dataset (what `rswitch dataset import intent-bench labelled.jsonl` does);
  3. runs `optimize(...)` — the same service `rswitch optimize` calls — with `dry_run=True`;
  4. rescores the seed prompt (the incumbent) and the winner on the held-out test split with a
     strict label accuracy, beside the evaluator's own test score that the gate used;
  5. prints a table per seed and mean ± spread (sample standard deviation), and optionally JSON.

The test split is the newest 20% of rows, which make_intent_bench.py fills with CLINC150's own
test sentences; the optimizer never sees them before the gate.

`--task extract-bench` runs the same on the second task (make_extract_bench.py: five address fields
as JSON, scored by `json_fields`); its strict metric is "all fields right" instead of the label.

Usage: python benchmarks/bench_optimizer.py [--task intent-bench|extract-bench] [--seeds 0,1,2]
           [--evaluator token_f1] [--json out.json]
See benchmarks/OPTIMIZER.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rswitch.config import parse_config  # noqa: E402
from rswitch.core import Core  # noqa: E402
from rswitch.optimizer.data import load_examples, split  # noqa: E402
from rswitch.optimizer.evaluators import JsonFieldEvaluator  # noqa: E402
from rswitch.optimizer.mipro import Candidate, Settings  # noqa: E402
from rswitch.optimizer.reflective import ReflectiveSettings  # noqa: E402
from rswitch.optimizer.service import optimize  # noqa: E402

SAMPLES = ROOT / "sample_prompts"
TEMPLATE_ID = "intent-bench"
COMBINATION = "intent-local"
LABELLED = SAMPLES / TEMPLATE_ID / "labelled.jsonl"

# What the app would send with every call: greedy, a label is a word or two, one line.
TASK_PARAMS: dict[str, Any] = {"temperature": 0, "max_tokens": 6, "stop": ["\n"]}
# Light preset (n = 6 candidates) with a smaller validation set and more demos per set.
SETTINGS: dict[str, Any] = {
    "num_trials": 12,
    "minibatch_size": 10,
    "full_eval_every": 4,
    "max_val": 60,
    "max_labeled_demos": 6,
    "max_bootstrapped_demos": 4,
}


# --strategy reflective: the same validation size; the embedded model is its own proposer.
REFLECTIVE: dict[str, Any] = {"max_proposals": 12, "minibatch_size": 3, "max_val": 60}


@dataclass(frozen=True)
class Task:
    """A benchmark task: a sample template with its labelled rows, and what differs per task."""

    template_id: str
    combination: str
    evaluator: str  # the default --evaluator: what the search optimises and the gate scores
    task_params: dict[str, Any]  # what the app would send with every call
    strict: str  # the benchmark's own strict rescoring: "label" or "fields"

    @property
    def labelled(self) -> Path:
        return SAMPLES / self.template_id / "labelled.jsonl"

    @property
    def strict_name(self) -> str:
        return "accuracy" if self.strict == "label" else "all fields right"


TASKS: dict[str, Task] = {
    "intent-bench": Task(TEMPLATE_ID, COMBINATION, "token_f1", TASK_PARAMS, "label"),
    # One line of JSON with five short fields is about 35 tokens (64 cut one long address's answer
    # in the first run, so 96). "\n\n", not "\n", ends it: a
    # model (or DSPy's adapter, in bench_optimizer_peers.py) that writes the object over several
    # lines is scored on what it wrote, not cut after "{".
    "extract-bench": Task(
        "extract-bench",
        "extract-local",
        "json_fields",
        {"temperature": 0, "max_tokens": 96, "stop": ["\n\n"]},
        "fields",
    ),
}


def config_data(tmp: Path, task: Task = TASKS["intent-bench"]) -> dict[str, Any]:
    """The benchmark's config, as YAML would give it (bench_compare.py adds to it)."""
    return {
        "model_providers": {"local": {"type": "local", "local": {"n_ctx": 2048, "queue_size": 64}}},
        "template_dirs": [str(SAMPLES)],
        "gateway": {
            "combinations": [
                {
                    "id": task.combination,
                    "template_id": task.template_id,
                    "model": "smollm2-135m-instruct",
                    "provider": "local",
                }
            ]
        },
        "dataset": {"base_path": str(tmp / "prompts")},
        "analytics": {"path": str(tmp / "analytics.duckdb")},
        "recorder": {"flush_interval_ms": 50},
    }


def config(tmp: Path, task: Task = TASKS["intent-bench"]) -> Any:
    return parse_config(config_data(tmp, task))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """labelled.jsonl's {"input", "variables", "expected"} as dataset rows (as `dataset import` does)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append(
                {
                    "messages": [{"role": "user", "content": r["input"]}],
                    "variables": r.get("variables") or {},
                    "expected": r["expected"],
                }
            )
    return rows


_PUNCT = str.maketrans("", "", string.punctuation)


def label_of(output: str) -> str:
    """The answer as a label: lower case, no punctuation or surrounding space."""
    return " ".join(output.lower().translate(_PUNCT).split())


async def accuracy(
    core: Any, cand: Candidate, rows: list[Any], task: Task = TASKS["intent-bench"]
) -> tuple[float, float]:
    """(strict, partial) over `rows`. For a label task, strict: the answer is exactly the label,
    ignoring case and punctuation; partial: the label word appears in the answer. For a fields
    task, strict: every field of the expected JSON object is right; partial: the mean share of
    right fields (json_fields)."""
    combo = core.gateway.combinations[task.combination]
    fields = JsonFieldEvaluator()
    strict = partial = 0.0
    for row in rows:
        text, *_ = await core.gateway.call_direct(
            combo, cand.messages(row), task.task_params, kind="benchmark"
        )
        if task.strict == "fields":
            share = (await fields.score(output=text, expected=row.expected, inputs={})).value
            strict += share == 1.0
            partial += share
            continue
        got, want = label_of(text), row.expected.lower()
        strict += got == want
        partial += re.search(rf"\b{re.escape(want)}\b", got) is not None
    return strict / len(rows), partial / len(rows)


async def one_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    task = TASKS[args.task]
    with tempfile.TemporaryDirectory(prefix=f"rswitch-bench-opt-{seed}-") as tmp:
        core = Core(config(Path(tmp), task))
        await core.start()
        try:
            core.datasets.import_rows(task.template_id, read_rows(task.labelled))
            params = dict(task.task_params)
            settings = (
                ReflectiveSettings(seed=seed, task_params=params, **REFLECTIVE | args.overrides)
                if args.strategy == "reflective"
                else Settings.auto(args.preset, seed=seed, task_params=params, **SETTINGS | args.overrides)
            )
            started = time.perf_counter()

            def progress(t: dict[str, Any]) -> None:
                if args.verbose:
                    full = f" full {t['full_score']:.3f}" if t.get("full_score") is not None else ""
                    print(
                        f"  trial {t['trial']:>2} ({t['instruction']},{t['demo_set']}) "
                        f"mini {t['minibatch_score']:.3f}{full} best {t['best_score']:.3f} calls {t['calls']}"
                        + (f" ({t['note']})" if t.get("note") else ""),
                        flush=True,
                    )
                    if t.get("refused_text"):
                        print(f"    refused: {t['refused_text'][:160]!r}", flush=True)

            result, _ = await optimize(
                core,
                task.template_id,
                settings=settings,
                combination_id=task.combination,
                evaluator=args.evaluator,
                dry_run=True,
                on_trial=progress,
            )
            wall = time.perf_counter() - started
            # the same split the run used: the newest 20% of rows, whatever the seed
            test = split(load_examples(core.datasets, task.template_id), seed=seed).test
            seed_cand = Candidate(result.instructions[0], result.demo_sets[0] if result.demo_sets else [])
            winner = result.winner_candidate or seed_cand
            seed_acc = await accuracy(core, seed_cand, test, task)
            win_acc = (
                seed_acc if result.winner in (None, (0, 0)) else await accuracy(core, winner, test, task)
            )
            if args.verbose:
                for i, ins in enumerate(result.instructions):
                    print(f"  instruction {i}: {ins!r}")
                for d, demos in enumerate(result.demo_sets):
                    print(f"  demo set {d}: {[(x['user'][:40], x['assistant']) for x in demos]}")
            return {
                "task": task.template_id,
                "seed": seed,
                "test_rows": len(test),
                "incumbent_test": result.incumbent_test,
                "winner_test": result.winner_test,
                "incumbent_acc": seed_acc[0],
                "winner_acc": win_acc[0],
                "incumbent_contains": seed_acc[1],
                "winner_contains": win_acc[1],
                "baseline_val": result.baseline_val,
                "winner_val": result.winner_val,
                "winner": list(result.winner) if result.winner else None,
                "ci": list(result.ci) if result.ci else None,
                "promote": result.promote,
                "verdict": result.verdict,
                "stopped": result.stopped,
                "trials": len(result.trials),
                "calls": dict(result.calls),
                "total_calls": sum(result.calls.values()),
                "instructions": result.instructions,
                "demo_sets": len(result.demo_sets),
                "winner_instruction": winner.instruction,
                "winner_demos": winner.demos,
                "run_seconds": result.seconds,
                "wall_seconds": wall,
            }
        finally:
            await core.stop()


def fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def mean_spread(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    m = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}" if pct else f"{m:.0f} ± {sd:.0f}"


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    strict = TASKS[args.task].strict_name
    head = (
        f"| seed | test {args.evaluator} seed → winner | test {strict} seed → winner | gain ({strict}) "
        f"| val seed → winner | verdict | calls | wall s |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        verdict = "promote" if r["promote"] else ("stopped" if r["stopped"] else "keep")
        ci = f" CI [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]" if r["ci"] else ""
        lines.append(
            f"| {r['seed']} | {fmt(r['incumbent_test'])} → {fmt(r['winner_test'])} "
            f"| {fmt(r['incumbent_acc'])} → {fmt(r['winner_acc'])} "
            f"| {100 * (r['winner_acc'] - r['incumbent_acc']):+.1f} "
            f"| {fmt(r['baseline_val'])} → {fmt(r['winner_val'])} | {verdict}{ci} "
            f"| {r['total_calls']} | {r['wall_seconds']:.0f} |"
        )
    ok = [r for r in rows if r["winner_test"] is not None]
    if ok:
        gains = [r["winner_acc"] - r["incumbent_acc"] for r in ok]
        lines.append(
            f"| mean ± sd | {mean_spread([r['incumbent_test'] for r in ok])} → "
            f"{mean_spread([r['winner_test'] for r in ok])} "
            f"| {mean_spread([r['incumbent_acc'] for r in ok])} → {mean_spread([r['winner_acc'] for r in ok])} "
            f"| {mean_spread(gains)} "
            f"| {mean_spread([r['baseline_val'] for r in ok])} → {mean_spread([r['winner_val'] for r in ok])} "
            f"| {sum(r['promote'] for r in ok)}/{len(ok)} promote "
            f"| {mean_spread([r['total_calls'] for r in ok], pct=False)} "
            f"| {mean_spread([r['wall_seconds'] for r in ok], pct=False)} |"
        )
    return "\n".join(lines)


def parse_overrides(items: list[str], strategy: str = "mipro") -> dict[str, Any]:
    fields = (ReflectiveSettings if strategy == "reflective" else Settings).__dataclass_fields__
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set: unknown setting {key!r}")
        out[key] = json.loads(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="intent-bench", choices=tuple(TASKS), help="the benchmark task")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated optimizer seeds")
    ap.add_argument("--preset", default="light", help="MIPROv2 preset: light | medium | heavy")
    ap.add_argument(
        "--strategy", default="mipro", choices=("mipro", "reflective"), help="the search (rswitch optimize's)"
    )
    ap.add_argument("--evaluator", help="an rswitch evaluator name (default: the task's)")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a Settings field, e.g. num_trials=20"
    )
    ap.add_argument("--json", type=Path, help="also write the per-seed results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="print trials, instructions and demos")
    args = ap.parse_args()
    args.overrides = parse_overrides(args.overrides, args.strategy)
    task = TASKS[args.task]
    args.evaluator = args.evaluator or task.evaluator
    seeds = [int(s) for s in args.seeds.split(",")]
    search = (
        f"reflective search, settings {REFLECTIVE | args.overrides}"
        if args.strategy == "reflective"
        else f"MIPROv2: preset {args.preset}, settings {SETTINGS | args.overrides}"
    )
    print(
        f"{search} on {task.template_id} (SmolLM2-135M, local, also the proposer): "
        f"evaluator {args.evaluator}, task params {task.task_params}",
        flush=True,
    )
    rows = []
    for seed in seeds:
        print(f"seed {seed}…", flush=True)
        r = asyncio.run(one_seed(seed, args))
        print(
            f"seed {seed}: test {args.evaluator} {fmt(r['incumbent_test'])} → {fmt(r['winner_test'])}, "
            f"{task.strict_name} {fmt(r['incumbent_acc'])} → {fmt(r['winner_acc'])}; {r['verdict']}; "
            f"{r['total_calls']} calls {r['calls']}; {r['wall_seconds']:.0f} s",
            flush=True,
        )
        rows.append(r)
    print()
    print(report(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
