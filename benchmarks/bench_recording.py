#!/usr/bin/env python3
"""CPU that recording costs per 10,000 calls, outside the gateway's event loops.

With `serve --workers N` the parent process writes every call (SQLite datasets + DuckDB
analytics) and takes the workers' frames off a Unix socket; each worker encodes its records
into those frames. On a machine whose cores the workers need, that CPU is what limits the
speed-up. This measures it in CPU seconds (`time.process_time`, every thread of this process),
not wall clock, so other work on the machine does not change the numbers much:

- `stores`: DatasetStore.write + AnalyticsStore.write on batches of `--batch` records, as the
  recorder's writer thread calls them (real SQLite and DuckDB files in a temp dir);
- `recorder`: the same through a Recorder (submit each record, then flush): queue + thread too;
- `paced`: the same with the records submitted one at a time, 0.2 ms apart, as requests end
  (a fifth of `--records`, scaled): what the writer thread costs by waking, not only by writing;
- `encode`: a worker's relay turning a batch into a frame (what RelayClient._send does);
- `decode`: the owner turning a frame back into records (what RelayServer does);
- `relay`: a RelayClient handing the records to a RelayServer over a real Unix socket (both
  sides, the owner's submit a no-op): encode + socket + decode + the threads.

Records are built the way the gateway builds them (rswitch.gateway.outcomes.Outcomes.record):
the benchmark's template, a short user message, its variables, a short answer with usage, the
caller's key name, and one in ten a fallback with its attempts chain.

Usage: python benchmarks/bench_recording.py [--records 10000] [--rounds 5] [--batch 500] [--json F]
Each figure is the minimum over the rounds, in CPU milliseconds per 10,000 records. The garbage
collector is settled first, as `rswitch serve` settles it once started (`--no-settle-gc`: not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from rswitch.gc_tuning import settle  # noqa: E402
from rswitch.storage import relay  # noqa: E402
from rswitch.storage.analytics import AnalyticsStore  # noqa: E402
from rswitch.storage.datasets import DatasetStore  # noqa: E402
from rswitch.storage.record import CallRecord  # noqa: E402
from rswitch.storage.writer import Recorder  # noqa: E402

TEMPLATE = "You are a concise assistant for {product}. Answer in a {tone} tone."
VARIABLES = {"product": "rswitch", "tone": "friendly"}


def make_records(n: int, template_id: str = "bench-tpl") -> list[CallRecord]:
    now = time.time()
    out = []
    for i in range(n):
        chain = None
        if i % 10 == 9:  # a fallback: the first attempt failed, this one answered
            chain = [
                {"combination": "bench-b", "provider": "openai", "model": "bench-model", "status": 503,
                 "error_type": "upstream_unavailable", "ms": 12.5, "tokens": 0},
                {"combination": "bench", "provider": "openai", "model": "bench-model", "status": 200,
                 "error_type": None, "ms": 3.1, "tokens": 33},
            ]  # fmt: skip
        extra: dict = {"client": "app-1"}
        if chain:
            extra["attempts"] = chain
        out.append(
            CallRecord(
                request_id=uuid.uuid4().hex,
                created_at=now + i * 1e-4,
                template_id=template_id,
                combination_id="bench",
                provider="openai",
                model="bench-model",
                system_prompt=TEMPLATE.format(**VARIABLES),
                messages=[{"role": "user", "content": f"hello {i}"}],
                variables=dict(VARIABLES),
                output="Hello! How can I help you today?",
                success=True,
                status=200,
                prompt_tokens=24,
                completion_tokens=9,
                cost=0.0000123,
                duration_ms=3.25 + (i % 7) * 0.1,
                attempt=2 if chain else 1,
                extra=extra,
            )
        )
    return out


def batches(records: list, size: int) -> list[list]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def cpu(fn: Callable[[], None]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def run_stores(records: list[CallRecord], size: int, root: Path) -> float:
    datasets = DatasetStore(root / "data", max_records=10_000_000)
    analytics = AnalyticsStore(root / "analytics.duckdb")
    datasets.write(records[:1])  # open the files outside the measure
    analytics.write(records[:1])
    parts = batches(records, size)

    def go() -> None:
        for b in parts:
            datasets.write(b)
            analytics.write(b)

    try:
        return cpu(go)
    finally:
        datasets.close()
        analytics.close()


def run_recorder(records: list[CallRecord], size: int, root: Path) -> float:
    datasets = DatasetStore(root / "data", max_records=10_000_000)
    analytics = AnalyticsStore(root / "analytics.duckdb")
    datasets.write(records[:1])
    analytics.write(records[:1])
    rec = Recorder(datasets, analytics, batch_size=size, queue_size=len(records) + 1)
    rec.start()

    def go() -> None:
        for r in records:
            rec.submit(r)
        assert rec.flush(600), "the recorder did not drain"

    try:
        return cpu(go)
    finally:
        rec.close()
        datasets.close()
        analytics.close()


def run_paced(records: list[CallRecord], size: int, root: Path, gap: float = 0.0002) -> float:
    """The recorder fed one record at a time, `gap` seconds apart, as requests end: what the
    writer thread costs by waking (not only by writing). The CPU of the pacing loop alone is
    taken off."""

    def pace() -> float:
        return cpu(lambda: [time.sleep(gap) for _ in records])

    datasets = DatasetStore(root / "data", max_records=10_000_000)
    analytics = AnalyticsStore(root / "analytics.duckdb")
    datasets.write(records[:1])
    analytics.write(records[:1])
    rec = Recorder(datasets, analytics, batch_size=size, queue_size=len(records) + 1)
    rec.start()

    def go() -> None:
        for r in records:
            time.sleep(gap)
            rec.submit(r)
        assert rec.flush(600), "the recorder did not drain"

    try:
        alone = min(pace() for _ in range(2))
        return cpu(go) - alone
    finally:
        rec.close()
        datasets.close()
        analytics.close()


def frames(records: list[CallRecord], size: int) -> list[bytes]:
    return [
        orjson.dumps({"records": [relay.encode(r) for r in b], "covers": None})
        for b in batches(records, size)
    ]


def run_encode(records: list[CallRecord], size: int) -> float:
    parts = batches(records, size)

    def go() -> None:
        for b in parts:
            orjson.dumps({"records": [relay.encode(r) for r in b], "covers": None})

    return cpu(go)


def run_decode(records: list[CallRecord], size: int) -> float:
    data = frames(records, size)

    def go() -> None:
        for body in data:
            [relay.decode(item) for item in orjson.loads(body)["records"]]

    return cpu(go)


def run_relay(records: list[CallRecord], size: int, root: Path) -> float:
    path = str(root / "relay.sock")
    taken: list = []
    server = relay.RelayServer(path, taken.append, lambda method, args: True)
    server.start()
    client = relay.RelayClient(path, batch_size=size, queue_size=len(records) + 1, flush_interval=0.05)
    client.start()

    def go() -> None:
        for r in records:
            client.submit(r)
        assert client.flush(600), "the relay did not drain"

    try:
        return cpu(go)
    finally:
        client.close()
        server.close()
        assert len(taken) == len(records), (len(taken), len(records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--batch", type=int, default=500, help="records per write / frame (the recorder's batch_size)"
    )
    ap.add_argument("--only", default="stores,recorder,paced,encode,decode,relay")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--no-settle-gc",
        action="store_true",
        help="leave the garbage collector as Python sets it (serve settles it once started)",
    )
    args = ap.parse_args()
    if not args.no_settle_gc:
        settle()
    wanted = args.only.split(",")
    scale = 10_000 / args.records * 1000  # CPU ms per 10k records
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        records = make_records(args.records)
        for name in wanted:
            with tempfile.TemporaryDirectory(prefix="rswitch-benchrec-") as tmp:
                root = Path(tmp)
                if name == "stores":
                    t = run_stores(records, args.batch, root)
                elif name == "recorder":
                    t = run_recorder(records, args.batch, root)
                elif name == "encode":
                    t = run_encode(records, args.batch)
                elif name == "decode":
                    t = run_decode(records, args.batch)
                elif name == "paced":
                    t = run_paced(records[: args.records // 5], args.batch, root) * 5
                elif name == "relay":
                    t = run_relay(records, args.batch, root)
                else:
                    raise SystemExit(
                        f"unknown part {name!r}; choose from stores,recorder,paced,encode,decode,relay"
                    )
            best[name] = min(best.get(name, float("inf")), t * scale)
    frame = frames(make_records(args.batch), args.batch)[0]
    print(f"{args.records} records, batches of {args.batch}, min of {args.rounds} rounds; pid {os.getpid()}")
    print(f"frame of {args.batch} records: {len(frame):,} bytes ({len(frame) / args.batch:.0f} per record)")
    print(f"{'part':<10} {'CPU ms / 10k':>13} {'µs / record':>12}")
    for name, ms in best.items():
        print(f"{name:<10} {ms:>13.1f} {ms * 100 / 1000:>12.1f}")
    if args.json:
        args.json.write_text(
            json.dumps({"records": args.records, "batch": args.batch, "cpu_ms_per_10k": best})
        )


if __name__ == "__main__":
    main()
