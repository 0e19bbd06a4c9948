"""The Textual app: live panes over snapshots of the core, keys that steer it.

Threads never touch widgets: a worker thread asks the gateway's loop for a snapshot (all
in memory, no database query), posts it as a message, and the UI thread draws from it.
Every key has a stable binding id (remappable under `tui.keys`), is in the footer, the help
screen (F1 / ?) and the command palette (ctrl+p).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    Static,
    TabbedContent,
    TabPane,
)
from textual_plotext import PlotextPlot

from rswitch.tui.themes import BUNDLED, DEFAULT_THEME, load_themes, user_dir

COLUMNS = (
    "template",
    "model",
    "provider",
    "weight",
    "effective",
    "state",
    "req/s",
    "success",
    "p50 ms",
    "p95 ms",
    "$/req",
    "quality",
    "optimized",
)
HISTORY = 240  # samples kept for the plots (two minutes at two refreshes a second)
RECENT_SHOWN = 30  # rows in the recent-requests pane


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def combination_row(c: dict[str, Any], optimized: str = "-") -> tuple[str, ...]:
    perf = c["performance"]
    state = "disabled" if not c["enabled"] else ("degraded" if c.get("demoted") else "enabled")
    n = perf["requests"] or 0
    return (
        c["template_id"],
        c["model"],
        c["provider"],
        f"{c['weight']:g}",
        f"{c['effective_weight']:g}",
        state,
        _fmt(perf["requests_per_s"], ".1f"),
        _fmt(perf["success_rate"], ".0%"),
        _fmt(perf["p50_latency_ms"], ".0f"),
        _fmt(perf["p95_latency_ms"], ".0f"),
        _fmt(perf["cost"] / n if n else None, ".5f"),
        _fmt(perf.get("quality"), ".2f"),  # mean feedback score in the window
        optimized,
    )


def matches(c: dict[str, Any], needle: str) -> bool:
    if not needle:
        return True
    hay = " ".join(str(c.get(k, "")) for k in ("id", "template_id", "model", "provider")).lower()
    return all(part in hay for part in needle.lower().split())


def abridge(text: Any, width: int = 60) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= width else s[: width - 1] + "…"


class Snapshot(Message):
    """A frozen console snapshot from the gateway's loop, delivered to the UI thread."""

    def __init__(self, status: dict[str, Any], taken: float) -> None:
        super().__init__()
        self.status = status
        self.taken = taken


@dataclass
class Controls:
    """What the app may ask of the core; each runs on the gateway's loop (see GatewayThread.call)."""

    gateway: Any  # GatewayThread, or a test double with .call and .core

    def reweight(self, cid: str, weight: float) -> None:
        self.gateway.call(self.gateway.core.reweight, cid, max(0.0, weight))

    def toggle(self, cid: str, enabled: bool) -> None:
        self.gateway.call(self.gateway.core.set_enabled, cid, enabled)

    def reset_weights(self) -> None:
        def reset() -> None:
            configured = {c.id: c for c in self.gateway.core.config.gateway.combinations}
            for cid, cfg in configured.items():
                combo = self.gateway.core.gateway.combinations.get(cid)
                if combo is not None:
                    combo.weight, combo.enabled = cfg.weight, cfg.enabled
            self.gateway.core.gateway.reindex()

        self.gateway.call(reset)

    def optimize(self, template_id: str) -> str:
        optimizer = self.gateway.core.optimizer
        if optimizer is None:
            return "the optimizer is not running"
        self.gateway.call(optimizer.request, template_id)
        return f"optimization of '{template_id}' queued"

    def cancel_optimize(self) -> str:
        optimizer = self.gateway.core.optimizer
        if optimizer is None or not optimizer.cancel():
            return "no optimization is running"
        return f"cancelling the optimization of '{optimizer.running}'"

    def event(self, kind: str, text: str) -> None:
        self.gateway.core.event(kind, text)

    def call_detail(self, request_id: str) -> dict[str, Any] | None:
        return self.gateway.call(self.gateway.core.recent_call, request_id)


