"""`GET /metrics`: the live state in Prometheus' text format, for operators to scrape.

Nothing is counted twice or on the request path: a custom collector reads the same in-memory
metrics `/status` shows, when scraped (on the gateway's loop, which owns them). Client
requests and the upstream attempts made for them are separate families.

With `serve --workers N` every process's families travel as plain data (`snapshot`) with the
worker's half-second poll of the owner, and a worker's `/metrics` is `merge` of its own live
families and the others' latest: the whole server, whichever worker answers the scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from rswitch.core import Core

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class CoreCollector:
    def __init__(self, core: Core, *, own: bool = False) -> None:
        self.core = core
        self.own = own  # a worker's recorder counts only its side (the owner's counts come once)

    def collect(self) -> Iterator[Metric]:
        core = self.core
        traffic = core.metrics.traffic()
        requests = CounterMetricFamily(
            "rswitch_requests",
            "Client chat requests by outcome (succeeded, failed, rejected: the client's 4xx, cancelled)",
            labels=["outcome"],
        )
        for outcome in ("succeeded", "failed", "rejected", "cancelled"):
            requests.add_metric([outcome], traffic[outcome])
        yield requests

        labels = ["combination", "template", "provider", "model"]
        attempts = CounterMetricFamily(
            "rswitch_attempts", "Upstream attempts by combination and outcome", labels=[*labels, "outcome"]
        )
        cost = CounterMetricFamily("rswitch_cost_usd", "Cost of upstream attempts, USD", labels=labels)
        tokens = CounterMetricFamily("rswitch_tokens", "Tokens of upstream attempts", labels=labels)
        latency = GaugeMetricFamily(
            "rswitch_attempt_latency_ms",
            "Attempt latency over the live window (gateway.window_seconds), by quantile",
            labels=[*labels, "quantile"],
        )
        weight = GaugeMetricFamily(
            "rswitch_effective_weight", "Configured weight with demotions folded in", labels=labels
        )
        demoted = GaugeMetricFamily(
            "rswitch_demoted", "1 when the combination is below gateway.fallback_threshold", labels=labels
        )
        circuit = GaugeMetricFamily(
            "rswitch_circuit_open",
            "1 when the combination's circuit breaker is open or half-open (requests skip it but one probe)",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "rswitch_attempt_errors",
            "Failed attempts by combination and error type (every recorded failure: upstream, client, internal)",
            labels=[*labels, "error_type"],
        )
        durations = HistogramMetricFamily(
            "rswitch_attempt_duration_seconds", "Latency of each observed attempt, since start", labels=labels
        )
        ttfts = HistogramMetricFamily(
            "rswitch_time_to_first_token_seconds", "Time to first token of streamed attempts", labels=labels
        )
        eff = core.gateway.effective_weights(fresh=True)
        known = {**core.gateway.resolver.implicit, **core.gateway.combinations}
        errors_by: dict[str, dict[str, int]] = {}
        for (cid, error_type), n in core.metrics.attempt_errors.items():
            errors_by.setdefault(cid, {})[error_type] = n
        for cid in sorted({*core.metrics.combination_ids(), *errors_by}):
            c = known.get(cid)
            if c is None:
                continue  # one since removed: still counted in requests
            values = [cid, c.template_id, c.provider, c.model]
            totals = core.metrics.totals(cid)
            failed = errors_by.get(cid, {})
            attempts.add_metric([*values, "ok"], totals["requests"] - totals["errors"])
            attempts.add_metric([*values, "error"], sum(failed.values()))
            for error_type, n in sorted(failed.items()):
                errors.add_metric([*values, error_type], n)
            cost.add_metric(values, totals["cost"])
            tokens.add_metric(values, totals["tokens"])
            w = core.metrics.window_stats(cid)
            for q, v in (("0.5", w.p50_ms), ("0.95", w.p95_ms), ("0.99", w.p99_ms)):
                if v is not None:
                    latency.add_metric([*values, q], v)
            for family, (buckets, total_ms) in zip(
                (durations, ttfts), core.metrics.histograms(cid).values(), strict=True
            ):
                family.add_metric(values, _seconds(buckets), total_ms / 1000)
        for cid, c in core.gateway.combinations.items():
            values = [cid, c.template_id, c.provider, c.model]
            weight.add_metric(values, eff.get(cid, 0.0))
            demoted.add_metric(values, 1.0 if c.enabled and core.balancer.demoted(c) else 0.0)
            circuit.add_metric(values, 0.0 if core.gateway.breakers.state(cid)["state"] == "closed" else 1.0)
        yield from (attempts, errors, cost, tokens, latency, durations, ttfts, weight, demoted, circuit)

        counters = core.metrics.counters
        for name, doc in (
            ("fallbacks", "Requests answered after a failed attempt (by a fallback or a retry)"),
            ("retries", "Attempts beyond each request's first"),
            (
                "rate_limit_waits",
                "Requests that waited for a rate limit, backoff or an upstream's Retry-After",
            ),
        ):
            yield CounterMetricFamily(f"rswitch_{name}", doc, counters[name])
        yield CounterMetricFamily(
            "rswitch_rate_limit_wait_seconds",
            "Seconds requests spent waiting",
            counters["rate_limit_wait_seconds"],
        )
        runs = CounterMetricFamily("rswitch_optimizer_runs", "Optimizer runs by outcome", labels=["outcome"])
        run_counts = (core.optimizer.status().get("run_counts") if core.optimizer is not None else None) or {}
        for outcome in ("promoted", "kept", "failed"):
            runs.add_metric([outcome], run_counts.get(outcome, 0))
        yield runs
        queue = GaugeMetricFamily(
            "rswitch_local_queue_depth", "Calls waiting for an embedded local model", labels=["provider"]
        )
        for name, provider in core.providers.items():
            depth = provider.describe().get("queue_depth") if provider.type == "local" else None
            if depth is not None:
                queue.add_metric([name], depth)
        yield queue
        state = core.shared_state
        yield GaugeMetricFamily(
            "rswitch_state_degraded",
            "1 while the shared state backend (Redis) is unreachable and limits are per process",
            1.0 if state is not None and state.degraded else 0.0,
        )
        malformed = CounterMetricFamily(
            "rswitch_upstream_malformed_events",
            "Upstream stream events skipped because they could not be read",
            labels=["provider"],
        )
        for name, provider in core.providers.items():
            malformed.add_metric([name], provider.malformed_events)
        yield malformed

        own_stats = getattr(core.recorder, "own_stats", None) if self.own else None
        rec = own_stats() if own_stats is not None else core.recorder.stats()
        yield GaugeMetricFamily(
            "rswitch_recorder_queue_depth", "Records waiting for the writer", rec["queue_depth"]
        )
        yield CounterMetricFamily("rswitch_recorder_written", "Records written", rec["written"])
        yield CounterMetricFamily(
            "rswitch_recorder_dropped", "Records dropped because the queue was full", rec["dropped"]
        )
        yield CounterMetricFamily(
            "rswitch_recorder_write_errors", "Failed writer batches", rec["write_errors"]
        )
        yield CounterMetricFamily(
            "rswitch_recorder_rejected",
            "Records refused alone because they cannot be stored (the rest of their batch kept)",
            rec.get("rejected_records", 0),
        )
        yield CounterMetricFamily(
            "rswitch_recorder_lost",
            "Records not written because their store was failing",
            rec.get("records_lost", 0),
        )
        failing = GaugeMetricFamily(
            "rswitch_store_failing", "1 while a store's (or dataset's) latest write failed", labels=["store"]
        )
        for store in rec.get("failing") or {}:
            failing.add_metric([store], 1.0)
        yield failing


def _seconds(buckets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(b if b == "+Inf" else repr(float(b) / 1000), n) for b, n in buckets]


# -- serve --workers N: one /metrics for the whole server ------------------------------------------

# one series per worker (label `worker`): a window's quantiles and what each process's balancer and
# breakers decide do not add up; the owner's are left out (it answers no client)
PER_WORKER = frozenset(
    {
        "rswitch_attempt_latency_ms",
        "rswitch_effective_weight",
        "rswitch_demoted",
        "rswitch_circuit_open",
        "rswitch_state_degraded",
    }
)
# the highest: every worker reads the owner's optimizer counts; a store failing in any process
HIGHEST = frozenset({"rswitch_optimizer_runs", "rswitch_store_failing"})
NOTES = {
    "per_worker": " (serve --workers N: one series per worker, label worker)",
    "highest": " (serve --workers N: the highest of the processes)",
    "sum": " (serve --workers N: summed over the workers and the owner)",
}

Families = list[list[Any]]  # [[name, help, type, [[sample, labels, value], ...]], ...]


def snapshot(core: Core) -> Families:
    """This process's families as plain data, for another process to merge; call on the loop."""
    return [
        [m.name, m.documentation, m.type, [[s.name, s.labels, s.value] for s in m.samples]]
        for m in CoreCollector(core, own=True).collect()
    ]


