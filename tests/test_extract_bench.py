"""extract-bench: the shipped JSON-extraction benchmark task (benchmarks/make_extract_bench.py).

The builder is deterministic and the shipped files are its output; the rows import with
`rswitch dataset import` and the optimizer's test split is exactly the held-out rows; and the
`json_fields` evaluator scores answers to real rows as a user would expect.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.optimizer.data import load_examples, split
from rswitch.optimizer.evaluators import build_evaluator
from rswitch.storage.datasets import DatasetStore
from rswitch.templates import TemplateRegistry, render

ROOT = Path(__file__).resolve().parent.parent
BUILDER = ROOT / "benchmarks" / "make_extract_bench.py"
SHIPPED = ROOT / "sample_prompts" / "extract-bench"
KEYS = ["number", "street", "city", "state", "zip"]

sys.path.insert(0, str(ROOT / "benchmarks"))
import make_extract_bench  # noqa: E402

runner = CliRunner()


def labelled() -> list[dict]:
    return [json.loads(line) for line in (SHIPPED / "labelled.jsonl").read_text().splitlines()]


def build_into(out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BUILDER), "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 300 labelled rows and 10 examples" in done.stdout


def test_the_builder_writes_the_same_bytes_every_time_and_they_are_the_shipped_files(tmp_path):
    build_into(tmp_path / "a")
    build_into(tmp_path / "b")
    for name in ("labelled.jsonl", "examples.jsonl"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes()
        assert first == (SHIPPED / name).read_bytes(), f"{name} is stale: rerun make_extract_bench.py"


def test_rows_are_extraction_questions_whose_answers_are_in_the_text():
    rows = labelled()
    assert len(rows) == 300
    inputs = [r["input"].lower() for r in rows]
    examples = [json.loads(line) for line in (SHIPPED / "examples.jsonl").read_text().splitlines()]
    shown = [e["messages"][0]["content"].lower() for e in examples]
    assert len(set(inputs + shown)) == 310  # no address twice, across both files
    for r in rows:
        assert r["variables"] == {"keys": "number, street, city, state, zip"}
        want = json.loads(r["expected"])
        assert list(want) == KEYS and all(isinstance(v, str) and v for v in want.values())
        for value in want.values():  # each value can be copied from the address as written
            assert value.lower() in r["input"].lower(), (value, r["input"])


def test_an_address_with_a_field_in_two_places_or_a_recipient_is_left_out():
    keep = make_extract_bench.ET.fromstring(
        "<AddressString><AddressNumber>22</AddressNumber> <StreetNamePreDirectional>W</StreetNamePreDirectional>"
        " <StreetName>Washington</StreetName> <StreetNamePostType>St,</StreetNamePostType>"
        " <OccupancyType>Ste</OccupancyType> <OccupancyIdentifier>4,</OccupancyIdentifier>"
        " <PlaceName>Chicago,</PlaceName> <StateName>IL</StateName> <ZipCode>60602</ZipCode></AddressString>"
    )
    assert make_extract_bench.parse_address(keep) == (
        "22 W Washington St, Ste 4, Chicago, IL 60602",
        {"number": "22", "street": "W Washington St", "city": "Chicago", "state": "IL", "zip": "60602"},
    )
    twice = make_extract_bench.ET.fromstring(
        "<AddressString><AddressNumber>645</AddressNumber> <StreetName>HARRISON</StreetName>"
        " <AddressNumber>645</AddressNumber> <StreetName>HARRISON</StreetName> <PlaceName>SF</PlaceName>"
        " <StateName>CA</StateName> <ZipCode>94107</ZipCode></AddressString>"
    )
    recipient = make_extract_bench.ET.fromstring(
        "<AddressString><Recipient>Joe</Recipient> <AddressNumber>1</AddressNumber> <StreetName>Z</StreetName>"
        " <PlaceName>Columbia</PlaceName> <StateName>MO</StateName> <ZipCode>65202</ZipCode></AddressString>"
    )
    assert make_extract_bench.parse_address(twice) is None
    assert make_extract_bench.parse_address(recipient) is None


def test_the_manifest_renders_with_the_rows_variables():
    templates, errors = TemplateRegistry.read_dir(ROOT / "sample_prompts")
    assert not errors
    bench = next(t for t in templates if t.id == "extract-bench")
    text = render(bench.template, labelled()[0]["variables"])
    assert (
        text
        == "Extract the address from the user's message as JSON with these keys: number, street, city, state, zip."
    )


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"m": {"type": "mock"}},
                "template_dirs": [str(ROOT / "sample_prompts")],
                "gateway": {
                    "combinations": [
                        {"id": "x", "template_id": "extract-bench", "model": "m", "provider": "m"}
                    ]
                },
                "dataset": {"base_path": str(tmp_path / "prompts")},
                "analytics": {"path": str(tmp_path / "analytics.duckdb")},
            }
        )
    )
    return path


def test_rswitch_dataset_import_takes_every_row_and_the_test_split_is_the_held_out_rows(cfg_file, tmp_path):
    r = runner.invoke(
        app, ["dataset", "import", "extract-bench", str(SHIPPED / "labelled.jsonl"), "-c", str(cfg_file)]
    )
    assert r.exit_code == 0, r.output
    assert "imported 300 example(s) into 'extract-bench' (300 labelled)" in r.output

    store = DatasetStore(tmp_path / "prompts", max_records=1000)
    try:
        examples = load_examples(store, "extract-bench")
    finally:
        store.close()
    assert len(examples) == 300
    held_out = {(r["input"], r["expected"]) for r in labelled()[-make_extract_bench.TEST_ROWS :]}
    for seed in (0, 1, 2):
        parts = split(examples, seed=seed)
        test = {(e.messages[0]["content"], e.expected) for e in parts.test}
        assert test == held_out
        seen = {e.messages[0]["content"] for e in parts.train + parts.val}
        assert not seen & {text for text, _ in held_out}


def score(output: str, row: dict) -> tuple[float, str]:
    s = asyncio.run(build_evaluator("json_fields").score(output=output, expected=row["expected"], inputs={}))
    return s.value, s.reason


def test_json_fields_scores_answers_to_real_rows_as_a_user_would_expect():
    rows = labelled()
    for row in (rows[0], rows[-1]):
        want = json.loads(row["expected"])
        # right: any key order, other case, pretty-printed, in a fence after prose
        shuffled = {k: want[k].upper() for k in reversed(KEYS)}
        right = "Here it is:\n```json\n" + json.dumps(shuffled, indent=2) + "\n```"
        assert score(right, row) == (1.0, "5/5 fields match")
        # partial: one field wrong, one missing → 3 of 5
        partial = {**want, "city": "Nowhere"}
        del partial["zip"]
        value, reason = score(json.dumps(partial), row)
        assert value == pytest.approx(0.6)
        assert reason == "3/5 fields match; missing: zip; different: city"
        # the number as a JSON number is not the label's string "...": a type mismatch counts as wrong
        as_number = {**want, "number": int(want["number"])} if want["number"].isdigit() else None
        if as_number is not None:
            assert score(json.dumps(as_number), row)[0] == pytest.approx(0.8)
        # invalid: prose, or JSON cut off by max_tokens, scores 0 and says why
        assert score("The address is " + row["input"], row) == (0.0, "no JSON object in the output")
        assert score(json.dumps(want)[:40], row) == (0.0, "no JSON object in the output")
