"""The console's model: what each pane shows, computed from snapshots without Textual."""

from __future__ import annotations

import subprocess
import sys

from rswitch.tui import model
from rswitch.tui.model import History, Traffic


def perf(requests: int, cost: float = 0.0, p50: float | None = 100.0) -> dict:
    return {
        "requests": requests,
        "requests_per_s": 1.0,
        "success_rate": 1.0,
        "p50_latency_ms": p50,
        "p95_latency_ms": None if p50 is None else p50 * 2,
        "p99_latency_ms": None if p50 is None else p50 * 3,
        "cost": cost,
        "quality": None,
        "since_start": {"requests": requests, "errors": 0, "cost": cost, "tokens": 0},
    }


def combo(cid: str, p: dict, **kw) -> dict:
    return {
        "id": cid,
        "template_id": kw.get("template", "support-reply"),
        "model": kw.get("model", "smollm2-135m-instruct"),
        "provider": "local",
        "weight": 1,
        "effective_weight": 1,
        "enabled": True,
        "demoted": False,
        "performance": p,
    }


def status(combos: list[dict], traffic: dict | None = None) -> dict:
    out = {"strategy": "weighted_round_robin", "combinations": combos, "recorder": {}}
    if traffic is not None:
        out["traffic"] = traffic
    return out


def test_the_model_does_not_import_textual():
    code = "import sys, rswitch.tui.model, rswitch.tui.keys; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_costs_keep_their_significant_digits():
    assert model.fmt_cost(0.000042) == "0.000042"
    assert model.fmt_cost(0.0000199) == "0.000020"
    assert model.fmt_cost(0.36) == "0.36"
    assert model.fmt_cost(12.5) == "12.50"
    assert model.fmt_cost(0) == "0" and model.fmt_cost(None) == "-"
    assert model.fmt_cost(3e-12) == "3.0e-12"
    row = model.combination_row(combo("c", perf(1000, cost=0.042)))
    assert row["$/req"] == "0.000042"  # 4.2e-5 a request, not 0.00004 or 0.000


def test_columns_hide_least_important_first_and_never_success_or_p50():
    rows = {
        f"support-{i}": model.combination_row(combo(f"support-{i}", perf(10, 0.01)), "v2") for i in range(3)
    }
    assert model.visible_columns(rows, 400) == list(model.COLUMN_KEYS)
    order = [c.key for c in sorted((c for c in model.COLUMNS if c.drop), key=lambda c: c.drop or 0)]
    shown_before = list(model.COLUMN_KEYS)
    for width in range(400, 0, -1):
        shown = model.visible_columns(rows, width)
        assert "success" in shown and "p50 ms" in shown
        hidden = [k for k in model.COLUMN_KEYS if k not in shown]
        assert set(hidden) == set(order[: len(hidden)]), f"at {width} columns the wrong ones hide: {hidden}"
        assert shown == [k for k in shown_before if k in shown]  # the order on screen never changes
        shown_before = shown
    assert model.visible_columns(rows, 10) == ["success", "p50 ms"]


def test_missing_traffic_counts_as_zero_and_rates_come_from_deltas():
    h = History()
    h.record(10.0, status([]))
    assert Traffic.of(status([])) == Traffic()
    h.record(12.0, status([], {"requests": 8, "failed": 2, "attempts": 14, "attempt_errors": 6}))
    assert h.rates[-1] == (12.0, 4.0, 1.0, 7.0)
    h.record(13.0, status([], {"requests": 1, "failed": 0, "attempts": 1, "attempt_errors": 0}))
    assert h.rates[-1] == (13.0, 0.0, 0.0, 0.0)  # a restarted counter is not a negative rate
    text = model.summary_text(
        "http://x",
        status([], {"requests": 40, "failed": 1, "attempts": 88, "attempt_errors": 49})
        | {"recorder": {"written": 1, "dropped": 0, "queue_depth": 0}},
        h,
    )
    assert "requests 40 (failed 1)" in text and "attempts 88 (errors 49)" in text


def test_the_latency_chart_follows_each_combinations_own_history():
    h = History()
    for i in range(5):
        h.record(float(i), status([combo("a", perf(1, p50=100.0 + i)), combo("b", perf(1, p50=900.0))]))
    a = dict(model.latency_series(h, "a"))["p50"]
    b = dict(model.latency_series(h, "b"))["p50"]
    assert [v for _, v in a] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert [v for _, v in b] == [900.0] * 5  # not a's history under b's title
    assert model.latency_series(h, None) == [("p50", []), ("p95", []), ("p99", [])]
    h.record(5.0, status([combo("b", perf(1))]))  # 'a' was removed from the config
    assert "a" not in h.latency