# -- modal screens ------------------------------------------------------------------------------


class HelpScreen(ModalScreen[None]):
    """Every key: its binding id (for tui.keys), the keys it is bound to now, what it does."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,f1,question_mark", "dismiss", "Close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__(id="help")
        self.rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog keys"):
            yield Label("Keys  (remap under tui.keys in the config, by id)", classes="title")
            table: DataTable[str] = DataTable(id="help-keys", cursor_type="none", show_cursor=False)
            table.add_columns("id", "keys", "action")
            for row in self.rows:
                table.add_row(*row)
            yield table
            yield Label("ctrl+p: command palette   escape: close", classes="hint")


class InspectorScreen(ModalScreen[None]):
    """One recent call in full: prompt, messages, output, tokens, cost, latency, and the route."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,i", "dismiss", "Close")]

    def __init__(self, call: dict[str, Any]) -> None:
        super().__init__(id="inspector")
        self.call = call

    def compose(self) -> ComposeResult:
        c = self.call
        tokens = f"{c['prompt_tokens']} in / {c['completion_tokens']} out" + (
            " (estimated)" if c["tokens_estimated"] else ""
        )
        head = [
            f"request     {c['request_id']}",
            f"served by   {c['combination_id']}  ({c['provider']}/{c['model']}, template {c['template_id']})",
            f"outcome     {'ok' if c['success'] else 'failed'} {c['status']}, attempt {c['attempt']}"
            + (f", streamed (ttft {c['ttft_ms']:.0f} ms)" if c["stream"] and c["ttft_ms"] else ""),
            f"latency     {c['duration_ms']:.1f} ms",
            f"tokens      {tokens}",
            f"cost        ${c['cost']:.6f}",
            f"route       {c['route'] or 'balancer (no routing chain)'}",
        ]
        if c.get("error"):
            head.append(f"error       {c['error']}")
        with Vertical(classes="dialog wide"):
            yield Label(f"Request {c['request_id'][:12]}", classes="title")
            with VerticalScroll():
                yield Static("\n".join(head), markup=False, id="inspector-head")
                yield Label("rendered prompt (system)", classes="section")
                yield Static(c["system_prompt"] or "(none)", markup=False, id="inspector-prompt")
                yield Label("messages", classes="section")
                lines = [f"{m.get('role', '?')}: {m.get('content')}" for m in c["messages"]]
                yield Static("\n".join(lines) or "(none)", markup=False, id="inspector-messages")
                yield Label("output", classes="section")
                yield Static(c["output"] or "(empty)", markup=False, id="inspector-output")
            yield Label("escape: close", classes="hint")


