"""The console's Compare tab: pick candidates for the selected template's traffic, watch their
rows score live, see quality against cost with the Pareto front marked, and apply the result
(see `rswitch.optimizer.compare`). Everything goes through the operator interface, so it works
in-process and attached alike."""

from __future__ import annotations

from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, RadioButton, RadioSet, SelectionList, Static
from textual.widgets.selection_list import Selection
from textual_plotext import PlotextPlot

from rswitch.admin.actions import CompareSpec
from rswitch.tui.model import implicit_kind

COLUMNS = ("", "candidate", "quality", "95% CI", "vs incumbent", "$/1k calls", "p50 ms", "failed")
SHORT = {
    "no significant difference": "same",
    "worse than the incumbent": "worse",
    "better than the incumbent": "better",
}


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def run_rows(run: dict[str, Any]) -> list[tuple[str, ...]]:
    """A finished comparison's candidates, one row each (front marked `*`)."""
    rows = []
    for o in run.get("candidates") or []:
        ci = o.get("ci")
        verdict = (
            "incumbent"
            if o.get("incumbent")
            else SHORT.get(str(o.get("verdict")), str(o.get("verdict") or ""))
        )
        if o.get("delta") is not None and not o.get("incumbent"):
            verdict = f"{o['delta']:+.3f} {verdict}"
        rows.append(
            (
                "*" if o.get("on_front") else "",
                str(o["id"]),
                _num(o.get("mean")),
                f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-",
                verdict,
                f"{o['cost_per_1k']:.4f}" if o.get("priced", True) else "unknown",
                _num(o.get("p50_ms"), ".0f"),
                f"{o.get('failures', 0)}/{o.get('calls', 0)}",
            )
        )
    return rows


def running_rows(running: dict[str, Any]) -> list[tuple[str, ...]]:
    """The run going now: each candidate's mean quality so far."""
    means = running.get("means") or {}
    return [
        ("", cid, _num(means.get(cid)), "", "scoring…", "", "", "") for cid in running.get("candidates", [])
    ]


def status_lines(template_id: str | None, view: dict[str, Any] | None) -> list[str]:
    if template_id is None:
        return ["no comparison yet: select a combination and press m to compare its template's candidates"]
    if view is None:
        return [f"comparisons of '{template_id}': asking the gateway…"]
    running = view.get("running")
    lines = []
    if running is not None:
        lines.append(
            f"comparing '{running['template_id']}': row {running.get('rows_done', 0)}/{running['rows']}, "
            f"{running['calls']} call(s) planned (run {running['run_id']})"
        )
    runs = view.get("runs") or []
    if runs:
        last = runs[0]
        lines.append(
            f"last of '{template_id}' (run {last['run_id']}): {last['rows']} row(s) of the {last['split']} split, "
            f"{last['calls']} call(s), ${last['cost']:.4f}"
            + (" — stopped: budget" if last.get("stopped") else "")
        )
        lines.append(f"recommend {last.get('recommended') or '-'}: {last.get('reason') or ''}")
        lines.append(
            f"applied: {last['applied']}"
            if last.get("applied")
            else "a: apply (the recommended combination takes the traffic)"
        )
    elif running is None:
        lines.append(f"no comparison of '{template_id}' yet: press m")
    return lines


def front_and_rest(
    run: dict[str, Any],
) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]]:
    """(cost per 1k, quality, id) of the candidates on the front, and of the others (priced ones)."""
    front, rest = [], []
    for o in run.get("candidates") or []:
        if o.get("mean") is None or not o.get("priced", True):
            continue
        point = (float(o["cost_per_1k"]), float(o["mean"]), str(o["id"]))
        (front if o.get("on_front") else rest).append(point)
    return sorted(front), rest


