"""The console's modal screens: the keys (help), one request attempt in full (inspector), and
exporting a package."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Static

from rswitch.tui.model import fmt_cost, inflight_head


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


def attempt_lines(chain: list[dict[str, Any]]) -> list[str]:
    """The request's attempts up to the inspected one, one line each (numbered from 1)."""
    lines = []
    for i, a in enumerate(chain, 1):
        outcome = "ok" if a.get("error_type") is None else a["error_type"]
        lines.append(
            f"{'attempts' if i == 1 else '':<12}{i}. {a.get('combination')} ({a.get('provider')}/{a.get('model')})"
            f"  {a.get('status')} {outcome}, {float(a.get('ms') or 0):.0f} ms, {a.get('tokens')} tokens"
        )
    return lines


class InspectorScreen(ModalScreen[None]):
    """One recent call in full: prompt, messages, output, tokens, cost, latency, and the route.
    A call still in flight: its stage and what is known so far (as of opening)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,i", "dismiss", "Close")]

    def __init__(self, call: dict[str, Any]) -> None:
        super().__init__(id="inspector")
        self.call = call

    def compose(self) -> ComposeResult:
        if self.call.get("in_flight"):
            yield from self.compose_in_flight()
            return
        c = self.call
        tokens = f"{c['prompt_tokens']} in / {c['completion_tokens']} out" + (
            " (estimated)" if c["tokens_estimated"] else ""
        )
        head = [
            f"request     {c['request_id']}",
            f"{'served by' if c['success'] else 'tried    '}   {c['combination_id']}  ({c['provider']}/{c['model']}, template {c['template_id']})",
            f"outcome     {'ok' if c['success'] else 'failed'} {c['status']}, attempt {c['attempt']}"
            + (f", streamed (ttft {c['ttft_ms']:.0f} ms)" if c["stream"] and c["ttft_ms"] else ""),
            f"latency     {c['duration_ms']:.1f} ms",
            f"tokens      {tokens}",
            f"cost        ${fmt_cost(c['cost'])}",
            f"route       {c['route'] or 'balancer (no routing chain)'}",
        ]
        if c.get("error"):
            head.append(f"error       {c['error']}")
        head.extend(attempt_lines(c.get("attempts") or []))
        with Vertical(classes="dialog wide"):
            yield Label(f"Request {c['request_id'][:12]}, attempt {c['attempt']}", classes="title")
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

    def compose_in_flight(self) -> ComposeResult:
        c = self.call
        with Vertical(classes="dialog wide"):
            yield Label(f"Request {c['request_id'][:12]}, in flight", classes="title")
            with VerticalScroll():
                yield Static("\n".join(inflight_head(c)), markup=False, id="inspector-head")
                yield Label("rendered prompt (system)", classes="section")
                prompt = c.get("system_prompt") or (
                    "(none)" if c.get("combination_id") else "(not rendered yet)"
                )
                yield Static(prompt, markup=False, id="inspector-prompt")
                yield Label("messages", classes="section")
                lines = [f"{m.get('role', '?')}: {m.get('content')}" for m in c.get("messages") or []]
                yield Static("\n".join(lines) or "(not read yet)", markup=False, id="inspector-messages")
                yield Label("output so far", classes="section")
                yield Static(c.get("output") or "(nothing yet)", markup=False, id="inspector-output")
            yield Label("escape: close (open it again for what has happened since)", classes="hint")


class ExportScreen(ModalScreen[Path | None]):
    """Export a template as a package: the folder, progress by stage, then the result."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, template_id: str, folder: Path, export: Any) -> None:
        super().__init__(id="export")
        self.template_id = template_id
        self.folder = folder
        # async (template_id, folder) -> Path: the gateway builds the package, and it lands in folder
        self.export_fn = export
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
        self.query_one("#export-progress", ProgressBar).update(total=None)  # working: no stages to count
        self.query_one("#export-status", Static).update("building the package …")
        self.run_worker(self.run_export(Path(folder).expanduser()), group="export", exit_on_error=False)

    async def run_export(self, folder: Path) -> None:
        try:
            path = await self.export_fn(self.template_id, folder)
        except Exception as exc:
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self._done(None, message)
            return
        self._done(path, None)

    def _done(self, path: Path | None, error: str | None) -> None:
        self.busy = False
        if path is not None:
            self.result = path
            self.query_one("#export-progress", ProgressBar).update(total=4, progress=4)
            self.query_one("#export-status", Static).update(f"done: {path}")
        else:
            self.query_one("#export-go", Button).disabled = False
            self.query_one("#export-progress", ProgressBar).update(total=4, progress=0)
            self.query_one("#export-status", Static).update(f"failed: {error}")

    @on(Button.Pressed, "#export-close")
    def action_close(self) -> None:
        if not self.busy:
            self.dismiss(self.result)
