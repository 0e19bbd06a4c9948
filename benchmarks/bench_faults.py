#!/usr/bin/env python3
"""Fault benchmark: does an app behind rswitch still get its whole answer when the upstream breaks?

One run:
  1. starts two instances of benchmarks/faulty_upstream.py on free loopback ports: the primary
     (every fault scenario, chosen by the model name `faulty/<scenario>`) and the fallback
     (always healthy, model `healthy`);
  2. writes a temporary config: per table row one primary provider + combination on that row's
     faulty model (its own provider, so one row's 429 or breaker cannot touch the next), all
     with ONE fallback combination on the healthy model; short per-attempt limits (connect 1 s,
     first byte 3 s, idle 2 s, retry_same 1, prefill on unless --no-prefill, context windows
     1024 vs 128000), a 30 s request deadline and the circuit breaker on; starts `rswitch
     serve` on a free port;
  3. sends each row's request through rswitch with the official `openai` SDK (max_retries=0,
     so the SDK hides nothing), non-streaming and streaming, each with its own user message;
  4. prints a table: outcome (full answer: the text equals the expected text exactly, once, in
     order — for a stream with one finish_reason; error: nothing usable; truncated: an error
     after a correct prefix; wrong: anything else presented as an answer, or a refusal the
     gateway "rescued"), attempts as rswitch reports them, calls the two upstreams saw (primary
     + fallback), client-visible latency and the tokens billed (the answer's usage total);
  5. stops every process it started, also on Ctrl+C.

Attempts come from the error body's `error.attempts` or the `rswitch.attempts` chain on the
answer or a stream's last chunk, else the `x-rswitch-attempts` header (a stream's is sent
before it can fail over), else the admin API's record of the request
(GET /admin/v1/calls/{request id}: the newest attempt's number); "?" when none says.

Run (about 3 minutes while the gateway waits out silent upstreams, seconds when it does not):
  .venv/bin/python benchmarks/bench_faults.py
  .venv/bin/python benchmarks/bench_faults.py --scenarios cut-mid,stall-mid --json faults.json
  .venv/bin/python benchmarks/bench_faults.py --quick          # the few rows the test runs
  .venv/bin/python benchmarks/bench_faults.py --no-prefill     # continue broken streams by replay
Other checkout: --rswitch-cmd "/path/.venv/bin/python -m rswitch"  (`serve …` is appended).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

try:  # imported as benchmarks.bench_faults (the test) or run as a script from benchmarks/
    from benchmarks import faulty_upstream as fu
except ImportError:  # pragma: no cover - script mode
    import faulty_upstream as fu  # type: ignore[no-redef]

HOST = "127.0.0.1"
TEMPLATE_ID = "fault-tpl"
FALLBACK = "fallback"
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 1.0
FIRST_BYTE_TIMEOUT = 3.0
IDLE_TIMEOUT = 2.0
BOTH = ("json", "stream")
# scenario -> the modes in which it means something (the faulty upstream's SCENARIOS say what each does)
MODES: dict[str, tuple[str, ...]] = {
    "healthy": BOTH,
    "500-once": BOTH,
    "502-html": BOTH,
    "503-retry-after": BOTH,
    "429-retry-after": BOTH,
    "reset": BOTH,
    "silent": BOTH,
    "slow-first-byte": BOTH,
    "invalid-json": ("json",),
    "cut-first-token": ("stream",),
    "cut-mid": BOTH,
    "stall-mid": BOTH,
    "error-event": ("stream",),
    "malformed-event": ("stream",),
    "no-done": ("stream",),
    "context-length": BOTH,
    "content-policy": BOTH,
}
CONTROL = frozenset({"healthy"})  # no fault: proves the harness; not counted as a rescue
MUST_FAIL = frozenset({"content-policy"})  # the client's own error: returned at once, never rescued
QUICK = ("healthy", "500-once", "cut-mid", "content-policy")
OUTCOMES = ("full answer", "error", "truncated", "wrong", "error (correct)")

assert set(MODES) == set(fu.SCENARIOS), "every scenario of the faulty upstream has its modes here"


@dataclass
class Row:
    scenario: str
    mode: str
    outcome: str = "?"
    attempts: int | None = None
    attempts_source: str | None = None  # header, error body, admin record
    primary_calls: int = 0
    fallback_calls: int = 0
    prefill_calls: int = 0  # calls that continued a partial answer (continue_final_message)
    latency_ms: float = 0.0
    tokens: int | None = None
    status: int | None = None  # the HTTP status the client got
    detail: str = ""
    words: int = 0  # words of the answer the client got
    expected_words: int = fu.ANSWER_WORDS

    @property
    def combination(self) -> str:
        return f"p-{self.scenario}-{self.mode}"


# -- processes ------------------------------------------------------------------------------------


class Procs:
    """Every child this script starts, each in its own session, so cleanup stops exactly those."""

    def __init__(self) -> None:
        self.items: list[subprocess.Popen[Any]] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.items.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.items):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
        self.items = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen[Any], log: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} at start:\n{tail(log)}")
        with contextlib.suppress(OSError, ValueError):
            http_json(url, timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s:\n{tail(log)}")


def start_upstream(procs: Procs, tmp: Path, name: str) -> int:
    port = free_port()
    log = tmp / f"{name}.out"
    p = procs.start(
        [sys.executable, str(Path(fu.__file__).resolve()), "--host", HOST, "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_healthy(f"http://{HOST}:{port}/health", p, log, f"{name} upstream")
    return port


def write_config(
    tmp: Path, rows: list[Row], primary_port: int, fallback_port: int, prefill: bool = True
) -> Path:
    limits = (
        f"    connect_timeout_seconds: {CONNECT_TIMEOUT:g}\n"
        f"    first_byte_timeout_seconds: {FIRST_BYTE_TIMEOUT:g}\n"
        f"    idle_timeout_seconds: {IDLE_TIMEOUT:g}\n"
        "    retry_same: 1\n"
        f"    prefill: {str(prefill).lower()}\n"
    )
    combos, providers = [], []
    for r in rows:
        model = f"faulty/{r.scenario}"
        combos.append(
            f"    - id: {r.combination}\n"
            f"      template_id: {TEMPLATE_ID}\n"
            f"      model: {model}\n"
            f"      provider: {r.combination}\n"
            f"      fallbacks: [{FALLBACK}]\n"
        )
        providers.append(
            f"  {r.combination}:\n"
            "    type: openai\n"
            f"    base_url: http://{HOST}:{primary_port}/v1\n"
            "    api_key_env: RSWITCH_BENCH_KEY\n"
            f"{limits}"
            f"    context_windows: {{{model}: 1024}}\n"
        )
    data = tmp / "data"
    cfg = f"""# generated by benchmarks/bench_faults.py