class ComparePane(Vertical):
    """The comparison of one template: the run going now, or its last one, as a table and, under
    it, a quality-versus-cost scatter with the Pareto front marked."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.template_id: str | None = None
        self.view: dict[str, Any] | None = None
        self.asking = False

    def compose(self) -> ComposeResult:
        yield Static(status_lines(None, None)[0], id="compare-status", markup=False)
        yield DataTable(id="compare-table", cursor_type="row", zebra_stripes=True)
        yield PlotextPlot(id="compare-plot")

    def on_mount(self) -> None:
        table = self.query_one("#compare-table", DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        self.query_one("#compare-plot", PlotextPlot).plt.title(
            "quality vs $ per 1,000 calls: ● the front (* in the table), x dominated"
        )

    @property
    def last_run(self) -> dict[str, Any] | None:
        runs = (self.view or {}).get("runs") or []
        return runs[0] if runs else None

    def follow(self, template_id: str) -> None:
        if template_id != self.template_id:
            self.template_id, self.view = template_id, None
        self.poll()

    def poll(self) -> None:
        """Ask for the template's comparisons (the app calls this on each refresh while shown)."""
        if self.template_id is None or self.asking:
            self.show(self.view)
            return
        self.asking = True
        self.run_worker(self._ask(self.template_id), group="compare", exit_on_error=False)

    async def _ask(self, template_id: str) -> None:
        try:
            answer = await self.app.operator.compare_runs(template_id)  # type: ignore[attr-defined]
            view = answer.model_dump(mode="json")
        except Exception as exc:
            self.query_one("#compare-status", Static).update(f"could not get the comparisons: {exc}")
            return
        finally:
            self.asking = False
        if template_id == self.template_id:
            self.show(view)

    def show(self, view: dict[str, Any] | None) -> None:
        self.view = view
        self.query_one("#compare-status", Static).update("\n".join(status_lines(self.template_id, view)))
        table = self.query_one("#compare-table", DataTable)
        running = (view or {}).get("running")
        mine = running if running is not None and running.get("template_id") == self.template_id else None
        rows = running_rows(mine) if mine is not None else run_rows(self.last_run or {})
        table.clear()
        for row in rows:
            table.add_row(*row, key=row[1])
        plot = self.query_one("#compare-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        front, rest = front_and_rest(self.last_run or {}) if mine is None else ([], [])
        points = front + rest
        if points:  # a margin around the points: none hides on the frame
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 0.1
            plt.xlim(min(xs) - 0.08 * dx, max(xs) + 0.08 * dx)
            plt.ylim(min(ys) - 0.15 * dy, max(ys) + 0.15 * dy)
        for group, marker, color in ((front, "●", "green"), (rest, "x", "red")):
            if group:
                plt.scatter([p[0] for p in group], [p[1] for p in group], marker=marker, color=color)
        plt.xlabel("$ per 1,000 calls")
        plot.refresh()


class CompareScreen(ModalScreen[dict[str, Any] | None]):
    """Pick what to compare for a template: combinations (space toggles), the rows, the split."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, template_id: str, choices: list[tuple[str, bool]]) -> None:
        super().__init__(id="compare-dialog")
        self.template_id = template_id
        self.choices = choices  # (combination id, selected at first)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Compare candidates for '{self.template_id}'", classes="title")
            yield Label("combinations (space: pick; the incumbent is always compared)")
            yield SelectionList[str](
                *(Selection(cid, cid, on) for cid, on in self.choices), id="compare-candidates"
            )
            yield Label("rows (blank: every row of the split)")
            yield Input("", placeholder="e.g. 100", id="compare-rows")
            with RadioSet(id="compare-split"):
                yield RadioButton("test split (held-out newest rows)", value=True, id="split-test")
                yield RadioButton("all labelled rows", id="split-all")
            yield Static("enter or Compare to start", id="compare-hint", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Compare", id="compare-go", variant="primary")
                yield Button("Close", id="compare-close")

    @on(Button.Pressed, "#compare-close")
    def close(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted, "#compare-rows")
    @on(Button.Pressed, "#compare-go")
    def start(self) -> None:
        picked = list(self.query_one("#compare-candidates", SelectionList).selected)
        hint = self.query_one("#compare-hint", Static)
        if not picked:
            hint.update("pick at least one combination to compare with the incumbent")
            return
        text = self.query_one("#compare-rows", Input).value.strip()
        if text and (not text.isdigit() or int(text) < 1):
            hint.update(f"rows must be a whole number of at least 1, or blank; got {text!r}")
            return
        split = "all" if self.query_one("#split-all", RadioButton).value else "test"
        self.dismiss({"candidates": picked, "rows": int(text) if text else None, "split": split})


class CompareKeys:
    """The console's compare keys (mixed into RSwitchApp): m picks candidates for the selected
    combination's template and starts a comparison; a applies the last one shown."""

    def action_compare(self: Any) -> None:
        c = self.selected()
        if not self.applies(c, "compare") or c is None or self.refused_while_disconnected("compare"):
            return
        tid = c["template_id"]
        others = [x for x in self.status.get("combinations", []) if not implicit_kind(x)]
        choices = [(x["id"], x.get("template_id") == tid) for x in others]

        def chosen(spec: dict[str, Any] | None) -> None:
            if spec is None:
                return

            def started(plan: Any) -> None:
                self.notify(f"comparing '{tid}': {plan.calls} call(s) planned", title="compare", timeout=4)
                self.query_one("#panes").active = "compare"
                self.query_one(ComparePane).follow(tid)

            self.act("compare", lambda: self.operator.compare(tid, CompareSpec(**spec)), started)

        self.push_screen(CompareScreen(tid, choices), chosen)

    def action_apply_compare(self: Any) -> None:
        pane = self.query_one(ComparePane)
        run = pane.last_run
        if run is None or pane.template_id is None:
            self.notify("no finished comparison to apply: press m to compare first", timeout=5)
            return
        tid, run_id = pane.template_id, run["run_id"]

        def applied(answer: Any) -> None:
            self.notify(answer.applied, title="compare", timeout=8)
            pane.follow(tid)

        self.act("apply the comparison", lambda: self.operator.apply_compare(tid, run_id), applied)