MERGED = "*"  # the label of families merged already: their per-worker series are kept as they are


def merge(processes: Iterable[tuple[str | None, Families]]) -> Families:
    """The families of several processes as one: counters, histograms and the queue depths summed,
    the PER_WORKER gauges one series per worker (processes labelled None, the owner and the
    retired workers' counters, have none; those labelled MERGED carry theirs), the HIGHEST the
    highest. HELP says which."""
    out: dict[str, list[Any]] = {}
    samples: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
    for worker, families in processes:
        for name, doc, kind, rows in families:
            per_worker = name in PER_WORKER
            if per_worker and worker is None:
                continue
            label = per_worker and worker != MERGED
            if name not in out:
                how = "per_worker" if per_worker else "highest" if name in HIGHEST else "sum"
                note = NOTES[how]
                out[name] = [name, doc if doc.endswith(note) else doc + note, kind, []]
                samples[name] = {}
            acc = samples[name]
            for sample, labels, value in rows:
                if label:
                    labels = {**labels, "worker": worker}
                key = (sample, *sorted(labels.items()))
                have = acc.get(key)
                if have is None:
                    acc[key] = [sample, labels, value]
                elif name in HIGHEST:
                    have[2] = max(have[2], value)
                else:
                    have[2] += value
    for name, family in out.items():
        family[3] = list(samples[name].values())
    return list(out.values())


def counters_only(families: Families) -> Families:
    """What of a stopped process's families still counts: its counters and histograms."""
    return [f for f in families if f[2] in ("counter", "histogram")]


def requests_by_outcome(families: Families) -> dict[str, float]:
    """rswitch_requests of (merged) families: outcome -> requests."""
    for name, _, _, rows in families:
        if name == "rswitch_requests":
            return {labels["outcome"]: value for _, labels, value in rows}
    return {}


class _Fixed:
    def __init__(self, families: Families) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for name, doc, kind, rows in self.families:
            metric = Metric(name, doc, kind)
            for sample, labels, value in rows:
                metric.add_sample(sample, labels, value)
            yield metric


def render(core: Core) -> bytes:
    """The exposition text; call on the gateway's loop. A core with `metric_peers` (a worker of
    `serve --workers N`) adds the other processes' families as last polled."""
    registry = CollectorRegistry(auto_describe=False)
    peers = getattr(core, "metric_peers", None)
    if peers is None:
        registry.register(CoreCollector(core))
    else:
        registry.register(_Fixed(merge([(getattr(core, "metric_label", None), snapshot(core)), *peers()])))
    return generate_latest(registry)
