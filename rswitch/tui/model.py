"""What each pane of the console shows, computed from the core's snapshots. No Textual here:
the app hands these functions a snapshot (and the width it has) and draws what they return,
so every decision — which columns fit, how a cost reads, what a chart's axes are — is
testable without a terminal.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rich.cells import cell_len

HISTORY = 240  # samples kept for the plots (two minutes at two refreshes a second)
RECENT_SHOWN = 30  # rows in the recent-requests pane
EVENTS_KEPT = 300  # events kept for the events pane


# -- the combinations table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str
    drop: int | None  # narrow screens hide columns in this order (1 first); None: never hidden


# left to right as shown; each combination's row label (its id) comes first and is always shown
COLUMNS = (
    Column("template", 1),
    Column("model", 7),
    Column("provider", 3),
    Column("weight", 9),
    Column("effective", 2),
    Column("state", 11),
    Column("req/s", 10),
    Column("success", None),
    Column("p50 ms", None),
    Column("p95 ms", 6),
    Column("$/req", 8),
    Column("quality", 5),
    Column("optimized", 4),
)
COLUMN_KEYS = tuple(c.key for c in COLUMNS)
CELL_PADDING = 1  # Textual's DataTable pads each cell by one column on either side


def fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def fmt_cost(value: float | None, digits: int = 2) -> str:
    """A dollar amount with `digits` significant digits however small: 0.000042, never 0.000."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) < 1e-9:
        return f"{value:.{digits - 1}e}"
    decimals = max(2, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def combination_row(c: dict[str, Any], optimized: str = "-") -> dict[str, str]:
    """One combination's cells by column key. Its numbers are per upstream attempt."""
    perf = c["performance"]
    state = "disabled" if not c["enabled"] else ("degraded" if c.get("demoted") else "enabled")
    n = perf["requests"] or 0
    return {
        "template": c["template_id"],
        "model": c["model"],
        "provider": c["provider"],
        "weight": f"{c['weight']:g}",
        "effective": f"{c['effective_weight']:g}",
        "state": state,
        "req/s": fmt(perf["requests_per_s"], ".1f"),
        "success": fmt(perf["success_rate"], ".0%"),
        "p50 ms": fmt(perf["p50_latency_ms"], ".0f"),
        "p95 ms": fmt(perf["p95_latency_ms"], ".0f"),
        "$/req": fmt_cost(perf["cost"] / n if n else None),
        "quality": fmt(perf.get("quality"), ".2f"),  # mean feedback score in the window
        "optimized": optimized,
    }


def visible_columns(rows: dict[str, dict[str, str]], width: int, reserve: int = 2) -> list[str]:
    """The column keys that fit in `width` terminal columns beside the row labels (the ids),
    hiding the least important first; success and p50 are always kept. `rows` maps each row's
    label to its cells; `reserve` leaves room for a vertical scrollbar."""
    pad = 2 * CELL_PADDING
    label = max((cell_len(k) for k in rows), default=0) + pad
    need = {
        c.key: max([cell_len(c.key)] + [cell_len(r[c.key]) for r in rows.values()]) + pad for c in COLUMNS
    }
    shown = list(COLUMN_KEYS)
    budget = width - label - reserve
    for col in sorted((c for c in COLUMNS if c.drop is not None), key=lambda c: c.drop or 0):
        if sum(need[k] for k in shown) <= budget:
            break
        shown.remove(col.key)
    return shown


def matches(c: dict[str, Any], needle: str) -> bool:
    if not needle:
        return True
    hay = " ".join(str(c.get(k, "")) for k in ("id", "template_id", "model", "provider")).lower()
    return all(part in hay for part in needle.lower().split())


def abridge(text: Any, width: int = 60) -> str:
    s = " ".join(str("" if text is None else text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def last_optimized(status: dict[str, Any]) -> dict[str, str]:
    """template id -> what its newest finished optimizer run did: 'v3' (promoted) or 'kept'."""
    out: dict[str, str] = {}
    for run in (status.get("optimizer") or {}).get("runs") or []:
        if run.get("new_version"):
            out[run["template_id"]] = f"v{run['new_version']}"
        elif "error" not in run:
            out.setdefault(run["template_id"], "kept")
    return out


# -- client requests and upstream attempts ------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Since start: client requests (and those answered with an error), upstream attempts (and
    the failed ones). A fallback or a retry is one request and two or more attempts."""

    requests: int = 0
    failed: int = 0
    attempts: int = 0
    attempt_errors: int = 0

    @classmethod
    def of(cls, status: dict[str, Any]) -> Traffic:
        t = status.get("traffic") or {}  # absent from an older core: zeros
        return cls(
            int(t.get("requests") or 0),
            int(t.get("failed") or 0),
            int(t.get("attempts") or 0),
            int(t.get("attempt_errors") or 0),
        )


@dataclass
class History:
    """Series the charts draw, from the deltas between snapshots (each (time, value…))."""

    maxlen: int = HISTORY
    traffic: deque[tuple[float, Traffic]] = field(default_factory=deque)
    # (t, requests/s, failed/s, attempts/s) — client requests, and the upstream attempts they took
    rates: deque[tuple[float, float, float, float]] = field(default_factory=deque)
    costs: deque[tuple[float, float]] = field(default_factory=deque)  # (t, cumulative $)
    combo_costs: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)
    latency: dict[str, deque[tuple[float, float | None, float | None, float | None]]] = field(
        default_factory=dict
    )  # per combination: (t, p50, p95, p99) of its live window

    def __post_init__(self) -> None:
        for name in ("traffic", "rates", "costs", "combo_costs"):
            setattr(self, name, deque(getattr(self, name), maxlen=self.maxlen))

    def record(self, now: float, status: dict[str, Any]) -> None:
        combos = status.get("combinations", [])
        traffic = Traffic.of(status)
        if self.traffic:
            t0, before = self.traffic[-1]
            dt = max(now - t0, 1e-6)

            def rate(a: int, b: int) -> float:
                return max(a - b, 0) / dt  # a restarted counter is no negative rate

            self.rates.append(
                (
                    now,
                    rate(traffic.requests, before.requests),
                    rate(traffic.failed, before.failed),
                    rate(traffic.attempts, before.attempts),
                )
            )
        self.traffic.append((now, traffic))
        per_combo = {c["id"]: c["performance"]["since_start"]["cost"] for c in combos}
        self.costs.append((now, sum(per_combo.values())))
        self.combo_costs.append((now, per_combo))
        for c in combos:
            p = c["performance"]
            series = self.latency.setdefault(c["id"], deque(maxlen=self.maxlen))
            series.append((now, p["p50_latency_ms"], p["p95_latency_ms"], p.get("p99_latency_ms")))
        for gone in set(self.latency) - set(per_combo):
            del self.latency[gone]

    def request_rate(self) -> float | None:
        return self.rates[-1][1] if self.rates else None

    def cost_per_minute(self) -> list[tuple[float, float]]:
        c = list(self.costs)
        return [
            (t1, (c1 - c0) / max(t1 - t0, 1e-9) * 60) for (t0, c0), (t1, c1) in zip(c, c[1:], strict=False)
        ]


def summary_text(url: str, status: dict[str, Any], history: History, filter_text: str = "") -> str:
    t = Traffic.of(status)
    rate = history.request_rate()
    cost = sum(c["performance"]["since_start"]["cost"] for c in status.get("combinations", []))
    rec = status["recorder"]
    return (
        f"gateway {url}   strategy {status['strategy']}   {fmt(rate, '.1f')} req/s   "
        f"requests {t.requests} (failed {t.failed})   attempts {t.attempts} (errors {t.attempt_errors})   "
        f"cost ${fmt_cost(cost)}   recorded {rec['written']}  dropped {rec['dropped']}  "
        f"queue {rec['queue_depth']}" + (f"   filter: {filter_text}" if filter_text else "")
    )


# -- charts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """What a line chart draws: each series as (x, y) with x in seconds relative to now (≤ 0),
    and axes that never go below zero or read '-0'."""

    lines: list[tuple[str, list[float], list[float]]]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    xticks: list[float]
    xlabels: list[str]


def chart(series: list[tuple[str, list[tuple[float, Any]]]], now: float, span: float = 60.0) -> Chart:
    """`series` is [(name, [(time, value or None)])]. The x axis covers the last `span` seconds
    or the oldest sample, whichever is longer; an idle chart shows an empty 0..1 range."""
    lines = []
    oldest = now
    top = 0.0
    for name, points in series:
        pts = [(min(t - now, 0.0) + 0.0, float(v)) for t, v in points if v is not None]
        if pts:
            lines.append((name, [x for x, _ in pts], [y for _, y in pts]))
            oldest = min(oldest, now + pts[0][0])
            top = max(top, max(y for _, y in pts))
    width = max(span, math.ceil(now - oldest))
    ticks = [-width * i / 4 for i in range(4, -1, -1)]
    labels = [f"{round(-x):d}" for x in ticks]
    return Chart(lines, (-width, 0.0), (0.0, top * 1.15 if top > 0 else 1.0), ticks, labels)


def latency_series(history: History, cid: str | None) -> list[tuple[str, list[tuple[float, Any]]]]:
    rows = list(history.latency.get(cid, ())) if cid else []
    return [
        ("p50", [(r[0], r[1]) for r in rows]),
        ("p95", [(r[0], r[2]) for r in rows]),
        ("p99", [(r[0], r[3]) for r in rows]),
    ]


def throughput_series(history: History) -> list[tuple[str, list[tuple[float, Any]]]]:
    return [
        ("requests/s", [(r[0], r[1]) for r in history.rates]),
        ("failed/s", [(r[0], r[2]) for r in history.rates]),
        ("attempts/s", [(r[0], r[3]) for r in history.rates]),
    ]


# -- the cost pane ------------------------------------------------------------------------------


def cost_rows(status: dict[str, Any], history: History) -> list[tuple[str, str, str, str, str]]:
    """(by, name, $ total, $/min over the last minute, $/attempt) per combination, then per provider."""
    now_t, now_c = history.combo_costs[-1] if history.combo_costs else (0.0, {})
    then_t, then_c = next(((t, c) for t, c in history.combo_costs if now_t - t <= 60), (now_t, now_c))
    span = now_t - then_t

    def per_min(cid: str) -> float | None:
        return (now_c.get(cid, 0.0) - then_c.get(cid, 0.0)) * 60 / span if span > 0 else None

    rows: list[tuple[str, str, float, int, float | None]] = []
    providers: dict[str, tuple[float, int, float | None]] = {}
    for c in status.get("combinations", []):
        s = c["performance"]["since_start"]
        pm = per_min(c["id"])
        rows.append(("combination", c["id"], s["cost"], s["requests"], pm))
        cost, n, ppm = providers.get(c["provider"], (0.0, 0, None))
        both = None if pm is None and ppm is None else (pm or 0.0) + (ppm or 0.0)
        providers[c["provider"]] = (cost + s["cost"], n + s["requests"], both)
    rows += [("provider", name, cost, n, pm) for name, (cost, n, pm) in sorted(providers.items())]
    return [
        (by, name, fmt_cost(cost), fmt_cost(pm), fmt_cost(cost / n) if n else "-")
        for by, name, cost, n, pm in rows
    ]


# -- recent requests and events -----------------------------------------------------------------


@dataclass(frozen=True)
class RecentRow:
    key: str  # unique per attempt: request id '#' attempt
    request_id: str
    attempt: int
    cells: tuple[str, ...]


RECENT_COLUMNS = ("time", "status", "ms", "try", "combination")


def recent_rows(recent: list[dict[str, Any]], shown: int = RECENT_SHOWN) -> list[RecentRow]:
    """Newest first, one row per upstream attempt (a fallback shows the failed try and the one that
    served). Keys are unique even if a snapshot repeats an attempt."""
    out: list[RecentRow] = []
    seen: set[str] = set()
    for r in sorted(recent, key=lambda r: r["created_at"], reverse=True):
        attempt = int(r.get("attempt") or 1)
        key = base = f"{r['request_id']}#{attempt}"
        n = 1
        while key in seen:
            n += 1
            key = f"{base}.{n}"
        seen.add(key)
        stamp = time.strftime("%H:%M:%S", time.localtime(r["created_at"]))
        out.append(
            RecentRow(
                key,
                r["request_id"],
                attempt,
                (
                    f"{stamp}.{int(r['created_at'] * 1000) % 1000:03d}",
                    str(r["status"]) if r["success"] else f"{r['status']} ✗",
                    f"{r['duration_ms']:.0f}",
                    str(attempt),
                    r["combination_id"],
                ),
            )
        )
        if len(out) >= shown:
            break
    return out


def event_lines(events: list[tuple[int, float, str, str]]) -> list[tuple[str, str, str]]:
    """(time, kind, text) newest first; the pane wraps the text rather than cut it."""
    return [
        (time.strftime("%H:%M:%S", time.localtime(ts)), kind, text)
        for _, ts, kind, text in sorted(events, key=lambda e: e[0], reverse=True)
    ]


# -- the optimizer pane -------------------------------------------------------------------------

TRIAL_COLUMNS = ("trial", "instruction", "demos", "minibatch", "full val", "best so far")
OPTIMIZER_LEGEND = (
    "minibatch: the trial's prompt on a sample of validation rows · full val: the leading prompt on all "
    "of them · best so far: the highest full-validation score yet (at first the current prompt's)"
)


def instruction_label(t: dict[str, Any]) -> str:
    """Which instruction a trial tried: its number and text. Instruction 0 is the current prompt."""
    i = t.get("instruction")
    text = t.get("instruction_text")
    if isinstance(i, str):  # an older optimizer reported the text itself
        return i
    if not text:
        text = "(the current instruction)" if i == 0 else ""
    return f"#{i} {text}".strip()


def trial_row(t: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(t["trial"]),
        abridge(instruction_label(t), 24),
        str(t["demo_set"]),
        fmt(t["minibatch_score"], ".3f"),
        fmt(t["full_score"], ".3f"),
        fmt(t["best_score"], ".3f"),
    )


def optimizer_lines(opt: dict[str, Any]) -> list[str]:
    if not opt.get("enabled"):
        return ["optimizer: off"]
    running = opt.get("running")
    head = f"optimizer: running {running!r}" if running else "optimizer: idle"
    if running:
        stage = opt.get("stage") or "starting"
        calls, cost = opt.get("calls"), opt.get("cost")
        so_far = f"{calls} model calls" + (f", ${fmt_cost(cost)}" if cost else "") if calls else ""
        head += f" — {stage}" + (f" ({so_far} so far)" if so_far else "")
    head += (f"   queued: {', '.join(opt['queued'])}" if opt.get("queued") else "") + (
        "   (periodic)" if opt.get("periodic") else "   (on demand: o)"
    )
    lines = [head]
    runs = opt.get("runs") or []
    if runs:
        last = runs[-1]
        verdict = last.get("error") or last.get("verdict")
        lines.append(
            f"last: {last['template_id']}: {abridge(verdict, 100)}"
            + (f"  calls {last['calls']}  ${fmt_cost(last['cost'])}" if "calls" in last else "")
        )
    lines.append(OPTIMIZER_LEGEND)
    return lines
