"""Labels for recorded rows: POST /v1/feedback, and `rswitch dataset import/show/export`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.storage.datasets import open_dataset
from tests.conftest import SUPPORT_VARS, chat

runner = CliRunner()


async def test_feedback_labels_the_answered_row(gateway):
    r = await gateway.post(chat("where is it?", model="support-a", variables=SUPPORT_VARS))
    rid = r.headers["x-rswitch-request-id"]
    fb = await gateway.client.post(
        "/v1/feedback",
        json={"request_id": rid, "score": 0.25, "expected": "It is in Paris.", "comment": "too vague"},
    )
    assert fb.status_code == 202 and fb.json() == {
        "status": "accepted",
        "request_id": rid,
        "template_id": "support",
    }
    [row] = gateway.dataset_rows("support")
    assert (row["label_score"], row["label_expected"], row["label_comment"], row["label_source"]) == (
        0.25,
        "It is in Paris.",
        "too vague",
        "feedback",
    )
    assert row["labelled_at"]
    # a later, partial label keeps what it does not replace
    await gateway.client.post("/v1/feedback", json={"request_id": rid, "score": 1})
    [row] = gateway.dataset_rows("support")
    assert row["label_score"] == 1.0 and row["label_expected"] == "It is in Paris."


async def test_feedback_for_a_stream_and_after_a_restart_of_the_lookup(gateway):
    r = await gateway.post(chat("stream", model="support-a", variables=SUPPORT_VARS, stream=True))
    rid = r.headers["x-rswitch-request-id"]
    gateway.flush()
    gateway.core.recorder.recent_requests.clear()  # as after a restart: found through the datasets
    fb = await gateway.client.post("/v1/feedback", json={"request_id": rid, "expected": "x"})
    assert fb.status_code == 202
    assert gateway.dataset_rows("support")[0]["label_expected"] == "x"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"request_id": "nope", "score": 1}, 404, "unknown request id 'nope'"),
        ({"score": 1}, 400, "'request_id' is required"),
        ({"request_id": "x"}, 400, "at least one of"),
        ({"request_id": "x", "score": 1.5}, 400, "from 0 to 1"),
        ({"request_id": "x", "score": True}, 400, "from 0 to 1"),
        ({"request_id": "x", "expected": 5}, 400, "'expected' must be a string"),
    ],
)
async def test_bad_feedback_is_refused(gateway, body, status, fragment):
    r = await gateway.client.post("/v1/feedback", json=body)
    assert r.status_code == status and fragment in r.json()["error"]["message"]


def test_old_datasets_gain_label_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE examples (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, created_at TEXT NOT NULL)"
    )
    conn.execute("INSERT INTO examples (request_id, created_at) VALUES ('r1', 'then')")
    conn.commit()
    conn.close()
    conn = open_dataset(path)
    cols = {r[1] for r in conn.execute("PRAGMA table_info(examples)")}
    assert {"label_expected", "label_score", "origin", "labelled"} <= cols
    assert conn.execute("SELECT request_id, origin, labelled FROM examples").fetchall() == [
        ("r1", "gateway", 0)
    ]


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "templates": {"classify": {"template": "Classify into {labels}."}},
                "dataset": {"base_path": "prompts"},
                "analytics": {"path": "a.duckdb"},
            }
        )
    )
    return path


def test_dataset_import_show_export(cfg_file, tmp_path):
    src = tmp_path / "labelled.jsonl"
    lines = [
        {"input": "I was charged twice", "variables": {"labels": "billing, login"}, "expected": "billing"},
        {
            "messages": [{"role": "user", "content": "cannot sign in"}],
            "variables": {"labels": "billing, login"},
            "expected": "login",
        },
        {"input": "hello", "score": 0.5},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = runner.invoke(app, ["dataset", "import", "classify", str(src), "-c", str(cfg_file)])
    assert r.exit_code == 0 and "imported 3 example(s) into 'classify' (3 labelled)" in r.output, r.output

    r = runner.invoke(app, ["dataset", "show", "classify", "-c", str(cfg_file), "--labelled"])
    assert r.exit_code == 0 and "'billing'" in r.output and "cannot sign in" in r.output

    out = tmp_path / "export.jsonl"
    r = runner.invoke(app, ["dataset", "export", "classify", "-c", str(cfg_file), "-o", str(out)])
    assert r.exit_code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [row["label_expected"] for row in rows] == ["billing", "login", None]
    assert rows[0]["messages"] == [{"role": "user", "content": "I was charged twice"}]
    assert rows[2]["label_score"] == 0.5 and all(row["origin"] == "import" for row in rows)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", ":2: not valid JSON"),
        ('{"variables": {}}', ":2: give 'messages' or a non-empty 'input'"),
        ('{"input": "x", "score": 7}', ":2: 'score' must be a number from 0 to 1"),
        ('{"messages": []}', ":2: 'messages' must be a non-empty array"),
        ('{"input": "x", "expected": 3}', ":2: 'expected' must be a string"),
    ],
)
def test_dataset_import_refuses_bad_lines_and_imports_nothing(cfg_file, tmp_path, line, fragment):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"input": "fine", "expected": "a"}\n' + line + "\n")
    r = runner.invoke(app, ["dataset", "import", "classify", str(src), "-c", str(cfg_file)])
    assert r.exit_code != 0 and fragment in r.output and "nothing imported" in r.output
    assert not (tmp_path / "prompts" / "classify" / "dataset.sqlite").exists()


def test_dataset_commands_name_unknown_templates(cfg_file):
    r = runner.invoke(app, ["dataset", "show", "ghost", "-c", str(cfg_file)])
    assert r.exit_code != 0 and "unknown template id 'ghost'" in r.output
