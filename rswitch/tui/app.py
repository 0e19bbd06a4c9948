"""The Textual app: live panes over snapshots of the core, keys that steer it.

Threads never touch widgets: a worker thread asks the gateway's loop for a snapshot (all
in memory, no database query), posts it as a message, and the UI thread draws from it.
What each pane shows is computed in `rswitch.tui.model`; the panes are in `panes`, the modal
screens in `screens`, and every key (id, keys, action, description) in `keys`.

A pane that fails to draw is logged with its traceback and reported in one notice; the other
panes and the console keep running. An error that does end the console is logged too, and
`rswitch tui` then exits with a non-zero status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from rswitch.tui import model
from rswitch.tui.controls import Controls
from rswitch.tui.keys import KEYS, key_rows
from rswitch.tui.panes import (
    Chart,
    CombinationsTable,
    CostPane,
    EventsPane,
    OptimizerPane,
    RecentTable,
    Summary,
)
from rswitch.tui.screens import ExportScreen, HelpScreen, InspectorScreen
from rswitch.tui.themes import BUNDLED, DEFAULT_THEME, load_themes, user_dir

log = logging.getLogger("rswitch.tui")


class Snapshot(Message):
    """A frozen console snapshot from the gateway's loop, delivered to the UI thread."""

    def __init__(self, status: dict[str, Any], taken: float) -> None:
        super().__init__()
        self.status = status
        self.taken = taken