def test_idle_and_live_charts_have_no_negative_axes_or_minus_zero():
    idle = model.chart([("requests/s", [])], now=100.0)
    assert idle.lines == [] and idle.ylim == (0.0, 1.0) and idle.xlim[1] == 0.0
    assert all(not label.startswith("-") for label in idle.xlabels) and idle.xlabels[-1] == "0"
    live = model.chart([("p50", [(99.0, 5.0), (100.0, 7.0), (100.0, None)])], now=100.0)
    (name, xs, ys) = live.lines[0]
    assert xs == [-1.0, 0.0] and str(xs[-1]) == "0.0" and ys == [5.0, 7.0]
    assert live.ylim[0] == 0.0 and live.ylim[1] > 7.0
    old = model.chart([("x", [(0.0, 1.0)])], now=200.0)
    assert old.xlim == (-200.0, 0.0) and old.xlabels == ["200", "150", "100", "50", "0"]


def test_a_fallback_is_two_rows_with_unique_keys():
    recent = [
        {"request_id": "r1", "attempt": 1, "created_at": 1.0, "combination_id": "bad", "success": False,
         "status": 503, "duration_ms": 3.0},
        {"request_id": "r1", "attempt": 2, "created_at": 2.0, "combination_id": "good", "success": True,
         "status": 200, "duration_ms": 9.0},
        {"request_id": "r2", "created_at": 3.0, "combination_id": "good", "success": True, "status": 200,
         "duration_ms": 9.0},
    ]  # fmt: skip
    rows = model.recent_rows(recent + recent[:1])
    assert [r.key for r in rows] == ["r2#1", "r1#2", "r1#1", "r1#1.2"]
    assert [(r.request_id, r.attempt) for r in rows[:3]] == [("r2", 1), ("r1", 2), ("r1", 1)]
    assert rows[2].cells[1:] == ("503 ✗", "3", "1", "bad")


def test_optimizer_pane_shows_the_stage_and_names_every_instruction():
    opt = {"enabled": True, "running": "echo", "stage": "bootstrapping demos", "calls": 12, "cost": 0.000042}
    lines = model.optimizer_lines(opt)
    assert lines[0].startswith(
        "optimizer: running 'echo' — bootstrapping demos (12 model calls, $0.000042 so far)"
    )
    assert any("best so far: the highest full-validation score" in line for line in lines)
    t = {"trial": 0, "instruction": 0, "instruction_text": "Answer with one word.", "demo_set": 1,
         "minibatch_score": 0.5, "full_score": None, "best_score": 0.4, "calls": 30, "cost": 0.000042}  # fmt: skip
    row = model.trial_row(t)
    assert row[1] == "#0 Answer with one word." and row[3:] == ("0.500", "-", "0.400")
    assert model.instruction_label({"instruction": 0}) == "#0 (the current instruction)"
    assert model.optimizer_lines({"enabled": False}) == ["optimizer: off"]


def test_the_summary_packs_whole_items_and_drops_the_least_important_first():
    s = status([], {"requests": 5, "failed": 0, "attempts": 6, "attempt_errors": 1}) | {
        "recorder": {"written": 6, "dropped": 0, "queue_depth": 0}
    }
    items = [text for _, text in model.summary_items("http://127.0.0.1:8080", s, History(), "sum")]
    wide = model.summary_lines("http://127.0.0.1:8080", s, History(), 400, "sum")
    assert wide == [model.SUMMARY_GAP.join(items)]
    for width in (40, 60, 78, 120):
        lines = model.summary_lines("http://127.0.0.1:8080", s, History(), width, "sum")
        assert 1 <= len(lines) <= model.SUMMARY_LINES
        shown = [item for line in lines for item in line.split(model.SUMMARY_GAP)]
        assert all(item in items for item in shown)  # whole items only
        assert "requests 5 (failed 0)" in shown and "attempts 6 (errors 1)" in shown
        assert all(len(line) <= width for line in lines)
    narrow = model.summary_lines("http://127.0.0.1:8080", s, History(), 40, "sum")
    assert not any("strategy" in line for line in narrow)  # the first to go


def test_keys_that_cannot_apply_to_rows_the_gateway_made_say_why():
    configured = combo("support-a", perf(1))
    passthrough = combo("openai/gpt-4", perf(1), model="gpt-4", template="_passthrough") | {
        "implicit": True,
        "kind": "passthrough",
        "provider": "openai",
    }
    default = combo("faq@default", perf(1), template="faq") | {"implicit": True, "kind": "default"}
    for action in ("reweight", "toggle", "optimize", "export"):
        assert model.not_for(configured, action) is None
        assert model.not_for(passthrough, action).startswith("openai/gpt-4 is a pass-through route")
    assert "no weight to change" in model.not_for(default, "reweight")
    assert model.not_for(default, "toggle") and model.not_for(default, "optimize") is None
    assert model.not_for(default, "export") is None  # its template is real
    row = model.combination_row(passthrough)
    assert (row["model"], row["template"], row["weight"], row["state"]) == (
        "gpt-4 (pass-through)",
        "—",
        "—",
        "pass-through",
    )
    assert model.matches(passthrough, "pass-through") and not model.matches(configured, "pass-through")
