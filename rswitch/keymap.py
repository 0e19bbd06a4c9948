"""Every key of the operator console, once: its stable id (remappable under `tui.keys`),
default keys, the action it runs, its footer title and what it does. Plain data with no console
imports, so one table generates the console's bindings, help screen and command palette
(rswitch/tui) and config validation of `tui.keys` (rswitch/config.py) alike.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    id: str
    keys: str
    action: str
    title: str
    description: str
    footer: bool = True
    palette: bool = True


KEYS = (
    Key("reweight_up", "plus,equals_sign", "reweight(1)", "Weight +",
        "raise the selected combination's weight by 1 (routing follows at once)"),
    Key("reweight_down", "minus", "reweight(-1)", "Weight −", "lower it by 1"),
    Key("toggle", "e", "toggle", "Enable/disable", "enable or disable the selected combination"),
    Key("reset_weights", "r", "reset", "Reset weights", "every weight and state back to the config's"),
    Key("optimize", "o", "optimize", "Optimize",
        "optimize the selected combination's template (progress in the Optimizer tab)"),
    Key("cancel_optimize", "c", "cancel_optimize", "Cancel optimize", "cancel the running optimization"),
    Key("export", "x", "export", "Export", "export the selected template as a package"),
    Key("compare", "m", "compare", "Compare",
        "compare candidate models on the selected template's labelled rows (results in the Compare tab)"),
    Key("apply_compare", "a", "apply_compare", "Apply compare",
        "the last comparison's recommended combination takes its template's traffic (reset weights undoes it)"),
    Key("inspect", "i", "inspect", "Inspect", "open the selected recent request attempt (or the newest)"),
    Key("filter", "slash", "filter", "Filter", "filter the combinations table (escape clears)"),
    Key("theme", "t", "next_theme", "Theme", "switch to the next theme"),
    Key("help", "f1,question_mark", "help", "Help", "this screen"),
    Key("quit", "q", "quit", "Quit", "quit: drains the recorder and stops the workers", palette=False),
    Key("tab_throughput", "1", "tab('throughput')", "Throughput", "show the Throughput pane",
        footer=False, palette=False),
    Key("tab_latency", "2", "tab('latency')", "Latency", "show the Latency pane", footer=False, palette=False),
    Key("tab_cost", "3", "tab('cost')", "Cost", "show the Cost pane", footer=False, palette=False),
    Key("tab_optimizer", "4", "tab('optimizer')", "Optimizer", "show the Optimizer pane",
        footer=False, palette=False),
    Key("tab_compare", "5", "tab('compare')", "Compare", "show the Compare pane", footer=False, palette=False),
)  # fmt: skip
KEY_IDS = tuple(k.id for k in KEYS)


def key_rows(keymap: dict[str, str]) -> list[tuple[str, str, str]]:
    """(id, the keys bound now, what it does), with the operator's `tui.keys` applied."""
    return [(k.id, keymap.get(k.id, k.keys), k.description) for k in KEYS]
