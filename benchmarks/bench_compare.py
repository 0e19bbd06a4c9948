#!/usr/bin/env python3
"""`rswitch compare` on a real task: which model and prompt should serve intent-bench?

It:
  1. writes a fresh config (as bench_optimizer.py does): the embedded SmolLM2-135M through
     llama.cpp, the sample templates, one combination for `intent-bench`, and an "expensive"
     provider: an OpenAI-compatible stand-in on loopback for a paid model, priced like
     gpt-4o (USD 2.50 / 10.00 per million tokens), answering the right label for 90% of the
     rows (a seeded hash picks which) after 300 ms — a stand-in, not a measurement of any
     real model;
  2. imports sample_prompts/intent-bench/labelled.jsonl and runs the optimizer once (seed 0,
     bench_optimizer.py's settings), which registers the optimized prompt as version 2;
  3. compares, on the held-out test split (65 rows): the embedded model with the seed prompt
     (`intent-local@v1`), with the optimized prompt (`intent-local`, the incumbent), and the
     expensive stand-in with the optimized prompt (`--models expensive/oracle-4o`), scored by
     token F1 like the optimizer's benchmark;
  4. prints the table and a quality-vs-cost plot, and writes both to --markdown.

Usage: python benchmarks/bench_compare.py [--markdown benchmarks/results/compare.md] [--rows N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_optimizer import (  # noqa: E402
    COMBINATION,
    LABELLED,
    SETTINGS,
    TASK_PARAMS,
    TEMPLATE_ID,
    config_data,
    read_rows,
)

from rswitch.cli.compare import render  # noqa: E402
from rswitch.config import parse_config  # noqa: E402
from rswitch.core import Core  # noqa: E402
from rswitch.optimizer import compare as cmp  # noqa: E402
from rswitch.optimizer.mipro import Settings  # noqa: E402
from rswitch.optimizer.service import optimize  # noqa: E402

EXPENSIVE_MODEL = "oracle-4o"
RIGHT_SHARE = 0.9
LATENCY_S = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expensive_upstream(labels: dict[str, str], port: int) -> Any:
    """An OpenAI-compatible stand-in: the right label for RIGHT_SHARE of the inputs, another
    label for the rest (the same ones every run), after LATENCY_S."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    others = sorted(set(labels.values()))

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        text = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        right = labels.get(text, others[0])
        draw = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        answer = right if draw < RIGHT_SHARE else next(x for x in others if x != right)
        await asyncio.sleep(LATENCY_S)
        prompt = sum(len(str(m.get("content", ""))) for m in body["messages"]) // 4
        return JSONResponse(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", EXPENSIVE_MODEL),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": 2, "total_tokens": prompt + 2},
            }
        )

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server


def config(tmp: Path, port: int) -> Any:
    """bench_optimizer.py's config, with the expensive stand-in beside the embedded model."""
    data = config_data(tmp)
    data["model_providers"]["expensive"] = {
        "type": "openai",
        "base_url": f"http://127.0.0.1:{port}/v1",
        "api_key_env": "BENCH_NO_KEY",
    }
    data["pricing"] = {EXPENSIVE_MODEL: {"input": 2.5, "output": 10.0}}
    return parse_config(data)


def plot(run: dict[str, Any]) -> str:
    """Quality against cost, one numbered point a candidate, the legend above the points."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(78, 20)
    plt.theme("clear")
    cands = run["candidates"]
    xs, ys = [o["cost_per_1k"] for o in cands], [o["mean"] for o in cands]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 0.1
    plt.xlim(min(xs) - 0.08 * dx, max(xs) + 0.08 * dx)
    plt.ylim(min(ys) - 0.1 * dy, max(ys) + 0.45 * dy)  # room for the legend at the top
    for n, o in enumerate(cands, 1):
        where = "front" if o["on_front"] else "dominated"
        plt.scatter([o["cost_per_1k"]], [o["mean"]], marker=str(n), label=f"{o['id']} ({where})")
    plt.title(f"{TEMPLATE_ID}: quality (token F1) vs $ per 1,000 calls")
    plt.xlabel("$ per 1,000 calls")
    return plt.uncolorize(plt.build())  # plain text, for a terminal and the README alike


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import os

    os.environ["BENCH_NO_KEY"] = "sk-bench-not-a-real-key"
    rows = read_rows(LABELLED)
    labels = {r["messages"][0]["content"]: r["expected"] for r in rows}
    port = free_port()
    server = expensive_upstream(labels, port)
    with tempfile.TemporaryDirectory() as tmp:
        core = Core(config(Path(tmp), port))
        await core.start()
        try:
            core.datasets.import_rows(TEMPLATE_ID, rows)
            started = time.perf_counter()
            settings = Settings(seed=0, task_params=dict(TASK_PARAMS), **SETTINGS)
            result, version = await optimize(core, TEMPLATE_ID, settings=settings, evaluator="token_f1")
            optimized_s = time.perf_counter() - started
            print(
                f"optimizer: {result.verdict}; version {version}; {sum(result.calls.values())} calls, {optimized_s:.0f} s",
                file=sys.stderr,
            )
            if version is None:
                raise SystemExit(
                    "the optimizer did not promote a prompt: nothing to compare against the seed"
                )
            who = cmp.contenders(core, TEMPLATE_ID, [f"{COMBINATION}@v1"], [f"expensive/{EXPENSIVE_MODEL}"])
            chosen = cmp.rows_for(core, TEMPLATE_ID, "test", args.rows, 0)

            def progress(done: int, outcomes: list[Any]) -> None:
                live = "  ".join(f"{o.id} {sum(o.scores) / len(o.scores):.2f}" for o in outcomes)
                print(f"\rrow {done}/{len(chosen)}  {live}", end="", file=sys.stderr)

            comparison = await cmp.compare(
                core, TEMPLATE_ID, who, chosen, evaluator="token_f1", on_row=progress
            )
            print(file=sys.stderr)
            return {
                "record": comparison.record(),
                "optimizer": {
                    "verdict": result.verdict,
                    "calls": sum(result.calls.values()),
                    "seconds": optimized_s,
                },
            }
        finally:
            await core.stop()
            server.should_exit = True


def run() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=None, help="at most N test rows (default: all 65)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table and plot here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = asyncio.run(main(args))
    record = out["record"]
    table, figure = render(record), plot(record)
    print(table)
    print(figure)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    if args.markdown:
        opt = out["optimizer"]
        args.markdown.write_text(
            "# `rswitch compare` on intent-bench\n\n"
            "`python benchmarks/bench_compare.py --markdown benchmarks/results/compare.md` (one run; the "
            f"optimizer first: {opt['verdict']}, {opt['calls']} calls, {opt['seconds']:.0f} s). "
            "`expensive/oracle-4o` is a stand-in on loopback for a paid model (90% right labels, 300 ms, "
            "gpt-4o's prices), not a measurement of one.\n\n```text\n"
            + table
            + "\n```\n\n```text\n"
            + figure
            + "\n```\n"
        )


if __name__ == "__main__":
    run()