class ExportScreen(ModalScreen[Path | None]):
    """Export a template as a package: the folder, progress by stage, then the result."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, template_id: str, folder: Path, export: Any) -> None:
        super().__init__(id="export")
        self.template_id = template_id
        self.folder = folder
        self.export_fn = export  # (template_id, folder, progress) -> Path, run on a worker thread
        self.result: Path | None = None
        self.busy = False

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Export '{self.template_id}' as a package", classes="title")
            yield Label("into folder")
            yield Input(str(self.folder), id="export-folder")
            yield ProgressBar(total=4, show_eta=False, id="export-progress")
            yield Static("enter or Export to start", id="export-status", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Export", id="export-go", variant="primary")
                yield Button("Close", id="export-close")

    @on(Input.Submitted, "#export-folder")
    @on(Button.Pressed, "#export-go")
    def start(self) -> None:
        if self.busy or self.result is not None:
            return
        folder = self.query_one("#export-folder", Input).value.strip()
        if not folder:
            self.query_one("#export-status", Static).update("give a folder")
            return
        self.busy = True
        self.query_one("#export-go", Button).disabled = True
        self.run_export(Path(folder).expanduser())

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def run_export(self, folder: Path) -> None:
        stages = {"dataset": 1, "logs": 2, "analytics": 3, "checksums": 4}

        def progress(stage: str, done: int, total: int) -> None:
            step = stages.get(stage, 0) - 1 + (done / total if total else 0)
            self.app.call_from_thread(self._progress, stage, step)

        try:
            path = self.export_fn(self.template_id, folder, progress)
        except Exception as exc:
            self.app.call_from_thread(self._done, None, f"{type(exc).__name__}: {exc}")
            return
        self.app.call_from_thread(self._done, path, None)

    def _progress(self, stage: str, step: float) -> None:
        self.query_one("#export-progress", ProgressBar).update(progress=step)
        self.query_one("#export-status", Static).update(f"{stage} …")

    def _done(self, path: Path | None, error: str | None) -> None:
        self.busy = False
        if path is not None:
            self.result = path
            self.query_one("#export-progress", ProgressBar).update(progress=4)
            self.query_one("#export-status", Static).update(f"done: {path}")
        else:
            self.query_one("#export-go", Button).disabled = False
            self.query_one("#export-status", Static).update(f"failed: {error}")

    @on(Button.Pressed, "#export-close")
    def action_close(self) -> None:
        if not self.busy:
            self.dismiss(self.result)


# -- the app ------------------------------------------------------------------------------------


class RSwitchApp(App[None]):
    TITLE = "rswitch"
    CSS = """
    #summary { height: 1; padding: 0 1; }
    #main { height: 1fr; }
    #left { width: 2fr; }
    #filter { display: none; height: 3; }
    #filter.shown { display: block; }
    #combinations { height: 1fr; min-height: 5; }
    #panes { height: 1fr; min-height: 14; }
    #side { width: 1fr; min-width: 40; max-width: 64; }
    #events, #recent { height: 1fr; border: round $primary; }
    PlotextPlot { height: 1fr; }
    #cost-table { width: 56; }
    #optimizer-status { height: 3; }
    #trials { height: 1fr; }
    #best-curve { width: 34; }
    .dialog { width: 80; height: auto; max-height: 90%; padding: 1 2; border: thick $primary;
              background: $surface; }
    .dialog.wide { width: 90%; height: 90%; }
    .dialog.keys { width: 120; max-width: 95%; }
    .title { text-style: bold; margin-bottom: 1; }
    .section { text-style: bold; margin-top: 1; }
    .hint { color: $text-muted; margin-top: 1; }
    .buttons { height: 3; margin-top: 1; }
    HelpScreen, InspectorScreen, ExportScreen { align: center middle; }
    #help-keys { height: auto; max-height: 30; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("plus,equals_sign", "reweight(1)", "Weight +", id="reweight_up"),
        Binding("minus", "reweight(-1)", "Weight −", id="reweight_down"),
        Binding("e", "toggle", "Enable/disable", id="toggle"),
        Binding("r", "reset", "Reset weights", id="reset_weights"),
        Binding("o", "optimize", "Optimize", id="optimize"),
        Binding("c", "cancel_optimize", "Cancel optimize", id="cancel_optimize"),
        Binding("x", "export", "Export", id="export"),
        Binding("i", "inspect", "Inspect", id="inspect"),
        Binding("slash", "filter", "Filter", id="filter"),
        Binding("t", "next_theme", "Theme", id="theme"),
        Binding("f1,question_mark", "help", "Help", id="help"),
        Binding("q", "quit", "Quit", id="quit"),
        Binding("1", "tab('throughput')", "Throughput", id="tab_throughput", show=False),
        Binding("2", "tab('latency')", "Latency", id="tab_latency", show=False),
        Binding("3", "tab('cost')", "Cost", id="tab_cost", show=False),
        Binding("4", "tab('optimizer')", "Optimizer", id="tab_optimizer", show=False),
    ]
    DESCRIPTIONS: ClassVar[dict[str, str]] = {
        "reweight_up": "raise the selected combination's weight by 1 (routing follows at once)",
        "reweight_down": "lower it by 1",
        "toggle": "enable or disable the selected combination",
        "reset_weights": "every weight and state back to the config's",
        "optimize": "optimize the selected combination's template (progress in the Optimizer tab)",
        "cancel_optimize": "cancel the running optimization",
        "export": "export the selected template as a package",
        "inspect": "open the selected recent request (or the newest)",
        "filter": "filter the combinations table (escape clears)",
        "theme": "switch to the next theme",
        "help": "this screen",
        "quit": "quit: drains the recorder and stops the workers",
        "tab_throughput": "show the Throughput pane",
        "tab_latency": "show the Latency pane",
        "tab_cost": "show the Cost pane",
        "tab_optimizer": "show the Optimizer pane",
    }

    def __init__(
        self,
        gateway: Any,
        *,
        url: str = "",
        refresh: float = 1.0,
        export_dir: Path | None = None,
        theme: str | None = None,
        theme_dirs: tuple[Path, ...] | None = None,
        keys: dict[str, str] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__()
        themes, self.theme_errors = load_themes(
            *(theme_dirs if theme_dirs is not None else (BUNDLED, user_dir()))
        )
        for t in themes.values():
            self.register_theme(t)
        self.theme_names = sorted(themes) or [DEFAULT_THEME]
        wanted = theme or DEFAULT_THEME
        if theme and theme not in self.available_themes:
            self.theme_errors.append(f"unknown theme '{theme}'; available: {', '.join(sorted(themes))}")
        self.wanted_theme = wanted if wanted in self.available_themes else DEFAULT_THEME
        self.keys = dict(keys or {})  # binding id -> keys, from tui.keys
        if self.keys:
            self.set_keymap(self.keys)
        self.gateway = gateway
        self.controls = Controls(gateway)
        self.url = url
        self.refresh_seconds = refresh
        self.export_dir = export_dir or Path.cwd() / "packages"
        self.clock = clock
        self.status: dict[str, Any] = {}
        self.event_seq = 0
        self.filter_text = ""
        # per refresh: (time, requests, errors, cost, {provider: cost}) totals since start
        self.history: deque[tuple[float, int, int, float]] = deque(maxlen=HISTORY)
        self.rates: deque[tuple[float, float, float]] = deque(maxlen=HISTORY)  # (t, req/s, errors/s)
        self.latency: deque[tuple[float, float | None, float | None, float | None]] = deque(maxlen=HISTORY)
        self.costs: deque[tuple[float, float]] = deque(maxlen=HISTORY)  # (t, cumulative $)
        # (t, {combination: cumulative $}) over the last minute or so, for the per-minute column
        self.combo_costs: deque[tuple[float, dict[str, float]]] = deque(maxlen=HISTORY)
        self.latency_of: str | None = None  # the combination the latency pane follows
        self._trials_run: str | None = None  # the optimizer run whose trials the table shows

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"gateway {self.url}", id="summary", markup=False)
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Input(
                    placeholder="filter: words in id, template, model, provider", id="filter", disabled=True
                )
                yield DataTable(id="combinations", cursor_type="row", zebra_stripes=True)
                with TabbedContent(id="panes", initial="throughput"):
                    with TabPane("Throughput", id="throughput"):
                        yield PlotextPlot(id="throughput-plot")
                    with TabPane("Latency", id="latency"):
                        yield PlotextPlot(id="latency-plot")
                    with TabPane("Cost", id="cost"), Horizontal():
                        yield PlotextPlot(id="cost-plot")
                        yield DataTable(id="cost-table", cursor_type="none", show_cursor=False)
                    with TabPane("Optimizer", id="optimizer"):
                        yield Static("optimizer: idle", id="optimizer-status", markup=False)
                        with Horizontal():
                            yield DataTable(id="trials", cursor_type="row")
                            yield PlotextPlot(id="best-curve")
            with Vertical(id="side"):
                yield DataTable(id="events", cursor_type="row", show_cursor=False)
                yield DataTable(id="recent", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#combinations", DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        events = self.query_one("#events", DataTable)
        events.border_title = "events (newest first)"
        for col, key in (("#", "seq"), ("time", "time"), ("kind", "kind"), ("what", "text")):
            events.add_column(col, key=key)
        recent = self.query_one("#recent", DataTable)
        recent.border_title = "recent requests (i: inspect)"
        for col, key in (("time", "time"), ("combination", "combo"), ("status", "status"), ("ms", "ms")):
            recent.add_column(col, key=key)
        trials = self.query_one("#trials", DataTable)
        for col in ("trial", "instruction", "demos", "minibatch", "full", "best", "calls", "$"):
            trials.add_column(col, key=col)
        cost_table = self.query_one("#cost-table", DataTable)
        for col in ("by", "name", "$ total", "$/min", "$/req"):
            cost_table.add_column(col, key=col)
        for plot_id, title in (
            ("throughput-plot", "requests/s and errors/s"),
            ("latency-plot", "latency, ms (live window)"),
            ("cost-plot", "cumulative cost, $"),
            ("best-curve", "best score so far"),
        ):
            self.query_one(f"#{plot_id}", PlotextPlot).plt.title(title)
        if self.wanted_theme in self.available_themes:
            self.theme = self.wanted_theme
        if self.theme_errors:  # reported once, together; the bad files were skipped
            self.notify("\n".join(self.theme_errors), title="theme problems", severity="warning", timeout=10)
        table.focus()
        self.fetch()
        self.set_interval(self.refresh_seconds, self.fetch)

    # -- data: a worker fetches, the UI thread renders ------------------------------------------

    @work(thread=True, exclusive=True, group="fetch", exit_on_error=False)
    def fetch(self) -> None:
        self.post_message(Snapshot(self.gateway.snapshot(self.event_seq), self.clock()))

    @on(Snapshot)
    def render_snapshot(self, message: Snapshot) -> None:
        try:
            self.draw(message)
        except NoMatches:  # a snapshot that arrives while the app shuts down: nothing to draw on
            return

    def draw(self, message: Snapshot) -> None:
        status = self.status = message.status
        combos = status["combinations"]
        self.render_table(combos)
        self.record_history(message.taken, combos)
        self.render_events(status.get("events", []))
        self.render_recent(status.get("recent", []))
        self.render_active_pane()
        total_rate = sum(c["performance"]["requests_per_s"] or 0 for c in combos)
        served = sum(c["performance"]["since_start"]["requests"] for c in combos)
        cost = sum(c["performance"]["since_start"]["cost"] for c in combos)
        rec = status["recorder"]
        self.query_one("#summary", Static).update(
            f"gateway {self.url}   strategy {status['strategy']}   {total_rate:.1f} req/s   "
            f"requests {served}   cost ${cost:.4f}   recorded {rec['written']}  dropped {rec['dropped']}  "
            f"queue {rec['queue_depth']}" + (f"   filter: {self.filter_text}" if self.filter_text else "")
        )

    def render_table(self, combos: list[dict[str, Any]]) -> None:
        table = self.query_one("#combinations", DataTable)
        optimized = self.last_optimized()
        shown = set()
        with self.batch_update():
            for c in combos:
                if not matches(c, self.filter_text):
                    continue
                shown.add(c["id"])
                row = combination_row(c, optimized.get(c["template_id"], "-"))
                if c["id"] in table.rows:  # update in place: cursor and scroll survive
                    for col, value in zip(COLUMNS, row, strict=True):
                        if table.get_cell(c["id"], col) != value:
                            table.update_cell(c["id"], col, value)
                else:
                    table.add_row(*row, key=c["id"], label=c["id"])
            for key in [k for k in table.rows if k.value not in shown]:
                table.remove_row(key)

    def last_optimized(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for run in (self.status.get("optimizer") or {}).get("runs") or []:
            if run.get("new_version"):
                out[run["template_id"]] = f"v{run['new_version']}"
            elif "error" not in run:
                out.setdefault(run["template_id"], "kept")
        return out

    def record_history(self, now: float, combos: list[dict[str, Any]]) -> None:
        requests = sum(c["performance"]["since_start"]["requests"] for c in combos)
        errors = sum(c["performance"]["since_start"]["errors"] for c in combos)
        cost = sum(c["performance"]["since_start"]["cost"] for c in combos)
        if self.history:
            t0, r0, e0, _ = self.history[-1]
            dt = max(now - t0, 1e-6)
            self.rates.append((now, (requests - r0) / dt, (errors - e0) / dt))
        self.history.append((now, requests, errors, cost))
        self.costs.append((now, cost))
        self.combo_costs.append((now, {c["id"]: c["performance"]["since_start"]["cost"] for c in combos}))
        sel = self.selected() or max(combos, key=lambda c: c["performance"]["requests"] or 0, default=None)
        if sel is not None:
            p = sel["performance"]
            self.latency.append((now, p["p50_latency_ms"], p["p95_latency_ms"], p.get("p99_latency_ms")))
            self.latency_of = sel["id"]

    def render_events(self, events: list[Any]) -> None:
        table = self.query_one("#events", DataTable)
        new = [e for e in events if e[0] > self.event_seq]
        if not new:
            return
        for seq, ts, kind, text in new:
            table.add_row(str(seq), time.strftime("%H:%M:%S", time.localtime(ts)), kind, text, key=str(seq))
            self.event_seq = max(self.event_seq, seq)
        while table.row_count > 300:
            table.remove_row(min(table.rows, key=lambda k: int(k.value or 0)))
        table.sort("seq", key=lambda v: int(v), reverse=True)

    def render_recent(self, recent: list[dict[str, Any]]) -> None:
        """Newest first. Under load every refresh brings a new set: redrawn whole, not row by row."""
        table = self.query_one("#recent", DataTable)
        newest = sorted(recent, key=lambda r: r["created_at"], reverse=True)[:RECENT_SHOWN]
        ids = [r["request_id"] for r in newest]
        if ids == [k.value for k in table.rows]:
            return
        cursor = table.cursor_row
        selected = (
            table.coordinate_to_cell_key((cursor, 0)).row_key.value if 0 <= cursor < table.row_count else None
        )
        table.clear()
        for r in newest:
            stamp = time.strftime("%H:%M:%S", time.localtime(r["created_at"]))
            table.add_row(
                f"{stamp}.{int(r['created_at'] * 1000) % 1000:03d}",
                r["combination_id"],
                str(r["status"]) if r["success"] else f"{r['status']} ✗",
                f"{r['duration_ms']:.0f}",
                key=r["request_id"],
            )
        if selected in ids:  # the cursor stays on the request it was on, wherever it moved
            table.move_cursor(row=ids.index(selected))
        elif 0 <= cursor < table.row_count:
            table.move_cursor(row=cursor)

    def render_active_pane(self) -> None:
        active = self.query_one("#panes", TabbedContent).active
        if active == "throughput":
            self.draw_lines(
                "throughput-plot",
                [
                    ("requests/s", [(t, r) for t, r, _ in self.rates]),
                    ("errors/s", [(t, e) for t, _, e in self.rates]),
                ],
            )
        elif active == "latency":
            series = [
                ("p50", [(row[0], row[1]) for row in self.latency]),
                ("p95", [(row[0], row[2]) for row in self.latency]),
                ("p99", [(row[0], row[3]) for row in self.latency]),
            ]
            which = self.latency_of
            self.draw_lines(
                "latency-plot", series, title=f"latency of {which}, ms (live window)" if which else None
            )
        elif active == "cost":
            per_minute = [
                (t1, (c1 - c0) / max(t1 - t0, 1e-9) * 60)
                for (t0, c0), (t1, c1) in zip(list(self.costs), list(self.costs)[1:], strict=False)
            ]
            self.draw_lines("cost-plot", [("$ total", list(self.costs)), ("$ per minute", per_minute)])
            self.render_cost_table()
        elif active == "optimizer":
            self.render_optimizer()

    def draw_lines(
        self, plot_id: str, series: list[tuple[str, list[tuple[float, Any]]]], title: str | None = None
    ) -> None:
        plot = self.query_one(f"#{plot_id}", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        if title:
            plt.title(title)
        now = self.clock()
        for name, points in series:
            pts = [(t - now, v) for t, v in points if v is not None]
            if pts:
                plt.plot([x for x, _ in pts], [y for _, y in pts], label=name)
        plt.xlabel("seconds ago")
        plot.refresh()

    def render_cost_table(self) -> None:
        table = self.query_one("#cost-table", DataTable)
        # the last minute: the oldest sample at most 60 s back, scaled to a minute
        now_t, now_c = self.combo_costs[-1] if self.combo_costs else (0.0, {})
        then_t, then_c = next(((t, c) for t, c in self.combo_costs if now_t - t <= 60), (now_t, now_c))
        span = now_t - then_t

        def per_min(cid: str) -> float | None:
            return (now_c.get(cid, 0.0) - then_c.get(cid, 0.0)) * 60 / span if span > 0 else None

        rows: list[tuple[str, str, float, int, float | None]] = []
        providers: dict[str, tuple[float, int, float | None]] = {}
        for c in self.status.get("combinations", []):
            s = c["performance"]["since_start"]
            pm = per_min(c["id"])
            rows.append(("combination", c["id"], s["cost"], s["requests"], pm))
            cost, n, ppm = providers.get(c["provider"], (0.0, 0, None))
            both = None if pm is None and ppm is None else (pm or 0.0) + (ppm or 0.0)
            providers[c["provider"]] = (cost + s["cost"], n + s["requests"], both)
        rows += [("provider", name, cost, n, pm) for name, (cost, n, pm) in sorted(providers.items())]
        table.clear()
        for by, name, cost, n, pm in rows:
            table.add_row(by, name, f"{cost:.5f}", _fmt(pm, ".5f"), f"{cost / n:.6f}" if n else "-")

    def render_optimizer(self) -> None:
        opt = self.status.get("optimizer") or {}
        status = self.query_one("#optimizer-status", Static)
        if not opt.get("enabled"):
            status.update("optimizer: off")
            return
        running = opt.get("running")
        runs = opt.get("runs") or []
        last = runs[-1] if runs else None
        lines = [
            f"optimizer: {'running ' + repr(running) if running else 'idle'}"
            + (f"   queued: {', '.join(opt['queued'])}" if opt.get("queued") else "")
            + ("   (periodic)" if opt.get("periodic") else "   (on demand: o)"),
        ]
        if last:
            verdict = last.get("error") or last.get("verdict")
            lines.append(
                f"last: {last['template_id']}: {abridge(verdict, 100)}"
                + (f"  calls {last['calls']}  ${last['cost']:.4f}" if "calls" in last else "")
            )
        status.update("\n".join(lines))
        trials = opt.get("trials") or []
        table = self.query_one("#trials", DataTable)
        run = trials[0].get("run_id") if trials else None
        if run != self._trials_run:  # another run: its trial numbers start at 0 again
            table.clear()
            self._trials_run = run
        for t in trials:
            key = str(t["trial"])
            row = (
                key,
                abridge(t["instruction"], 34),
                str(t["demo_set"]),
                _fmt(t["minibatch_score"], ".3f"),
                _fmt(t["full_score"], ".3f"),
                _fmt(t["best_score"], ".3f"),
                _fmt(t["calls"]),
                _fmt(t["cost"], ".4f"),
            )
            if key in table.rows:
                continue
            table.add_row(*row, key=key)
        plot = self.query_one("#best-curve", PlotextPlot)
        plot.plt.clear_data()
        best = [(t["trial"], t["best_score"]) for t in trials if t.get("best_score") is not None]
        if best:
            plot.plt.plot([x for x, _ in best], [y for _, y in best], label="best")
            plot.plt.xlabel("trial")
        plot.refresh()

    @on(TabbedContent.TabActivated)
    def tab_changed(self) -> None:
        if self.status:
            self.render_active_pane()

    # -- selection -------------------------------------------------------------------------------

    def selected(self) -> dict[str, Any] | None:
        table = self.query_one("#combinations", DataTable)
        if not table.rows or table.cursor_row < 0:
            return None
        key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        return next((c for c in self.status.get("combinations", []) if c["id"] == key), None)

    def event(self, text: str, kind: str = "console") -> None:
        """An operator action, into the core's events (shown with the rest on the next refresh)."""
        self.controls.event(kind, text)
        self.fetch()

    # -- actions ---------------------------------------------------------------------------------

    def action_reweight(self, delta: int) -> None:
        c = self.selected()
        if c is not None:
            self.controls.reweight(c["id"], c["weight"] + delta)
            self.event(f"reweighted {c['id']}: {c['weight']:g} → {max(0, c['weight'] + delta):g}")

    def action_toggle(self) -> None:
        c = self.selected()
        if c is not None:
            self.controls.toggle(c["id"], not c["enabled"])
            self.event(f"{'disabled' if c['enabled'] else 'enabled'} {c['id']}")

    def action_reset(self) -> None:
        self.controls.reset_weights()
        self.event("weights and states reset to the configured values")

    def action_optimize(self) -> None:
        c = self.selected()
        if c is not None:
            self.event(self.controls.optimize(c["template_id"]), "optimizer")
            self.query_one("#panes", TabbedContent).active = "optimizer"

    def action_cancel_optimize(self) -> None:
        self.event(self.controls.cancel_optimize(), "optimizer")

    def action_export(self) -> None:
        c = self.selected()
        if c is None:
            return

        def export(template_id: str, folder: Path, progress: Any) -> Path:
            return self.gateway.core.export_package(template_id, folder, progress=progress)

        self.push_screen(ExportScreen(c["template_id"], self.export_dir, export))

    def action_inspect(self) -> None:
        recent = self.query_one("#recent", DataTable)
        if not recent.rows:
            self.notify("no requests yet", timeout=3)
            return
        row = recent.cursor_row if recent.cursor_row >= 0 else 0
        request_id = recent.coordinate_to_cell_key((row, 0)).row_key.value
        self.open_inspector(request_id)

    @on(DataTable.RowSelected, "#recent")
    def recent_chosen(self, event: DataTable.RowSelected) -> None:
        self.open_inspector(event.row_key.value)

    def open_inspector(self, request_id: str | None) -> None:
        call = self.controls.call_detail(request_id) if request_id else None
        if call is None:
            self.notify("that request is no longer in memory", timeout=3)
            return
        self.push_screen(InspectorScreen(call))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.disabled = False
        box.add_class("shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        if self.status:  # rebuilt in the gateway's order, so clearing the filter restores it
            self.query_one("#combinations", DataTable).clear()
            self.render_table(self.status["combinations"])

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        self.query_one("#combinations", DataTable).focus()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_class("shown"):
            box.value = ""
            box.remove_class("shown")
            box.disabled = True
            self.query_one("#combinations", DataTable).focus()
            event.stop()

    def action_next_theme(self) -> None:
        names = [n for n in self.theme_names if n in self.available_themes] or sorted(self.available_themes)
        i = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(i + 1) % len(names)]
        self.notify(f"theme: {self.theme}", timeout=2)

    def action_tab(self, pane: str) -> None:
        self.query_one("#panes", TabbedContent).active = pane

    def key_rows(self) -> list[tuple[str, str, str]]:
        """(binding id, the keys bound now, what it does), keymap applied."""
        rows = []
        for b in self.BINDINGS:
            assert isinstance(b, Binding) and b.id
            keys = self.keys.get(b.id, b.key)
            rows.append((b.id, keys, self.DESCRIPTIONS.get(b.id, b.description)))
        return rows

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.key_rows()))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        actions = {
            "reweight_up": lambda: self.action_reweight(1),
            "reweight_down": lambda: self.action_reweight(-1),
            "toggle": self.action_toggle,
            "reset_weights": self.action_reset,
            "optimize": self.action_optimize,
            "cancel_optimize": self.action_cancel_optimize,
            "export": self.action_export,
            "inspect": self.action_inspect,
            "filter": self.action_filter,
            "theme": self.action_next_theme,
            "help": self.action_help,
        }
        for key_id, keys, what in self.key_rows():
            if key_id in actions:
                title = next(
                    b.description for b in self.BINDINGS if isinstance(b, Binding) and b.id == key_id
                )
                yield SystemCommand(f"{title} [{keys}]", what, actions[key_id])
