#!/usr/bin/env python3
"""CPU cost of one routed request's semantic step, in isolation: µs of CPU per query.

Builds the semantic step `bench_gateway.py --routing semantic` runs (the built-in static
encoder, 20 routes x 10 utterances) from the same config, then drives `step.decide` from C
concurrent tasks (as C connections would) and reports CPU time per query: the process's
(every thread) and the event loop thread's alone, median and spread over rounds. CPU time, not
wall-clock, so other work on the machine barely moves the figures.

The harness itself (tasks, Query objects) is measured the same way with a step that decides
nothing, and reported beside it, so `step` is what the semantic step adds.

With --gateway it measures the whole gateway instead: two `rswitch serve` processes on one
nginx upstream, one with bench_gateway.py's config and `--routing none`, one with `--routing
semantic`, loaded in turn by wrk for the same time (alternating, so both see the same noise), and
reports each server's CPU per completed request (/proc/PID/stat: every thread, and the event loop
thread alone). On a busy machine req/s says little; CPU per request is what bounds the peak.

Usage: python benchmarks/bench_routing_cpu.py [--concurrency 1,16] [--queries 4000] [--rounds 5]
       [--prompts distinct|hello] [--max-batch 64] [--thread]
       python benchmarks/bench_routing_cpu.py --gateway [--concurrency 16] [--rounds 5] [--seconds 5]
       [--rswitch-cmd CMD] [--before-cmd CMD]
  --prompts hello   every query is "hello", as bench_gateway.py sends
  --max-batch 1     no micro-batching: one encoder call and one scoring per query
  --thread          every encoder call in a worker thread (asyncio.to_thread), as long prompts go
  --rswitch-cmd     the command that runs rswitch (e.g. another checkout: "env PYTHONPATH=DIR python -m rswitch")
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_gateway as bg  # noqa: E402
from bench_gateway import write_config  # noqa: E402

from rswitch.config import load_config  # noqa: E402
from rswitch.core import embedder_factory, routing_providers  # noqa: E402
from rswitch.routing.base import Query  # noqa: E402
from rswitch.routing.chains import build_chains  # noqa: E402

_VERBS = "reset cancel change track return renew update close open check pay dispute".split()
_THINGS = "password order subscription invoice refund account card plan booking address loan policy".split()
_TAILS = ["", " today", " please", " before friday", " for my partner", " again", " online", " abroad"]


def distinct_prompts(n: int) -> list[str]:
    """n different, plausible prompts (cycled when n exceeds the combinations)."""
    out = [f"how do I {v} my {t}{tail}" for tail in _TAILS for t in _THINGS for v in _VERBS]
    return [out[i % len(out)] + (f" #{i // len(out)}" if i >= len(out) else "") for i in range(n)]


class _Nothing:
    """A step that decides nothing: what the harness costs without routing."""

    name = "nothing"

    async def decide(self, query: Query) -> None:
        return None


async def drive(step: Any, prompts: list[str], concurrency: int) -> tuple[float, float]:
    """(process CPU s, loop-thread CPU s) for deciding every prompt from `concurrency` tasks."""
    shares = [prompts[i::concurrency] for i in range(concurrency)]

    async def worker(texts: list[str]) -> None:
        for t in texts:
            await step.decide(Query([{"role": "user", "content": t}]))

    p0, t0 = time.process_time(), time.thread_time()
    await asyncio.gather(*(worker(s) for s in shares))
    return time.process_time() - p0, time.thread_time() - t0


def _stats(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.median(values):7.1f} ± {sd:5.1f}"


def gateway(args: argparse.Namespace) -> dict[str, Any]:
    """CPU µs per request of `rswitch serve` with routing none and semantic, on the same load."""
    procs = bg.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="rswitch-routing-cpu-"))
    levels = [int(x) for x in args.concurrency.split(",")]
    cmds = {"": shlex.split(args.rswitch_cmd) if args.rswitch_cmd else [sys.executable, "-m", "rswitch"]}
    if args.before_cmd:
        cmds["@before"] = shlex.split(args.before_cmd)
    results: dict[str, Any] = {"args": vars(args), "levels": {}}
    try:
        _, _, up_port = bg.start_upstream(bg.pick_upstream("auto"), procs, tmp)
        servers = {}
        for tag, cmd in cmds.items():
            for routing in ["none", *args.compare.split(",")]:
                d = tmp / f"{routing}{tag}"
                d.mkdir()
                proc, port = bg.start_rswitch(procs, d, write_config(d, up_port, {}, routing), cmd)
                bg.check_one_request(port)
                servers[routing + tag] = (proc.pid, f"http://{bg.HOST}:{port}/v1/chat/completions")
        loader = bg.Loader(bg.pick_loader("auto"), procs, tmp)
        print(
            f"rswitch serve, bench_gateway.py's config, routing none vs {args.compare}; {args.seconds:g}s of "
            f"{loader.describe()} per server per round, {args.rounds} rounds, alternating"
        )
        print("µs of CPU per completed request, median ± sd over rounds (process = all threads, loop = main)")
        print(
            "added: CPU a request more than routing none (of the same rswitch), round by round; peak: the "
            "throughput that leaves if the process's CPU is what bounds it"
        )
        print(f"{'conc':>4}  {'routing':<15}  {'process':>15}  {'loop':>15}  {'added':>15}  {'peak':>7}")
        for c in levels:
            threads = 1 if c == 1 else 2
            for _, url in servers.values():  # warm up
                loader.run(url, c, threads, 1.0)
            per: dict[str, dict[str, list[float]]] = {r: {"process": [], "loop": []} for r in servers}
            for _ in range(args.rounds):
                for routing, (pid, url) in servers.items():
                    p0, t0 = bg.cpu_seconds(pid), bg.thread_cpu_seconds(pid, pid)
                    n = int(loader.run(url, c, threads, args.seconds)["requests"])
                    p1, t1 = bg.cpu_seconds(pid), bg.thread_cpu_seconds(pid, pid)
                    per[routing]["process"].append((p1 - p0) / max(n, 1) * 1e6)
                    per[routing]["loop"].append((t1 - t0) / max(n, 1) * 1e6)
            for routing, m in per.items():
                none = per["none" + routing.partition("@")[1] + routing.partition("@")[2]]
                added = [s - n for s, n in zip(m["process"], none["process"], strict=True)]
                ratio = [n / s for s, n in zip(m["process"], none["process"], strict=True)]
                print(
                    f"{c:>4}  {routing:<15}  {_stats(m['process']):>15}  {_stats(m['loop']):>15}"
                    + (
                        f"  {_stats(added):>15}  {100 * (statistics.median(ratio) - 1):+6.1f}%"
                        if not routing.startswith("none")
                        else ""
                    )
                )
            results["levels"][str(c)] = per
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16", help="comma-separated concurrent callers (default 1,16)")
    ap.add_argument("--gateway", action="store_true", help="measure rswitch serve, none vs semantic routing")
    ap.add_argument("--seconds", type=float, default=5.0, help="--gateway: seconds of load per run")
    ap.add_argument("--rswitch-cmd", default=None, help="--gateway: the command that runs rswitch")
    ap.add_argument(
        "--before-cmd",
        default=None,
        help="--gateway: also run this rswitch (another checkout) beside, as routing@before, same load",
    )
    ap.add_argument(
        "--compare", default="semantic", help="--gateway: routings measured beside none (semantic, rules)"
    )
    ap.add_argument("--queries", type=int, default=4000, help="queries per round (default 4000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per level; median and sd reported")
    ap.add_argument("--prompts", choices=["distinct", "hello"], default="distinct")
    ap.add_argument("--max-batch", type=int, default=None, help="the step's micro-batch bound (1: none)")
    ap.add_argument("--thread", action="store_true", help="encode in a worker thread, even short prompts")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if args.gateway:
        results = gateway(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return

    with tempfile.TemporaryDirectory(prefix="rswitch-routing-cpu-") as tmp:
        cfg = load_config(write_config(Path(tmp), 1, {}, "semantic"))
        providers = routing_providers(cfg)
        for p in providers.values():
            await p.start()
        if args.thread:
            providers["encoder"].inline_chars = -1  # every call goes to a worker thread
        chain, _ = build_chains(cfg.routing, embedder_factory(providers), Path(tmp) / "routing")
        assert chain is not None
        step = chain.steps[0]
        if args.max_batch is not None:
            step._batch.max_items = args.max_batch
        await step.warm()
        prompts = ["hello"] * args.queries if args.prompts == "hello" else distinct_prompts(args.queries)
        await drive(step, prompts[:500], 16)  # warm caches and allocators

        results: dict[str, Any] = {"args": vars(args), "levels": {}}
        print(
            f"semantic step, static encoder, 20 routes x 10 utterances; {args.queries} {args.prompts} "
            f"prompts x {args.rounds} rounds; "
            f"max batch {getattr(getattr(step, '_batch', None), 'max_items', 'none')}, "
            f"encode {'in a thread' if args.thread else 'inline'}"
        )
        print(
            "µs of CPU per query, median ± sd over rounds (process = all threads, loop = event loop thread)"
        )
        print(f"{'conc':>4}  {'step process':>15}  {'step loop':>15}  {'harness process':>15}")
        for c in [int(x) for x in args.concurrency.split(",")]:
            step_p, step_t, base_p = [], [], []
            for _ in range(args.rounds):
                bp, _bt = await drive(_Nothing(), prompts, c)
                sp, st = await drive(step, prompts, c)
                base_p.append(bp / len(prompts) * 1e6)
                step_p.append((sp - bp) / len(prompts) * 1e6)
                step_t.append((st - _bt) / len(prompts) * 1e6)
            print(f"{c:>4}  {_stats(step_p):>15}  {_stats(step_t):>15}  {_stats(base_p):>15}")
            results["levels"][str(c)] = {
                "step_process_us": step_p,
                "step_loop_us": step_t,
                "harness_us": base_p,
            }
        for p in providers.values():
            await p.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
