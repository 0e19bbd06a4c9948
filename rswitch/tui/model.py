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
INFLIGHT_SHOWN = 20  # of those, at most this many calls still in flight (the rest are finished ones)
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
PASSTHROUGH = "_passthrough"  # the template id of pass-through rows (rswitch.gateway.resolver.PASSTHROUGH)
NONE = "—"  # a cell that does not apply to the row (a pass-through row has no template)


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


KIND_LABEL = {"passthrough": "pass-through", "default": "default model"}
STATE_OF_KIND = {"passthrough": "pass-through", "default": "default"}  # the state of such a row when healthy
BREAKER_STATE = {"open": "circuit open", "half_open": "probing"}  # the state of a row its breaker holds back


def implicit_kind(c: dict[str, Any]) -> str | None:
    """'passthrough' or 'default' for a row the gateway made itself (a model named without a
    template, or a template's default model), None for a configured combination."""
    if not c.get("implicit"):
        return None
    return c.get("kind") or ("passthrough" if c.get("template_id") == PASSTHROUGH else "default")


def combination_row(c: dict[str, Any], optimized: str = "-") -> dict[str, str]:
    """One combination's cells by column key. Its numbers are per upstream attempt. A row the
    gateway made itself says so in its model cell, and shows no weight (none can be set)."""
    perf = c["performance"]
    enabled = c.get("enabled", True)
    kind = implicit_kind(c)
    # the state column is the last to hide, so it is where a row the gateway made says what it is
    healthy = STATE_OF_KIND.get(kind or "", "enabled")
    breaker = (c.get("breaker") or {}).get("state")
    if not enabled:
        state = "disabled"
    elif breaker == "open" and (c.get("breaker") or {}).get("retry_in") == 0:
        state = "probe due"  # its cooldown is over: the next request that may use it probes it
    elif breaker in BREAKER_STATE:  # an open breaker: requests skip it, which outranks a demotion
        state = BREAKER_STATE[breaker]
    else:
        state = "degraded" if c.get("demoted") else healthy
    n = perf.get("requests") or 0
    model_cell = c["model"] + (f" ({KIND_LABEL[kind]})" if kind in KIND_LABEL else "")
    return {
        "template": NONE if kind == "passthrough" else c["template_id"],
        "model": model_cell,
        "provider": c["provider"],
        "weight": NONE if kind else f"{c['weight']:g}",
        "effective": fmt(c.get("effective_weight"), "g"),
        "state": state,
        "req/s": fmt(perf.get("requests_per_s"), ".1f"),
        "success": fmt(perf.get("success_rate"), ".0%"),
        "p50 ms": fmt(perf.get("p50_latency_ms"), ".0f"),
        "p95 ms": fmt(perf.get("p95_latency_ms"), ".0f"),
        "$/req": fmt_cost(perf.get("cost", 0.0) / n if n else None),
        "quality": fmt(perf.get("quality"), ".2f"),  # mean feedback score in the window
        "optimized": NONE if kind == "passthrough" else optimized,
    }


def column_widths(rows: Any, columns: Any) -> dict[str, int]:
    """Each column's content width: its widest cell or its header. `rows` are cells by column key."""
    rows = list(rows)
    return {key: max([cell_len(key)] + [cell_len(r[key]) for r in rows]) for key in columns}


def fitting(columns: tuple[Column, ...], need: dict[str, int], budget: int) -> list[str]:
    """The keys of `columns` whose widths (`need`, padding included) fit in `budget`, hiding
    those with a `drop` rank in that order (1 first); the others are always kept."""
    shown = [c.key for c in columns]
    for col in sorted((c for c in columns if c.drop is not None), key=lambda c: c.drop or 0):
        if sum(need[k] for k in shown) <= budget:
            break
        shown.remove(col.key)
    return shown


