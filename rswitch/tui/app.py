"""The Textual app: live panes over snapshots of the core, keys that steer it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, RichLog, Sparkline, Static

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
)


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def combination_row(c: dict[str, Any]) -> tuple[str, ...]:
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
    )


class Snapshot(Message):
    """A frozen status snapshot from the gateway's loop, delivered to the UI thread."""

    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__()
        self.status = status


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
            configured = {c.id: c.weight for c in self.gateway.core.config.gateway.combinations}
            for cid, w in configured.items():
                if cid in self.gateway.core.gateway.combinations:
                    self.gateway.core.gateway.combinations[cid].weight = w
            self.gateway.core.gateway.reindex()

        self.gateway.call(reset)


class RSwitchApp(App[None]):
    TITLE = "rswitch"
    CSS = """
    #main { height: 1fr; }
    #combinations { height: 2fr; }
    #side { width: 40; }
    #throughput { height: 5; border: round $primary; }
    #events { height: 1fr; border: round $primary; }
    #summary { height: 3; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("plus,equals_sign", "reweight(1)", "Weight +", id="reweight_up"),
        Binding("minus", "reweight(-1)", "Weight −", id="reweight_down"),
        Binding("e", "toggle", "Enable/disable", id="toggle"),
        Binding("r", "reset", "Reset weights", id="reset_weights"),
        Binding("o", "optimize", "Optimize", id="optimize"),
        Binding("x", "export", "Export", id="export"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(
        self, gateway: Any, *, url: str = "", refresh: float = 0.5, export_dir: Path | None = None
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.controls = Controls(gateway)
        self.url = url
        self.refresh_seconds = refresh
        self.export_dir = export_dir or Path.cwd() / "packages"
        self.status: dict[str, Any] = {}
        self.rates: list[float] = [0.0]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"gateway {self.url}", id="summary")
        with Horizontal(id="main"):
            table: DataTable[str] = DataTable(id="combinations", cursor_type="row", zebra_stripes=True)
            yield table
            with Vertical(id="side"):
                yield Sparkline(self.rates, id="throughput")
                yield RichLog(id="events", max_lines=500, markup=False, wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        self.query_one("#throughput", Sparkline).border_title = "requests/s"
        self.query_one("#events", RichLog).border_title = "events"
        self.fetch()
        self.set_interval(self.refresh_seconds, self.fetch)

    # -- data: a worker fetches, the UI thread renders ------------------------------------------

    @work(thread=True, exclusive=True, group="fetch", exit_on_error=False)
    def fetch(self) -> None:
        self.post_message(Snapshot(self.gateway.snapshot()))

    @on(Snapshot)
    def render_snapshot(self, message: Snapshot) -> None:
        self.status = message.status
        table = self.query_one(DataTable)
        seen = set()
        with self.batch_update():
            for c in message.status["combinations"]:
                seen.add(c["id"])
                row = combination_row(c)
                if c["id"] in table.rows:
                    for col, value in zip(
                        COLUMNS, row, strict=True
                    ):  # update in place: cursor and scroll survive
                        if table.get_cell(c["id"], col) != value:
                            table.update_cell(c["id"], col, value)
                else:
                    table.add_row(*row, key=c["id"], label=c["id"])
            for key in [k for k in table.rows if k.value not in seen]:
                table.remove_row(key)
        total = sum(c["performance"]["requests_per_s"] or 0 for c in message.status["combinations"])
        self.rates = [*self.rates[-59:], total]
        self.query_one("#throughput", Sparkline).data = self.rates  # reassign: it is reactive
        rec = message.status["recorder"]
        served = sum(c["performance"]["since_start"]["requests"] for c in message.status["combinations"])
        self.query_one("#summary", Static).update(
            f"gateway {self.url}   strategy {message.status['strategy']}   {total:.1f} req/s   requests {served}   "
            f"recorded {rec['written']}  dropped {rec['dropped']}  queue {rec['queue_depth']}"
        )

    # -- actions ---------------------------------------------------------------------------------

    def selected(self) -> dict[str, Any] | None:
        table = self.query_one(DataTable)
        if not table.rows or table.cursor_row < 0:
            return None
        key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        return next((c for c in self.status.get("combinations", []) if c["id"] == key), None)

    def event(self, text: str) -> None:
        self.query_one("#events", RichLog).write(text)

    def action_reweight(self, delta: int) -> None:
        c = self.selected()
        if c is not None:
            self.controls.reweight(c["id"], c["weight"] + delta)
            self.event(f"reweighted {c['id']}: {c['weight']:g} → {max(0, c['weight'] + delta):g}")
            self.fetch()

    def action_toggle(self) -> None:
        c = self.selected()
        if c is not None:
            self.controls.toggle(c["id"], not c["enabled"])
            self.event(f"{'disabled' if c['enabled'] else 'enabled'} {c['id']}")
            self.fetch()

    def action_reset(self) -> None:
        self.controls.reset_weights()
        self.event("weights reset to the configured values")
        self.fetch()

    def action_optimize(self) -> None:
        c = self.selected()
        if c is None:
            return
        optimizer = self.gateway.core.optimizer
        if optimizer is None:
            self.event("the background optimizer is off (gateway.optimization.enabled)")
            return
        optimizer.request(c["template_id"])
        self.event(f"optimization of '{c['template_id']}' queued")

    def action_export(self) -> None:
        c = self.selected()
        if c is not None:
            self.export(c["template_id"])

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def export(self, template_id: str) -> None:
        try:
            path = self.gateway.core.export_package(template_id, self.export_dir)
            self.call_from_thread(self.event, f"exported '{template_id}' → {path}")
        except Exception as exc:
            self.call_from_thread(self.event, f"export of '{template_id}' failed: {exc}")