gateway:
  host: {HOST}
  request_timeout_seconds: {REQUEST_TIMEOUT:g}
  max_attempts: 3
  circuit_breaker: {{enabled: true, failures: 5, cooldown_seconds: 30}}
  combinations:
{"".join(combos)}    - id: {FALLBACK}
      template_id: {TEMPLATE_ID}
      model: healthy
      provider: {FALLBACK}
templates:
  {TEMPLATE_ID}:
    name: Fault benchmark
    template: "You are a concise assistant."
model_providers:
{"".join(providers)}  {FALLBACK}:
    type: openai
    base_url: http://{HOST}:{fallback_port}/v1
    api_key_env: RSWITCH_BENCH_KEY
{limits}    context_windows: {{healthy: 128000}}
dataset:
  base_path: {data}/prompts
analytics:
  path: {data}/analytics/metrics.duckdb
"""
    path = tmp / "config.yaml"
    path.write_text(cfg)
    return path


def start_rswitch(procs: Procs, tmp: Path, config: Path, cmd: list[str]) -> int:
    port = free_port()
    log = tmp / "rswitch.out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RSWITCH_BENCH_KEY": "bench-not-a-secret"}
    env.pop("RSWITCH_ADMIN_KEY", None)
    p = procs.start(
        [*cmd, "serve", "--log-level", "warning", "--config", str(config), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    wait_healthy(f"http://{HOST}:{port}/health", p, log, "rswitch serve")
    return port


# -- one row --------------------------------------------------------------------------------------


def error_object(body: Any) -> dict[str, Any]:
    if isinstance(body, dict):
        err = body.get("error", body)
        return err if isinstance(err, dict) else {}
    return {}


def rswitch_meta(obj: Any) -> dict[str, Any]:
    """The `rswitch` object the gateway may add to an answer or a stream's last chunk."""
    meta = (getattr(obj, "model_extra", None) or {}).get("rswitch")
    return meta if isinstance(meta, dict) else {}


