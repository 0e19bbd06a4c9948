"""`rswitch load`'s engine: send request bodies through a running gateway and summarise what
happened — how an operator makes the panes move, and what benchmarks use. Reading the
inputs (sample templates, JSONL files) is the command's job, in rswitch/cli/load.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


class LoadError(ValueError):
    """Load cannot run: no examples, an unreachable gateway, nothing it serves."""


def key_headers() -> dict[str, str]:
    """A gateway with client keys (gateway.auth.keys) gets $RSWITCH_API_KEY as a bearer key."""
    import os

    key = os.environ.get("RSWITCH_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


def _unreachable(url: str, exc: Exception) -> LoadError:
    return LoadError(
        f"cannot reach the gateway at {url} ({type(exc).__name__}); start it with `rswitch serve`"
    )


async def served_templates(url: str, timeout: float = 10.0) -> set[str]:
    """The templates a running gateway has an enabled combination for (from its /v1/models):
    a request for any other template could only fail with `no_combination`."""
    endpoint = url.rstrip("/") + "/v1/models"
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout), headers=key_headers()
        ) as session:
            async with session.get(endpoint) as resp:
                data = await resp.read()
                status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _unreachable(url, exc) from None
    try:
        models = orjson.loads(data)["data"] if status == 200 else None
    except (orjson.JSONDecodeError, KeyError, TypeError):
        models = None
    if not isinstance(models, list):
        raise LoadError(f"{endpoint} answered HTTP {status} without a model list; is it an rswitch gateway?")
    return {
        m["template_id"]
        for m in models
        if isinstance(m, dict) and m.get("rswitch_kind") == "combination" and m.get("template_id")
    }


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    elapsed_s: float = 0.0
    by_combination: Counter[str] = field(default_factory=Counter)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.sent,
            "succeeded": self.ok,
            "errors": dict(self.errors),
            "throughput_rps": self.sent / self.elapsed_s if self.elapsed_s else 0.0,
            "latency_ms": {
                "p50": self.percentile(0.5),
                "p95": self.percentile(0.95),
                "p99": self.percentile(0.99),
            },
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "cost_usd": self.cost,
            "elapsed_s": self.elapsed_s,
            "by_combination": dict(self.by_combination),
        }


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool, result: LoadResult
) -> None:
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}} if stream else body
    start = time.perf_counter()
    result.sent += 1
    try:
        async with session.post(
            url, data=orjson.dumps(payload), headers={"content-type": "application/json"}
        ) as resp:
            combo = resp.headers.get("x-rswitch-combination")
            if resp.status != 200:
                data = await resp.read()
                try:
                    code = orjson.loads(data)["error"].get("code") or orjson.loads(data)["error"].get("type")
                except Exception:
                    code = None
                result.errors[f"HTTP {resp.status}" + (f" {code}" if code else "")] += 1
                return
            usage = None
            if stream:
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        chunk = orjson.loads(line[6:])
                        if "error" in chunk:
                            result.errors[f"stream {chunk['error'].get('code') or 'error'}"] += 1
                            return
                        usage = chunk.get("usage") or usage
            else:
                data = orjson.loads(await resp.read())
                usage = data.get("usage")
                result.cost += float(resp.headers.get("x-rswitch-cost", 0) or 0)
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.errors[type(exc).__name__] += 1
        return
    result.ok += 1
    result.latencies_ms.append((time.perf_counter() - start) * 1000)
    if combo:
        result.by_combination[combo] += 1
    if usage:
        result.prompt_tokens += usage.get("prompt_tokens", 0) or 0
        result.completion_tokens += usage.get("completion_tokens", 0) or 0


async def run_load(
    url: str,
    requests: list[dict[str, Any]],
    *,
    concurrency: int | None = 4,
    rate: float | None = None,
    total: int | None = 100,
    duration: float | None = None,
    stream: bool = False,
    timeout: float = 120.0,
    on_progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Closed loop with `concurrency` workers, or open loop at `rate` requests/s.
    Stops after `total` requests or `duration` seconds, whichever comes first."""
    if not requests:
        raise LoadError("no requests to send")
    if total is None and duration is None:
        raise LoadError("give a number of requests or a duration")
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    result = LoadResult()
    bodies: Iterator[dict[str, Any]] = itertools.cycle(requests)
    start = time.perf_counter()
    deadline = start + duration if duration else None

    def more() -> bool:
        if total is not None and result.sent >= total:
            return False
        return deadline is None or time.perf_counter() < deadline

    limit = max(concurrency or 1, 1) if rate is None else 1024
    conn = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=timeout), headers=key_headers()
    ) as session:
        try:
            async with session.get(
                url.rstrip("/") + "/health", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                if resp.status != 200:
                    raise LoadError(f"{url}/health answered HTTP {resp.status}; is it an rswitch gateway?")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unreachable(url, exc) from None
        start = time.perf_counter()
        deadline = start + duration if duration else None

        async def worker() -> None:
            while more():
                await _one(session, endpoint, next(bodies), stream, result)
                if on_progress:
                    on_progress(result)

        if rate is None:
            await asyncio.gather(*(worker() for _ in range(max(1, concurrency or 1))))
        else:
            tasks: set[asyncio.Task[None]] = set()
            interval = 1.0 / rate
            n = 0  # scheduled so far: tasks count themselves as sent only once they run
            while more() and (total is None or n < total):
                target = start + n * interval
                if deadline is not None and target >= deadline:
                    break
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(_one(session, endpoint, next(bodies), stream, result))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if on_progress:
                    task.add_done_callback(lambda _t: on_progress(result))
                n += 1
            if tasks:
                await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - start
    return result