def not_for(c: dict[str, Any], action: str) -> str | None:
    """Why `action` ('reweight', 'toggle', 'optimize' or 'export') does not apply to a row the
    gateway made itself, or None when it does. A template's default model can still have its
    template optimized and exported; a pass-through route has no template at all."""
    kind = implicit_kind(c)
    if kind is None:
        return None
    if kind == "passthrough":
        what = f"{c['id']} is a pass-through route (requests that name {c['model']} and no template)"
        why = {
            "reweight": "it has no weight to change; the providers of a model share its requests",
            "toggle": f"it cannot be disabled here; remove {c['model']} from provider "
            f"{c['provider']}'s models in the config",
            "optimize": "it has no template to optimize",
            "export": "it has no template to export",
            "compare": "it has no template whose rows could be compared",
        }
    else:
        what = f"{c['id']} is template '{c['template_id']}' served by its default model, not a combination"
        why = {
            "reweight": "it has no weight to change; add a combination under gateway.combinations to set one",
            "toggle": "it cannot be disabled here; add a combination under gateway.combinations to steer it",
        }
    return f"{what}: {why[action]}" if action in why else None


def visible_columns(rows: dict[str, dict[str, str]], width: int, reserve: int = 2) -> list[str]:
    """The column keys that fit in `width` terminal columns beside the row labels (the ids),
    hiding the least important first; success and p50 are always kept. `rows` maps each row's
    label to its cells; `reserve` leaves room for a vertical scrollbar."""
    pad = 2 * CELL_PADDING
    label = max((cell_len(k) for k in rows), default=0) + pad
    need = {k: w + pad for k, w in column_widths(rows.values(), COLUMN_KEYS).items()}
    return fitting(COLUMNS, need, width - label - reserve)


def matches(c: dict[str, Any], needle: str) -> bool:
    if not needle:
        return True
    hay = " ".join(str(c.get(k, "")) for k in ("id", "template_id", "model", "provider")).lower()
    hay += " " + KIND_LABEL.get(implicit_kind(c) or "", "")
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


SUMMARY_GAP = "   "  # between two items of the summary line
SUMMARY_LINES = 2  # the most lines the summary takes; past that the least important items go


def summary_items(
    url: str, status: dict[str, Any], history: History, filter_text: str = ""
) -> list[tuple[int, str]]:
    """The summary's items in display order, each with its rank (1 = most important, kept longest)."""
    t = Traffic.of(status)
    rate = history.request_rate()
    cost = sum(c["performance"]["since_start"]["cost"] for c in status.get("combinations", []))
    rec = status.get("recorder") or {}
    items = [
        (7, f"gateway {url}"),
        (10, f"strategy {status.get('strategy', '-')}"),
        (3, f"{fmt(rate, '.1f')} req/s"),
        (1, f"requests {t.requests} (failed {t.failed})"),
        (2, f"attempts {t.attempts} (errors {t.attempt_errors})"),
        (4, f"cost ${fmt_cost(cost)}"),
        (9, f"recorded {rec.get('written', 0)}"),
        (5, f"dropped {rec.get('dropped', 0)}"),
        (8, f"queue {rec.get('queue_depth', 0)}"),
    ]
    if filter_text:
        items.append((6, f"filter: {filter_text}"))
    return items


def pack(items: list[str], width: int) -> list[str]:
    """Items on lines of at most `width` cells, broken only between items (an item wider than
    `width` has a line of its own)."""
    lines: list[str] = []
    for item in items:
        if lines and cell_len(lines[-1]) + len(SUMMARY_GAP) + cell_len(item) <= width:
            lines[-1] += SUMMARY_GAP + item
        else:
            lines.append(item)
    return lines


def summary_lines(
    url: str, status: dict[str, Any], history: History, width: int, filter_text: str = ""
) -> list[str]:
    """The summary for a `width`-cell line: whole items per line, never a phrase cut in two, on
    at most SUMMARY_LINES lines — when they do not fit, the least important items are left out."""
    return fit_summary(summary_items(url, status, history, filter_text), width)


