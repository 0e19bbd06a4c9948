"""The Textual app: live panes over snapshots of the gateway, keys that steer it.

The console talks to the gateway only through the operator interface (`rswitch.tui.operator`):
in-process or attached over HTTP, it awaits the same methods and does not know which it has.
Every call runs in a worker (never blocking the UI loop): a fetch asks for a snapshot (all in
memory on the gateway, no database query) and posts it as a message, and the UI thread draws
from it; a key's action is sent, and what it changed shows on the next snapshot. If the gateway
cannot be reached, the console says so (a notice and a status line), keeps trying with backoff,
and refuses actions (nothing is sent) until it is back.
What each pane shows is computed in `rswitch.tui.model`; the panes are in `panes`, the modal
screens in `screens`, and every key (id, keys, action, description) in `keys`.

A pane that fails to draw is logged with its traceback and reported in one notice; the other
panes and the console keep running. An error that does end the console is logged too, and
`rswitch tui` then exits with a non-zero status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static, TabbedContent, TabPane

from rswitch.admin.actions import Operator
from rswitch.gateway.errors import GatewayError
from rswitch.tui import model
from rswitch.tui.compare import CompareKeys, ComparePane
from rswitch.tui.keys import KEYS, key_rows
from rswitch.tui.operator import frame, plain, unreachable
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


class RSwitchApp(CompareKeys, App[None]):
    TITLE = "rswitch"
    CSS_PATH = "app.tcss"  # the layout, beside this file
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(k.keys, k.action, k.title, id=k.id, show=k.footer, tooltip=k.description) for k in KEYS
    ]

    RECONNECT_MAX_SECONDS = 8.0  # the longest wait between two tries to reach a gateway that is gone

    def __init__(
        self,
        operator: Operator,
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
        self.operator = operator
        self.url = url
        self.refresh_seconds = refresh
        self.export_dir = export_dir or Path.cwd() / "packages"
        self.clock = clock
        self.status: dict[str, Any] = {}
        self.filter_text = ""
        self.history = model.History()
        self.event_seq = 0  # the newest event shown; a snapshot brings only newer ones
        self.failing: set[str] = set()  # what failed last time (reported once, until it works again)
        self.connected = True  # until a fetch says otherwise
        self.lost_reason = ""
        self.retry_wait = 0.0  # seconds until the next try while disconnected (doubles, capped)
        self.retry_at = 0.0  # time.monotonic() of that try
        self.fetching = False  # one fetch at a time: a slow gateway is never asked twice at once

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Summary(f"gateway {self.url}", id="summary")
        yield Static("", id="connection", markup=False)
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
                    with TabPane("Compare", id="compare"):
                        yield ComparePane()
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

    def fetch(self) -> None:
        """Ask for the next snapshot (skipped while one is on its way, or before the next try
        to reach a gateway that is gone)."""
        if self.fetching:
            return
        if not self.connected:
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                self.show_connection(wait)
                return
        self.fetching = True
        self.run_worker(self._fetch(), group="fetch", exit_on_error=False)

    async def _fetch(self) -> None:
        after = self.event_seq if self.connected else 0  # reached again: all the events it keeps
        try:
            snapshot = await self.operator.snapshot(after)
        except Exception as exc:
            if unreachable(exc):
                self.lost(exc)
            else:
                self.failed("get a snapshot from the gateway", exc)
            return
        finally:
            self.fetching = False
        if not self.connected:
            self.reconnected()
        self.post_message(Snapshot(frame(snapshot), self.clock()))

    # -- the connection ----------------------------------------------------------------------------

    def lost(self, exc: BaseException) -> None:
        """The gateway cannot be reached: say so once, then try again with backoff."""
        self.lost_reason = str(exc)
        if self.connected:
            self.connected = False
            self.retry_wait = self.refresh_seconds
            log.warning("lost the gateway at %s: %s", self.url, exc)
            self.notify(
                f"{exc}. The console keeps trying; actions are refused until it is back.",
                title="disconnected",
                severity="error",
                timeout=10,
            )
        else:
            self.retry_wait = min(self.retry_wait * 2, self.RECONNECT_MAX_SECONDS)
        self.retry_at = time.monotonic() + self.retry_wait
        self.show_connection(self.retry_wait)

    def reconnected(self) -> None:
        self.connected = True
        self.failing.discard("get a snapshot from the gateway")
        self.event_seq = 0
        with suppress(NoMatches):
            self.query_one(EventsPane).reset()  # the snapshot in hand brings the events anew
        log.warning("reconnected to the gateway at %s", self.url)
        self.notify(f"reconnected to the gateway at {self.url}", title="connected", timeout=5)
        self.show_connection(None)

    def show_connection(self, retry_in: float | None) -> None:
        """The status line under the summary: shown only while the gateway cannot be reached."""
        try:
            line = self.query_one("#connection", Static)
        except NoMatches:
            return
        if retry_in is None:
            line.remove_class("shown")
            return
        line.update(
            f"DISCONNECTED from {self.url}: {self.lost_reason} — trying again in {max(retry_in, 0):.0f} s"
        )
        line.add_class("shown")

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
        elif active == "compare":
            self.guarded("the compare pane", self.query_one(ComparePane).poll)

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

    # -- actions: sent in a worker, refused while disconnected ---------------------------------------

    def act(
        self,
        what: str,
        send: Callable[[], Awaitable[Any]],
        done: Callable[[Any], None] | None = None,
        refused: Callable[[GatewayError], bool] | None = None,
        changes: bool = True,
    ) -> None:
        """Send an action to the gateway in a worker. While the gateway cannot be reached it is not
        sent at all; a refusal or a failure is said in a notice; `done` gets the answer; an action
        that `changes` the gateway is followed by a fetch, so the panes show it at once."""
        if self.refused_while_disconnected(what):
            return
        self.run_worker(self._act(what, send, done, refused, changes), group="actions", exit_on_error=False)

    def refused_while_disconnected(self, what: str) -> bool:
        if self.connected:
            return False
        self.notify(
            f"could not {what}: the gateway at {self.url} cannot be reached; nothing was sent",
            title="disconnected",
            severity="warning",
            timeout=6,
        )
        return True

    async def _act(
        self,
        what: str,
        send: Callable[[], Awaitable[Any]],
        done: Callable[[Any], None] | None,
        refused: Callable[[GatewayError], bool] | None,
        changes: bool,
    ) -> None:
        try:
            answer = await send()
        except GatewayError as exc:
            if unreachable(exc):
                self.lost(exc)
                self.notify(f"could not {what}: {exc.message}", title="disconnected", severity="error")
            elif refused is None or not refused(exc):
                self.notify(
                    f"could not {what}: {exc.message}", title="refused", severity="warning", timeout=8
                )
            return
        except Exception as exc:
            log.error("the console could not %s", what, exc_info=exc)
            self.notify(
                f"could not {what}: {type(exc).__name__}: {exc} (details in the log file)",
                title="console error",
                severity="error",
                timeout=10,
            )
            return
        if done is not None:
            done(answer)
        if changes:
            self.fetch()

    def applies(self, c: dict[str, Any] | None, action: str) -> bool:
        """Whether `action` applies to the selected row; if not (a pass-through route has no
        weight, no template…), a notice says why and nothing is asked of the gateway."""
        if c is None:
            return False
        why = model.not_for(c, action)
        if why:
            self.notify(why, title="not for this row", severity="warning", timeout=6)
        return why is None

    def action_reweight(self, delta: int) -> None:
        c = self.selected()
        if self.applies(c, "reweight") and c is not None:
            cid, weight = c["id"], max(0.0, c["weight"] + delta)
            self.act("reweight", lambda: self.operator.reweight(cid, weight))

    def action_toggle(self) -> None:
        c = self.selected()
        if self.applies(c, "toggle") and c is not None:
            cid, enabled = c["id"], not c["enabled"]
            self.act("enable/disable", lambda: self.operator.set_enabled(cid, enabled))

    def action_reset(self) -> None:
        self.act("reset the weights", self.operator.reset_weights)

    def action_optimize(self) -> None:
        c = self.selected()
        if not self.applies(c, "optimize") or c is None:
            return
        template_id = c["template_id"]

        def queued(_: Any) -> None:
            self.notify(f"optimization of '{template_id}' queued", title="optimizer", timeout=4)
            self.query_one("#panes", TabbedContent).active = "optimizer"

        self.act("start the optimizer", lambda: self.operator.optimize(template_id), queued)

    def action_cancel_optimize(self) -> None:
        def cancelling(answer: Any) -> None:
            self.notify(
                f"cancelling the optimization of '{answer.template_id}'", title="optimizer", timeout=4
            )

        self.act("cancel the optimizer", self.operator.cancel_optimize, cancelling)

    def action_export(self) -> None:
        c = self.selected()
        if not self.applies(c, "export") or c is None:
            return
        if self.refused_while_disconnected("export"):
            return

        async def export(template_id: str, folder: Path) -> Path:
            return await self.operator.export_package(template_id, folder)

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
        if not attempt:
            self.notify("that request is no longer in memory", timeout=3)
            return
        request_id, number = attempt[0], attempt[1]
        in_flight = key in recent.in_flight

        async def fetch_call() -> dict[str, Any]:
            if in_flight:
                try:
                    return plain(await self.operator.inflight_call(request_id))
                except GatewayError as exc:
                    if exc.status != 404:
                        raise
                return plain(await self.operator.recent_call(request_id, None))  # it has just ended
            return plain(await self.operator.recent_call(request_id, number))

        def gone(exc: GatewayError) -> bool:
            if exc.status == 404:
                self.notify("that request is no longer in memory", timeout=3)
                return True
            return False

        self.act(
            "open the request",
            fetch_call,
            lambda call: self.push_screen(InspectorScreen(call)),
            gone,
            changes=False,
        )

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
