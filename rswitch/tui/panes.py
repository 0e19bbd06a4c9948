"""The console's panes: widgets that draw what `rswitch.tui.model` computes from a snapshot.
Each updates in place (keyed rows, cells changed only when they change), so the operator's
cursor and scroll survive a refresh."""

from __future__ import annotations

from collections import deque
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from rswitch.tui import model
from rswitch.tui.model import EVENTS_KEPT, TRIAL_COLUMNS


class Summary(Static):
    """The summary lines: whole items per line, as many as fit, laid out again on a resize."""

    def __init__(self, text: str, **kw: Any) -> None:
        super().__init__(text, markup=False, **kw)
        self.items: list[tuple[int, str]] = []

    def show(self, items: list[tuple[int, str]]) -> None:
        self.items = items
        self.redraw()

    def redraw(self) -> None:
        width = self.size.width or self.app.size.width - 2  # before the first layout: the screen less padding
        self.update("\n".join(model.fit_summary(self.items, max(width, 20))))

    def on_resize(self) -> None:
        if self.items:
            self.redraw()


class CombinationsTable(DataTable[str]):
    """One row per combination (keyed by its id); the columns that fit the width, hiding the least
    important first."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.rows_shown: dict[str, dict[str, str]] = {}
        self.columns_shown: list[str] = []
        self.layout_shown: Any = None  # (columns, their content widths, the widest row label)

    def show(self, combos: list[dict[str, Any]], optimized: dict[str, str], filter_text: str) -> None:
        self.rows_shown = {
            c["id"]: model.combination_row(c, optimized.get(c.get("template_id", ""), "-"))
            for c in combos
            if model.matches(c, filter_text)
        }
        self.redraw()

    def fitting_columns(self) -> list[str]:
        width = self.size.width or self.app.size.width
        return model.visible_columns(self.rows_shown, width)

    def redraw(self) -> None:
        columns = self.fitting_columns()
        layout = (
            columns,
            model.column_widths(self.rows_shown.values(), columns),
            max(map(len, self.rows_shown), default=0),
        )
        with self.app.batch_update():
            if layout != self.layout_shown:
                # columns come and go with the width, and take the width of their widest cell
                # (a state that grows to "degraded", a cost that grows digits): rebuilt in order,
                # so a column is never narrower than its text nor wider than it was counted
                selected = self.selected_id()
                self.clear(columns=True)
                for col in columns:
                    self.add_column(col, key=col)
                self.columns_shown, self.layout_shown = columns, layout
                self._fill()
                if selected in self.rows:
                    self.move_cursor(row=self.get_row_index(selected))
                return
            self._fill()

    def _fill(self) -> None:
        for cid, row in self.rows_shown.items():
            if cid in self.rows:  # update in place: cursor and scroll survive
                for col in self.columns_shown:
                    if self.get_cell(cid, col) != row[col]:
                        self.update_cell(cid, col, row[col], update_width=True)
            else:
                self.add_row(*(row[col] for col in self.columns_shown), key=cid, label=cid)
        for key in [k for k in self.rows if k.value not in self.rows_shown]:
            self.remove_row(key)

    def selected_id(self) -> str | None:
        if not self.rows or self.cursor_row < 0:
            return None
        return self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value

    def on_resize(self) -> None:
        if self.rows_shown:
            self.redraw()


class RecentTable(DataTable[str]):
    """The calls still in flight (their stage, the time so far, a stream's tokens so far), then the
    last finished calls newest first, one row per upstream attempt (keyed request id + attempt).
    The columns that fit the pane: `try` and `time` hide first, long combination ids are abridged."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(cursor_type="row", **kw)
        self.attempts: dict[str, tuple[str, int]] = {}  # row key -> (request id, attempt)
        self.in_flight: set[str] = set()  # the keys of the rows that are calls still in flight
        self.in_flight_count = 0  # calls in flight at the gateway (more than the rows, under load)
        self.recent_rows: list[model.RecentRow] = []
        self.columns_layout: model.RecentLayout | None = None

    def on_mount(self) -> None:
        self.border_title = model.recent_title(self.outer_size.width or 40, 0)

    def on_resize(self) -> None:
        self.border_title = model.recent_title(self.outer_size.width, self.in_flight_count)
        if self.columns_layout is not None:
            self.redraw()

    def show(self, recent: list[dict[str, Any]], inflight: dict[str, Any] | None = None) -> None:
        """Under load every refresh brings a new set: redrawn whole, the cursor kept on its call
        (a call that has just finished: on its newest attempt)."""
        rows = model.recent_rows(recent, inflight=inflight)
        count = int((inflight or {}).get("count") or 0)
        if count != self.in_flight_count:
            self.in_flight_count = count
            self.border_title = model.recent_title(self.outer_size.width or 40, count)
        if rows == self.recent_rows and self.columns_layout is not None:
            return
        self.recent_rows = rows
        self.redraw()

    def redraw(self) -> None:
        rows = self.recent_rows
        keys = [r.key for r in rows]
        layout = model.recent_layout(rows, self.size.width or self.app.size.width // 3)
        cursor = self.cursor_row
        selected = self.selected_key()
        if selected is not None and selected not in keys and selected in self.attempts:
            rid = self.attempts[selected][0]  # the call finished (or another attempt began): follow it
            selected = next((r.key for r in rows if r.request_id == rid), selected)
        with self.app.batch_update():
            if layout != self.columns_layout:
                self.clear(columns=True)
                for key, header, width in layout.columns:
                    self.add_column(header, key=key, width=width)
                self.columns_layout = layout
            else:
                self.clear()
            self.attempts = {r.key: (r.request_id, r.attempt) for r in rows}
            self.in_flight = {r.key for r in rows if r.in_flight}
            for r in rows:
                cells = layout.cells(r)
                if r.in_flight:  # told apart from the finished calls without colour too: the stage words
                    self.add_row(*(Text(c, style="italic") for c in cells), key=r.key)
                else:
                    self.add_row(*cells, key=r.key)
            if selected in keys:  # the cursor stays on the call it was on, wherever it moved
                self.move_cursor(row=keys.index(selected))
            elif 0 <= cursor < self.row_count:
                self.move_cursor(row=cursor)

    def selected_key(self) -> str | None:
        if not self.rows or not 0 <= self.cursor_row < self.row_count:
            return None
        return self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value


class EventsPane(VerticalScroll):
    """Events newest first; long text wraps to the pane's width instead of being cut."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.events: deque[tuple[int, float, str, str]] = deque(maxlen=EVENTS_KEPT)
        self.last_seq = 0

    def compose(self) -> ComposeResult:
        yield Static("", id="events-text")

    def on_mount(self) -> None:
        self.border_title = "events (newest first)"

    def show(self, events: list[Any]) -> None:
        new = [tuple(e) for e in events if e[0] > self.last_seq]
        if not new:
            return
        self.events.extend(new)  # type: ignore[arg-type]
        self.last_seq = max(e[0] for e in new)
        text = Text(no_wrap=False, overflow="fold")
        for i, (stamp, kind, what) in enumerate(model.event_lines(list(self.events))):
            if i:
                text.append("\n")
            text.append(f"{stamp} ", style="dim")
            text.append(kind, style="bold")
            text.append(f"  {what}")
        self.query_one("#events-text", Static).update(text)

    def reset(self) -> None:
        """Forget what is shown (a gateway reached again may have restarted, its events numbered anew)."""
        self.events.clear()
        self.last_seq = 0
        self.query_one("#events-text", Static).update("")

    def texts(self) -> list[str]:
        """The events' texts as shown, newest first."""
        return [what for _, _, what in model.event_lines(list(self.events))]


class Chart(PlotextPlot):
    """A line chart of series over the last minutes, drawn from a `model.Chart`."""

    def __init__(self, title: str, *, xlabel: str = "seconds ago", **kw: Any) -> None:
        super().__init__(**kw)
        self.title = title
        self.xlabel = xlabel
        self.drawn = model.chart([], 0.0)
        self.drawn_title = title

    def on_mount(self) -> None:
        self.draw(model.chart([], 0.0))

    def draw(self, c: model.Chart, title: str | None = None) -> None:
        title = (title or self.title) + ("" if c.lines else " — no data yet")
        self.drawn, self.drawn_title = c, title  # what the chart shows now
        plt = self.plt
        plt.clear_data()
        plt.title(title)
        for name, xs, ys in c.lines:
            plt.plot(xs, ys, label=name)
        plt.xlim(*c.xlim)
        plt.ylim(*c.ylim)
        plt.xticks(c.xticks, c.xlabels)
        plt.xlabel(self.xlabel)
        self.refresh()


class CostPane(Horizontal):
    def compose(self) -> ComposeResult:
        yield Chart("cumulative cost, $", id="cost-plot")
        yield DataTable(id="cost-table", cursor_type="none", show_cursor=False)

    def on_mount(self) -> None:
        table = self.query_one("#cost-table", DataTable)
        for col in ("by", "name", "$ total", "$/min", "$/attempt"):
            table.add_column(col, key=col)

    def show(self, status: dict[str, Any], history: model.History, now: float) -> None:
        self.query_one("#cost-plot", Chart).draw(
            model.chart([("$ total", list(history.costs)), ("$ per minute", history.cost_per_minute())], now)
        )
        table = self.query_one("#cost-table", DataTable)
        table.clear()
        for row in model.cost_rows(status, history):
            table.add_row(*row)


class OptimizerPane(Vertical):
    """The optimizer's state and stage, the running (or last) run's trials, and its best score."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.trials_run: str | None = None  # the optimizer run whose trials the table shows

    def compose(self) -> ComposeResult:
        yield Static("optimizer: idle", id="optimizer-status", markup=False)
        with Horizontal():
            yield DataTable(id="trials", cursor_type="row")
            yield PlotextPlot(id="best-curve")

    def on_mount(self) -> None:
        trials = self.query_one("#trials", DataTable)
        for col in TRIAL_COLUMNS:
            trials.add_column(col, key=col)
        self.query_one("#best-curve", PlotextPlot).plt.title("best so far (full validation)")

    def show(self, opt: dict[str, Any]) -> None:
        self.query_one("#optimizer-status", Static).update("\n".join(model.optimizer_lines(opt)))
        if not opt.get("enabled"):
            return
        trials = opt.get("trials") or []
        table = self.query_one("#trials", DataTable)
        run = trials[0].get("run_id") if trials else None
        if run != self.trials_run:  # another run: its trial numbers start at 0 again
            table.clear()
            self.trials_run = run
        for t in trials:
            key = str(t["trial"])
            if key not in table.rows:
                table.add_row(*model.trial_row(t), key=key)
        plot = self.query_one("#best-curve", PlotextPlot)
        plot.plt.clear_data()
        best = [(t["trial"], t["best_score"]) for t in trials if t.get("best_score") is not None]
        if best:
            plot.plt.plot([x for x, _ in best], [y for _, y in best], label="best so far")
            plot.plt.xlabel("trial")
        plot.refresh()