def fit_summary(items: list[tuple[int, str]], width: int) -> list[str]:
    """Ranked summary items on at most SUMMARY_LINES lines of `width` cells (see summary_lines)."""
    while True:
        lines = pack([text for _, text in items], width)
        if len(lines) <= SUMMARY_LINES or len(items) == 1:
            return lines
        least = max(rank for rank, _ in items)
        items = [(rank, text) for rank, text in items if rank != least]


def summary_text(url: str, status: dict[str, Any], history: History, filter_text: str = "") -> str:
    """The whole summary on one line."""
    return SUMMARY_GAP.join(text for _, text in summary_items(url, status, history, filter_text))


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
    """(by, name, $ total, $/min over the last minute, $/attempt) per combination (a pass-through
    route or a template's default model says so in `by`), then per provider (all of them)."""
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
        rows.append(
            (KIND_LABEL.get(implicit_kind(c) or "", "combination"), c["id"], s["cost"], s["requests"], pm)
        )
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
    key: str  # unique per attempt: request id '#' attempt; a call in flight: request id '~'
    request_id: str
    attempt: int
    cells: tuple[str, ...]
    in_flight: bool = False


# left to right; narrow panes hide `try`, then `time`; status, ms and combination always show
RECENT = (
    Column("time", 2),
    Column("status", None),
    Column("ms", None),
    Column("try", 1),
    Column("combination", None),
)
RECENT_COLUMNS = tuple(c.key for c in RECENT)
RECENT_SHORT_HEADER = {"combination": "combo"}  # the header when the column is narrower than its name
MIN_COMBINATION = 6  # an id abridged to fit is still this wide ("supp…")


@dataclass(frozen=True)
class RecentLayout:
    """The recent pane's columns: (key, header, content width) each, left to right. A cell wider
    than its column (only ever a combination id) is abridged with '…'."""

    columns: tuple[tuple[str, str, int], ...]

    def cells(self, row: RecentRow) -> tuple[str, ...]:
        by_key = dict(zip(RECENT_COLUMNS, row.cells, strict=True))
        return tuple(abridge(by_key[key], width) for key, _, width in self.columns)


def recent_layout(rows: list[RecentRow], width: int, reserve: int = 2) -> RecentLayout:
    """The columns that fit in `width` cells (`reserve` is room for a vertical scrollbar): the
    least important hidden first, then the combination ids abridged to the room left."""
    pad = 2 * CELL_PADDING
    content = column_widths((dict(zip(RECENT_COLUMNS, r.cells, strict=True)) for r in rows), RECENT_COLUMNS)
    budget = width - reserve
    shown = fitting(RECENT, {k: w + pad for k, w in content.items()}, budget)
    room = budget - sum(content[k] + pad for k in shown if k != "combination") - pad
    combination = max(MIN_COMBINATION, min(content["combination"], room))
    columns = []
    for key in shown:
        w = combination if key == "combination" else content[key]
        header = key if cell_len(key) <= w else RECENT_SHORT_HEADER.get(key, key)
        columns.append((key, header, max(w, cell_len(header))))
    return RecentLayout(tuple(columns))


def clock_time(ts: float) -> str:
    """HH:MM:SS.mmm, local time."""
    return f"{time.strftime('%H:%M:%S', time.localtime(ts))}.{int(ts * 1000) % 1000:03d}"


# an in-flight row's status cell: its stage in at most 6 characters (the header's width), so the
# columns that show at 80, 100 and 160 columns are the same as for finished calls
STAGE_CELL = {"routing": "route…", "waiting": "wait…", "backing off": "pause…", "calling": "call…"}


def count_cell(n: int) -> str:
    """A count in at most three characters: 42, 999, 1k … 99k."""
    return str(n) if n < 1000 else f"{min(n // 1000, 99)}k"


def tokens_cell(n: int) -> str:
    """A stream's tokens so far in at most 6 characters: '42 tok', '512tok', '3k tok'."""
    count = count_cell(n)
    return f"{count} tok" if len(count) < 3 else f"{count}tok"