def newest_attempt(request_id: str, rs_port: int) -> int | None:
    """The newest attempt number the admin API's in-memory record of the last calls holds."""
    try:
        call = http_json(f"http://{HOST}:{rs_port}/admin/v1/calls/{request_id}", timeout=5)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return call["attempt"] if isinstance(call, dict) and isinstance(call.get("attempt"), int) else None


def attempts_of(
    headers: Any, err: dict[str, Any], meta: dict[str, Any], request_id: str | None, rs_port: int
) -> tuple[int | None, str | None]:
    # a stream's headers go out before it can fail over: its end (error or last chunk) knows more
    for chain, source in ((err.get("attempts"), "error body"), (meta.get("attempts"), "answer metadata")):
        if isinstance(chain, list) and chain:
            return len(chain), source
    value = headers.get("x-rswitch-attempts") if headers is not None else None
    if value is not None:
        with contextlib.suppress(ValueError):
            return int(value), "header"
    if request_id:
        # a stream's last attempt is recorded as it ends, maybe just after the client saw the
        # end: read until two reads agree
        last = None
        for _ in range(10):
            n = newest_attempt(request_id, rs_port)
            if n is not None and n == last:
                return n, "admin record"
            last = n
            time.sleep(0.1)
        if last is not None:
            return last, "admin record"
    return None, None


@dataclass
class Seen:
    """What the client got for one row, against what it asked for."""

    user: str  # the row's user message: the key under which the upstreams logged their calls
    expected: str
    text: str
    finishes: int
    failed: bool


def classify(row: Row, seen: Seen) -> str:
    expected, text, finishes, failed = seen.expected, seen.text, seen.finishes, seen.failed
    if row.scenario in MUST_FAIL:
        if failed and not text and row.status == 400 and row.fallback_calls == 0:
            return "error (correct)"
        return "error" if failed and not text else "wrong"
    if not failed:
        complete = text == expected and (row.mode == "json" or finishes == 1)
        return "full answer" if complete else "wrong"
    if not text:
        return "error"
    return "truncated" if expected.startswith(text) else "wrong"