class RSwitchApp(App[None]):
    TITLE = "rswitch"
    CSS = """
    #summary { height: auto; padding: 0 1; }
    #main { height: 1fr; }
    #left { width: 2fr; }
    #filter { display: none; height: 3; }
    #filter.shown { display: block; }
    #combinations { height: 1fr; min-height: 5; }
    #panes { height: 1fr; min-height: 14; }
    #side { width: 1fr; min-width: 30; max-width: 64; }
    #events, #recent { height: 1fr; border: round $primary; }
    PlotextPlot { height: 1fr; }
    #cost-plot { width: 1fr; min-width: 24; }
    #cost-table { width: auto; max-width: 75%; }
    #optimizer-status { height: auto; max-height: 5; }
    #trials { height: 1fr; }
    #best-curve { width: 30; }
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
        Binding(k.keys, k.action, k.title, id=k.id, show=k.footer, tooltip=k.description) for k in KEYS
    ]

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
        self.filter_text = ""
        self.history = model.History()
        self.event_seq = 0  # the newest event shown; a snapshot brings only newer ones
        self.failing: set[str] = set()  # what failed last time (reported once, until it works again)

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Summary(f"gateway {self.url}", id="summary")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Input(
                    placeholder="filter: words in id, template, model, provider", id="filter", disabled=True
                )
                yield CombinationsTable(id="combinations")
                with TabbedContent(id="panes", initial="throughput"):
                    with TabPane("Throughput", id="throughput"):
                        yield Chart(
                            "client requests/s, failed/s and upstream attempts/s", id="throughput-plot"
                        )
                    with TabPane("Latency", id="latency"):
                        yield Chart("latency, ms (live window)", id="latency-plot")
                    with TabPane("Cost", id="cost"):
                        yield CostPane()
                    with TabPane("Optimizer", id="optimizer"):
                        yield OptimizerPane()
            with Vertical(id="side"):
                yield EventsPane(id="events")
                yield RecentTable(id="recent")
        yield Footer()

    def on_mount(self) -> None:
        if self.wanted_theme in self.available_themes:
            self.theme = self.wanted_theme
        if self.theme_errors:  # reported once, together; the bad files were skipped
            self.notify("\n".join(self.theme_errors), title="theme problems", severity="warning", timeout=10)
        self.query_one(CombinationsTable).focus()
        self.fetch()
        self.set_interval(self.refresh_seconds, self.fetch)

    # -- data: a worker fetches, the UI thread renders ------------------------------------------

    @work(thread=True, exclusive=True, group="fetch", exit_on_error=False)
    def fetch(self) -> None:
        self.post_message(Snapshot(self.gateway.snapshot(self.event_seq), self.clock()))

    @on(Worker.StateChanged)
    def worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.group == "fetch":
            self.failed("get a snapshot from the gateway", event.worker.error)

    @on(Snapshot)
    def render_snapshot(self, message: Snapshot) -> None:
        try:
            self.draw(message)
        except NoMatches:  # a snapshot that arrives while the app shuts down: nothing to draw on
            return

    def draw(self, message: Snapshot) -> None:
        status = self.status = message.status
        self.failing.discard("get a snapshot from the gateway")
        self.guarded("the charts' history", self.history.record, message.taken, status)
        self.guarded("the combinations table", self.render_table)
        events = self.query_one(EventsPane)
        self.guarded("the events pane", events.show, status.get("events", []))
        self.event_seq = events.last_seq
        self.guarded(
            "the recent requests pane",
            self.query_one(RecentTable).show,
            status.get("recent", []),
            status.get("inflight"),
        )
        self.guarded("the summary", self.render_summary)
        self.render_active_pane()

    def guarded(self, pane: str, draw: Callable[..., None], *args: Any) -> None:
        """Draw one pane; if it fails, log why and say so once, and let the rest of the console run."""
        try:
            draw(*args)
        except NoMatches:
            raise
        except Exception as exc:
            self.failed(f"draw {pane}", exc)
        else:
            self.failing.discard(f"draw {pane}")

    def failed(self, what: str, exc: BaseException | None) -> None:
        if what in self.failing:  # still failing: said once already, not once a refresh
            log.debug("the console still cannot %s: %r", what, exc)
        else:
            log.error("the console could not %s", what, exc_info=exc)
            self.failing.add(what)
            self.notify(
                f"could not {what}: {type(exc).__name__}: {exc} "
                "(traceback in the log file; the rest of the console keeps running)",
                title="console error",
                severity="error",
                timeout=10,
            )

    def _handle_exception(self, error: Exception) -> None:
        # an error that ends the console: into the log file with its traceback, not only the terminal
        log.critical("the console stopped on an error", exc_info=error)
        super()._handle_exception(error)

    def render_summary(self) -> None:
        self.query_one(Summary).show(
            model.summary_items(self.url, self.status, self.history, self.filter_text)
        )

    def render_table(self) -> None:
        combos = self.status.get("combinations", [])
        self.query_one(CombinationsTable).show(combos, model.last_optimized(self.status), self.filter_text)

    def render_active_pane(self) -> None:
        active = self.query_one("#panes", TabbedContent).active
        now = self.clock()
        if active == "throughput":
            self.guarded(
                "the throughput chart",
                lambda: self.query_one("#throughput-plot", Chart).draw(
                    model.chart(model.throughput_series(self.history), now)
                ),
            )
        elif active == "latency":
            which = self.latency_of()
            title = f"latency of {which}, ms (live window)" if which else None
            series = model.latency_series(self.history, which)
            self.guarded(
                "the latency chart",
                lambda: self.query_one("#latency-plot", Chart).draw(model.chart(series, now), title),
            )
        elif active == "cost":
            self.guarded("the cost pane", self.query_one(CostPane).show, self.status, self.history, now)
        elif active == "optimizer":
            self.guarded(
                "the optimizer pane", self.query_one(OptimizerPane).show, self.status.get("optimizer") or {}
            )

    def latency_of(self) -> str | None:
        """The combination the latency pane follows: the selected one, else the busiest."""
        sel = self.selected()
        if sel is None:
            combos = self.status.get("combinations", [])
            sel = max(combos, key=lambda c: c["performance"]["requests"] or 0, default=None)
        return sel["id"] if sel else None

    @on(TabbedContent.TabActivated)
    def tab_changed(self) -> None:
        if self.status:
            self.render_active_pane()

    @on(DataTable.RowHighlighted, "#combinations")
    def combination_highlighted(self) -> None:
        if self.status and self.query_one("#panes", TabbedContent).active == "latency":
            self.render_active_pane()  # the chart follows the cursor at once, with that row's history

    # -- selection -------------------------------------------------------------------------------

    def selected(self) -> dict[str, Any] | None:
        key = self.query_one(CombinationsTable).selected_id()
        return next((c for c in self.status.get("combinations", []) if c["id"] == key), None)

    def event(self, text: str, kind: str = "console") -> None:
        """An operator action, into the core's events (shown with the rest on the next refresh)."""
        self.ask("record the event", self.controls.event, kind, text)
        self.fetch()

    # -- actions ---------------------------------------------------------------------------------

    def ask(self, what: str, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Ask the core for something; if that fails (the gateway is busy, gone…), say so and go on."""
        try:
            return True, fn(*args)
        except Exception as exc:
            log.error("the console could not %s", what, exc_info=exc)
            self.notify(
                f"could not {what}: {type(exc).__name__}: {exc} (details in the log file)",
                title="console error",
                severity="error",
                timeout=10,
            )
            return False, None

    def applies(self, c: dict[str, Any] | None, action: str) -> bool:
        """Whether `action` applies to the selected row; if not (a pass-through route has no
        weight, no template…), a notice says why and nothing is asked of the core."""
        if c is None:
            return False
        why = model.not_for(c, action)
        if why:
            self.notify(why, title="not for this row", severity="warning", timeout=6)
        return why is None

    def action_reweight(self, delta: int) -> None:
        c = self.selected()
        if (
            self.applies(c, "reweight")
            and c is not None
            and self.ask("reweight", self.controls.reweight, c["id"], c["weight"] + delta)[0]
        ):
            self.event(f"reweighted {c['id']}: {c['weight']:g} → {max(0, c['weight'] + delta):g}")

    def action_toggle(self) -> None:
        c = self.selected()
        if (
            self.applies(c, "toggle")
            and c is not None
            and self.ask("enable/disable", self.controls.toggle, c["id"], not c["enabled"])[0]
        ):
            self.event(f"{'disabled' if c['enabled'] else 'enabled'} {c['id']}")

    def action_reset(self) -> None:
        if self.ask("reset the weights", self.controls.reset_weights)[0]:
            self.event("weights and states reset to the configured values")

    def action_optimize(self) -> None:
        c = self.selected()
        if not self.applies(c, "optimize") or c is None:
            return
        ok, said = self.ask("start the optimizer", self.controls.optimize, c["template_id"])
        if ok:
            self.event(said, "optimizer")
            self.query_one("#panes", TabbedContent).active = "optimizer"

    def action_cancel_optimize(self) -> None:
        ok, said = self.ask("cancel the optimizer", self.controls.cancel_optimize)
        if ok:
            self.event(said, "optimizer")

    def action_export(self) -> None:
        c = self.selected()
        if not self.applies(c, "export") or c is None:
            return

        def export(template_id: str, folder: Path, progress: Any) -> Path:
            return self.gateway.core.export_package(template_id, folder, progress=progress)

        self.push_screen(ExportScreen(c["template_id"], self.export_dir, export))

    def action_inspect(self) -> None:
        recent = self.query_one(RecentTable)
        if not recent.rows:
            self.notify("no requests yet", timeout=3)
            return
        key = recent.selected_key() or recent.coordinate_to_cell_key((0, 0)).row_key.value
        self.open_inspector(key)

    @on(DataTable.RowSelected, "#recent")
    def recent_chosen(self, event: DataTable.RowSelected) -> None:
        self.open_inspector(event.row_key.value)

    def open_inspector(self, key: str | None) -> None:
        """The attempt in full; a call in flight: what is known of it so far (or, if it has just
        ended, its newest attempt)."""
        recent = self.query_one(RecentTable)
        attempt = recent.attempts.get(key or "")
        if attempt and key in recent.in_flight:
            ok, call = self.ask("open the request", self.controls.inflight_detail, attempt[0])
            if ok and call is None:
                ok, call = self.ask("open the request", self.controls.call_detail, attempt[0], None)
        else:
            ok, call = (
                self.ask("open the request", self.controls.call_detail, *attempt) if attempt else (True, None)
            )
        if not ok:
            return
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
            self.query_one(CombinationsTable).clear()
            self.guarded("the combinations table", self.render_table)
            self.guarded("the summary", self.render_summary)  # it says the table is filtered

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        self.query_one(CombinationsTable).focus()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_class("shown"):
            box.value = ""
            box.remove_class("shown")
            box.disabled = True
            self.query_one(CombinationsTable).focus()
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
        return key_rows(self.keys)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.key_rows()))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for k in KEYS:
            if k.palette:
                keys = self.keys.get(k.id, k.keys)
                yield SystemCommand(
                    f"{k.title} [{keys}]",
                    k.description,
                    lambda a=k.action: self.call_later(self.run_action, a),
                )
