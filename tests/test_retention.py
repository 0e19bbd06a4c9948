"""Retention keeps ground truth: traffic trims unlabelled rows; labelled rows (imported, labelled
by feedback, a reference combination's answers) only go past `dataset.max_labelled_records`."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.storage.datasets import TRIM, DatasetStore, open_dataset
from rswitch.storage.record import CallRecord
from tests.conftest import BASE_CONFIG, SUPPORT_VARS, chat, merge

runner = CliRunner()


def config_file(tmp_path: Path, override: dict[str, Any]) -> Path:
    """The same config the in-process gateway runs, as a file for the CLI."""
    data = merge(BASE_CONFIG, override)
    data.setdefault("dataset", {})["base_path"] = str(tmp_path / "prompts")
    data.setdefault("analytics", {})["path"] = str(tmp_path / "analytics.duckdb")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def import_labels(tmp_path: Path, cfg: Path, n: int) -> None:
    src = tmp_path / "labelled.jsonl"
    src.write_text(
        "".join(
            json.dumps({"input": f"imported {i}", "variables": SUPPORT_VARS, "expected": f"answer {i}"})
            + "\n"
            for i in range(n)
        )
    )
    r = runner.invoke(app, ["dataset", "import", "support", str(src), "-c", str(cfg)])
    assert r.exit_code == 0, r.output


def inputs(rows: list[dict[str, Any]]) -> list[str]:
    return [json.loads(r["messages"])[-1]["content"] for r in rows]


async def traffic(gw: Any, n: int, prefix: str = "q", **extra: Any) -> list[str]:
    """n answered requests, written in separate batches so retention runs as they accumulate."""
    ids = []
    for i in range(n):
        r = await gw.post(chat(f"{prefix}{i}", variables=SUPPORT_VARS, **extra))
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-rswitch-request-id"])
        if i % 5 == 4:
            gw.flush()
    return ids


async def test_traffic_past_max_records_keeps_every_imported_label(make_gateway, tmp_path):
    override = {"dataset": {"max_records": 20}}
    gw = await make_gateway(override)
    await traffic(gw, 3, prefix="early")
    gw.flush()  # the writer has the dataset open (and its counts taken) before the import
    import_labels(tmp_path, config_file(tmp_path, override), 8)  # `dataset import` while it serves
    await traffic(gw, 60, model="support-a")

    rows = gw.dataset_rows("support")
    labelled = [r for r in rows if r["origin"] == "import"]
    assert sorted(r["label_expected"] for r in labelled) == sorted(f"answer {i}" for i in range(8))
    unlabelled = [r for r in rows if r["origin"] == "gateway"]
    assert inputs(unlabelled) == [f"q{i}" for i in range(40, 60)]  # the newest max_records
    assert gw.core.datasets.counts("support") == {"unlabelled": 20, "labelled": 8}


async def test_a_row_labelled_by_feedback_after_it_was_written_is_kept(make_gateway):
    gw = await make_gateway({"dataset": {"max_records": 5}})
    [first, second] = await traffic(gw, 2, prefix="keep", model="support-a")
    gw.flush()
    for rid, body in ((first, {"score": 1}), (second, {"comment": "look at this one"})):
        fb = await gw.client.post("/v1/feedback", json={"request_id": rid, **body})
        assert fb.status_code == 202
    # the label and the traffic behind it may share a batch with the row's trimming
    await traffic(gw, 30, model="support-a")

    rows = gw.dataset_rows("support")
    kept = {r["request_id"]: r for r in rows if r["label_source"] == "feedback"}
    assert set(kept) == {first, second} and kept[first]["label_score"] == 1.0
    assert inputs([r for r in rows if r["request_id"] not in kept]) == [f"q{i}" for i in range(25, 30)]


async def test_reference_combination_answers_are_kept_as_labels(make_gateway):
    gw = await make_gateway(
        {
            "dataset": {"max_records": 5},
            "gateway": {"optimization": {"reference_combinations": ["support-b"]}},
        }
    )
    await traffic(gw, 4, prefix="ref", metadata={"combination_id": "support-b"})
    await traffic(gw, 20, metadata={"combination_id": "support-a"})

    rows = gw.dataset_rows("support")
    assert inputs([r for r in rows if r["combination_id"] == "support-b"]) == [f"ref{i}" for i in range(4)]
    assert inputs([r for r in rows if r["combination_id"] == "support-a"]) == [f"q{i}" for i in range(15, 20)]


async def test_labelled_rows_past_their_own_cap_go_oldest_first(make_gateway, tmp_path):
    override = {"dataset": {"max_records": 50, "max_labelled_records": 10}}
    gw = await make_gateway(override)
    import_labels(tmp_path, config_file(tmp_path, override), 8)
    ids = await traffic(gw, 6, model="support-a")
    gw.flush()
    for rid in ids:
        assert (
            await gw.client.post("/v1/feedback", json={"request_id": rid, "expected": "yes"})
        ).status_code == 202
    gw.flush()

    rows = gw.dataset_rows("support")
    assert sorted(r["label_expected"] for r in rows if r["origin"] == "import") == [
        f"answer {i}" for i in range(4, 8)
    ]
    assert [r["request_id"] for r in rows if r["label_source"] == "feedback"] == ids
    assert gw.core.datasets.counts("support") == {"unlabelled": 0, "labelled": 10}


def test_no_labelled_cap_when_it_is_null(tmp_path):
    cfg = config_file(tmp_path, {"dataset": {"max_records": 2, "max_labelled_records": None}})
    r = runner.invoke(app, ["config", "check", str(cfg)])
    assert r.exit_code == 0, r.output
    store = DatasetStore(tmp_path / "prompts", 2, None)
    store.import_rows(
        "t", [{"messages": [{"role": "user", "content": str(i)}], "expected": "x"} for i in range(50)]
    )
    store.write([record(f"r{i}") for i in range(10)])
    assert store.counts("t") == {"unlabelled": 2, "labelled": 50}
    store.close()


def test_a_bad_labelled_cap_is_refused_by_config_check(tmp_path):
    cfg = config_file(tmp_path, {"dataset": {"max_labelled_records": 0}})
    r = runner.invoke(app, ["config", "check", str(cfg)])
    assert r.exit_code != 0 and "dataset.max_labelled_records" in r.output


def record(request_id: str, combination_id: str = "c") -> CallRecord:
    return CallRecord(
        request_id,
        time.time(),
        "t",
        combination_id,
        "p",
        "m",
        "",
        [{"role": "user", "content": "x"}],
        {},
        "o",
        True,
    )


@pytest.mark.parametrize("labelled", [0, 1])
def test_trimming_walks_an_index_not_the_table(tmp_path, labelled):
    """Retention runs in the writer thread with every batch: it must not scan the table."""
    conn = open_dataset(tmp_path / "d.sqlite")
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + TRIM, (labelled, 5)))
    assert "USING COVERING INDEX examples_labelled" in plan and "SCAN" not in plan, plan
    conn.close()


def test_labels_in_a_dataset_from_before_the_flag_are_protected(tmp_path):
    store = DatasetStore(tmp_path, 100)
    store.write([record("old-labelled"), record("old-plain")])
    store.close()
    conn = sqlite3.connect(tmp_path / "t" / "dataset.sqlite")  # as an older rswitch left it: no flag
    conn.execute("DROP INDEX examples_labelled")
    conn.execute("ALTER TABLE examples DROP COLUMN labelled")
    conn.execute(
        "UPDATE examples SET label_score = 1, label_source = 'feedback' WHERE request_id = 'old-labelled'"
    )
    conn.commit()
    conn.close()

    store = DatasetStore(tmp_path, 1)
    store.write([record(f"new{i}") for i in range(3)])
    assert [r["request_id"] for r in reversed(store.recent("t"))] == ["old-labelled", "new2"]
    store.close()


def test_processes_opening_a_new_dataset_at_once_all_succeed(tmp_path):
    """The gateway's writer creating a dataset while `dataset import` opens it (seen as
    'duplicate column name: label_source')."""
    path = tmp_path / "t" / "dataset.sqlite"
    start = threading.Barrier(8)
    problems: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            open_dataset(path).close()
        except BaseException as exc:
            problems.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []


def test_an_import_past_the_labelled_cap_keeps_the_newest_labels_at_once(tmp_path):
    store = DatasetStore(tmp_path / "prompts", 100, 5)
    store.import_rows(
        "support",
        [{"messages": [{"role": "user", "content": f"q{i}"}], "expected": f"a{i}"} for i in range(8)],
    )
    assert store.counts("support") == {"unlabelled": 0, "labelled": 5}  # no traffic needed to trim
    kept = [r["label_expected"] for r in store.recent("support", 100)]
    store.close()
    assert sorted(kept) == [f"a{i}" for i in range(3, 8)]