def run_row(client: openai.OpenAI, row: Row, rs_port: int, nonce: str) -> Seen:
    """Send the row's request through rswitch and fill in what the client saw."""
    user = f"Fault benchmark {nonce}: scenario {row.scenario}, {row.mode}. Tell me a list of words."
    expected = fu.expected_answer(user)
    messages = [{"role": "user", "content": user}]
    parts: list[str] = []
    finishes, failed, headers, err, meta = 0, False, None, {}, {}
    t0 = time.perf_counter()
    try:
        if row.mode == "json":
            raw = client.chat.completions.with_raw_response.create(model=row.combination, messages=messages)
            headers, row.status = raw.headers, raw.status_code
            completion = raw.parse()
            for choice in completion.choices:
                parts.append(choice.message.content or "")
                finishes += choice.finish_reason is not None
            row.tokens = completion.usage.total_tokens if completion.usage else None
            meta = rswitch_meta(completion)
        else:
            with client.chat.completions.with_streaming_response.create(
                model=row.combination,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            ) as resp:
                headers, row.status = resp.headers, resp.status_code
                try:
                    for chunk in resp.parse():
                        for choice in chunk.choices:
                            if choice.delta and choice.delta.content:
                                parts.append(choice.delta.content)
                            finishes += choice.finish_reason is not None
                        if chunk.usage is not None:
                            row.tokens = chunk.usage.total_tokens
                        meta = rswitch_meta(chunk) or meta
                except openai.APIError as exc:  # an error event in the stream
                    failed, err = True, error_object(exc.body)
                    row.detail = f"stream error: {err.get('code') or err.get('type') or exc.message}"[:60]
    except openai.APIStatusError as exc:
        failed, headers, row.status, err = True, exc.response.headers, exc.status_code, error_object(exc.body)
        row.detail = f"HTTP {exc.status_code} {err.get('code') or err.get('type') or ''}".strip()
    except openai.APIConnectionError as exc:
        failed = True
        row.detail = f"client: {type(exc).__name__}"
    except Exception as exc:  # the connection broke mid-stream (httpx raises its own errors there)
        failed = True
        row.detail = f"client: {type(exc).__name__}"[:60]
    row.latency_ms = (time.perf_counter() - t0) * 1000
    text = "".join(parts)
    row.words = len(text.split())
    if row.mode == "stream" and not failed and finishes != 1:
        row.detail = row.detail or f"{finishes} finish_reason(s)"
    request_id = headers.get("x-rswitch-request-id") if headers is not None else None
    row.attempts, row.attempts_source = attempts_of(headers, err, meta, request_id, rs_port)
    if meta.get("diverged_at") is not None:  # a replayed answer that differed from what was sent
        row.detail = "; ".join(x for x in (row.detail, f"diverged at {meta['diverged_at']}") if x)
    return Seen(user, expected, text, finishes, failed)


def count_calls(port: int, user: str) -> tuple[int, int]:
    """The calls an upstream saw for one row, and how many of them continued a prefill."""
    calls = [c for c in http_json(f"http://{HOST}:{port}/_calls")["calls"] if c["user"] == user]
    return len(calls), sum(1 for c in calls if c["continued"])


# -- the run --------------------------------------------------------------------------------------


def plan_rows(scenarios: list[str]) -> list[Row]:
    return [Row(s, m) for s in scenarios for m in MODES[s]]


def run(
    scenarios: list[str], rswitch_cmd: list[str], tmp: Path, log: Any = print, prefill: bool = True
) -> dict[str, Any]:
    """Run the rows of `scenarios` through a fresh rswitch; the results as a JSON-able dict."""
    procs = Procs()
    rows = plan_rows(scenarios)
    try:
        primary_port = start_upstream(procs, tmp, "primary")
        fallback_port = start_upstream(procs, tmp, "fallback")
        config = write_config(tmp, rows, primary_port, fallback_port, prefill)
        rs_port = start_rswitch(procs, tmp, config, rswitch_cmd)
        log(
            f"upstreams: primary {HOST}:{primary_port}, fallback {HOST}:{fallback_port}; rswitch {HOST}:{rs_port}"
        )
        client = openai.OpenAI(
            base_url=f"http://{HOST}:{rs_port}/v1",
            api_key="unused",
            max_retries=0,  # the SDK must not retry what the gateway gave up on
            timeout=REQUEST_TIMEOUT + 30,
        )
        nonce = uuid.uuid4().hex[:8]
        for i, row in enumerate(rows, 1):
            seen = run_row(client, row, rs_port, nonce)
            # the upstream logs a call as it arrives, before answering: all are in by now
            row.primary_calls, p_continued = count_calls(primary_port, seen.user)
            row.fallback_calls, f_continued = count_calls(fallback_port, seen.user)
            row.prefill_calls = p_continued + f_continued
            row.outcome = classify(row, seen)
            log(
                f"[{i:2}/{len(rows)}] {row.scenario:<16} {row.mode:<6} {row.outcome:<15} {row.latency_ms:8.0f} ms"
            )
        client.close()
    finally:
        procs.stop_all()
    return report(rows, prefill)