def inflight_rows(inflight: dict[str, Any] | None, shown: int = INFLIGHT_SHOWN) -> list[RecentRow]:
    """The calls still in flight, longest running first: when each started, its stage ('route…',
    'wait…', 'pause…', 'call…'; a stream: its tokens so far, '42 tok'), the ms it has taken so
    far, its attempt and the combination it is trying ('—' before the first attempt)."""
    out: list[RecentRow] = []
    for c in ((inflight or {}).get("calls") or [])[:shown]:
        stage = c.get("stage") or "?"
        status = tokens_cell(c.get("tokens") or 0) if stage == "streaming" else STAGE_CELL.get(stage, stage)
        attempt = int(c.get("attempt") or 0)
        cells = (
            clock_time(c["started_at"]),
            status,
            f"{c['elapsed_ms']:.0f}",
            str(attempt) if attempt else "-",
            c.get("combination_id") or NONE,
        )
        out.append(RecentRow(f"{c['request_id']}~", c["request_id"], attempt, cells, in_flight=True))
    return out


def recent_title(width: int, in_flight: int) -> str:
    """The recent pane's border title for a pane `width` cells wide (its border and a corner
    take 5): how many calls are in flight when any are, then what the pane lists, as much as fits."""
    room = width - 5
    head = f"{in_flight} in flight" if in_flight else ""
    tails = ("recent attempts (i: inspect)", "attempts (i: inspect)", "(i: inspect)")
    for title in [f"{head} · {t}" for t in tails] + [f"{head} (i: inspect)"] if head else tails:
        if cell_len(title) <= room:
            return title
    return head or "attempts"


def recent_rows(
    recent: list[dict[str, Any]], shown: int = RECENT_SHOWN, inflight: dict[str, Any] | None = None
) -> list[RecentRow]:
    """The calls still in flight first (`inflight_rows`, at most INFLIGHT_SHOWN), then the finished
    ones newest first, one row per upstream attempt (a fallback shows the failed try and the one
    that served). Keys are unique even if a snapshot repeats an attempt."""
    out: list[RecentRow] = inflight_rows(inflight, min(shown, INFLIGHT_SHOWN))
    seen: set[str] = set()
    for r in sorted(recent, key=lambda r: r["created_at"], reverse=True):
        if len(out) >= shown:
            break
        attempt = int(r.get("attempt") or 1)
        key = base = f"{r['request_id']}#{attempt}"
        n = 1
        while key in seen:
            n += 1
            key = f"{base}.{n}"
        seen.add(key)
        out.append(
            RecentRow(
                key,
                r["request_id"],
                attempt,
                (
                    clock_time(r["created_at"]),
                    str(r["status"]) if r["success"] else f"{r['status']} ✗",
                    f"{r['duration_ms']:.0f}",
                    str(attempt),
                    r["combination_id"],
                ),
            )
        )
    return out


def inflight_head(c: dict[str, Any]) -> list[str]:
    """The inspector's head for a call still in flight: what it is doing and what is known so far."""
    head = [
        f"request     {c['request_id']}",
        f"stage       {c.get('text') or c.get('stage')}",
        f"started     {clock_time(c['started_at'])}, {c['elapsed_ms']:.0f} ms ago (when opened)",
    ]
    if c.get("combination_id"):
        head.append(
            f"trying      {c['combination_id']}  ({c.get('provider')}/{c.get('model')}, "
            f"template {c.get('template_id')}), attempt {c.get('attempt')}"
        )
    if c.get("wait_until"):
        head.append(f"waiting     until {clock_time(c['wait_until'])}")
    if c.get("tokens") is not None:
        head.append(f"tokens      {c['tokens']} streamed so far (content pieces, about one token each)")
    head.append(
        f"route       {c.get('route') or ('not routed yet' if c.get('stage') == 'routing' else 'balancer (no routing chain)')}"
    )
    return head


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
    if running and opt.get("strategy") == "reflective":  # MIPROv2, the default, goes unsaid
        head += " (reflective)"
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