def report(rows: list[Row], prefill: bool = True) -> dict[str, Any]:
    rescuable = [r for r in rows if r.scenario not in CONTROL | MUST_FAIL]
    must_fail = [r for r in rows if r.scenario in MUST_FAIL]
    control = [r for r in rows if r.scenario in CONTROL]
    return {
        "rows": [asdict(r) for r in rows],
        "summary": {
            "rescued": sum(r.outcome == "full answer" for r in rescuable),
            "rescuable": len(rescuable),
            "refused_correctly": sum(r.outcome == "error (correct)" for r in must_fail),
            "must_fail": len(must_fail),
            "control_ok": all(r.outcome == "full answer" for r in control),
            "control": len(control),
        },
        "limits": {
            "request_timeout_seconds": REQUEST_TIMEOUT,
            "connect_timeout_seconds": CONNECT_TIMEOUT,
            "first_byte_timeout_seconds": FIRST_BYTE_TIMEOUT,
            "idle_timeout_seconds": IDLE_TIMEOUT,
            "retry_same": 1,
            "prefill": prefill,
            "max_attempts": 3,
        },
    }


def fmt_table(result: dict[str, Any]) -> str:
    head = ("scenario", "mode", "outcome", "attempts", "calls p+f", "latency ms", "tokens", "detail")
    lines = []
    for r in result["rows"]:
        lines.append(
            (
                r["scenario"],
                r["mode"],
                r["outcome"],
                "?" if r["attempts"] is None else str(r["attempts"]),
                f"{r['primary_calls']}+{r['fallback_calls']}",
                f"{r['latency_ms']:.0f}",
                "-" if r["tokens"] is None else str(r["tokens"]),
                "; ".join(
                    x
                    for x in (
                        f"{r['words']}/{r['expected_words']} words"
                        if r["outcome"] in ("truncated", "wrong")
                        else "",
                        r["detail"],
                        f"{r['prefill_calls']} prefill call(s)" if r["prefill_calls"] else "",
                    )
                    if x
                ),
            )
        )
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for x in lines:
        out.append("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)).rstrip())
    s = result["summary"]
    out.append("")
    out.append(f"rescued {s['rescued']} of {s['rescuable']}")
    if s["must_fail"]:
        out.append(f"refusals returned at once, not rescued: {s['refused_correctly']} of {s['must_fail']}")
    if s["control"] and not s["control_ok"]:
        out.append(
            "WARNING: a control row (no fault) did not get its full answer: the numbers above are suspect"
        )
    if any(r["attempts"] is None for r in result["rows"]):
        out.append('attempts "?": the gateway said nowhere how many attempts it made for that row')
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", help=f"comma-separated, from: {', '.join(MODES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument(
        "--rswitch-cmd", help="command that runs the rswitch CLI (default: this Python's `-m rswitch`)"
    )
    ap.add_argument(
        "--no-prefill",
        action="store_true",
        help="providers say prefill: false, so a broken stream is continued by replaying the request "
        "(rswitch drops the replayed prefix) instead of continuing a trailing assistant message",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs)")
    args = ap.parse_args(argv)
    if args.scenarios:
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = [s for s in scenarios if s not in MODES]
        if unknown:
            ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    else:
        scenarios = list(QUICK if args.quick else MODES)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="rswitch-faults-"))
    cmd = shlex.split(args.rswitch_cmd) if args.rswitch_cmd else [sys.executable, "-m", "rswitch"]
    try:
        result = run(scenarios, cmd, tmp, prefill=not args.no_prefill)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(fmt_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nJSON written to {args.json}")
    return 0 if result["summary"]["control_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
