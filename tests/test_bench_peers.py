"""benchmarks/bench_optimizer_peers.py without DSPy: the rows handed to a peer are rswitch's own
split, calls are counted per peer from the analytics store (HTTP calls by client key, the
in-process optimizer's by kind), rswitch's side runs end to end on the mock provider, and the
table says what the seeds said."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from rswitch.config import parse_config
from rswitch.core import Core
from rswitch.optimizer.data import load_examples, split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_optimizer_peers as peers  # noqa: E402

pytestmark = pytest.mark.slow

TASK = peers.TASKS["intent-bench"]
MOCK = {"type": "mock", "mock": {"response": "Weather."}}


def labelled_inputs() -> list[str]:
    lines = TASK.labelled.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["input"] for line in lines if line.strip()]


async def started(tmp_path: Path, keys: dict[str, str]) -> Core:
    core = Core(parse_config(peers.config_data(tmp_path, TASK, keys, provider=MOCK)))
    await core.start()
    return core


async def test_peers_get_rswitch_split_the_searched_validation_rows_and_the_newest_test_rows(
    tmp_path: Path,
) -> None:
    core = await started(tmp_path, {})
    try:
        core.datasets.import_rows(TASK.template_id, peers.read_rows(TASK.labelled))
        rows = peers.handoff(core, TASK, seed=1, max_val=60)
        other = peers.handoff(core, TASK, seed=2, max_val=60)
        own = split(load_examples(core.datasets, TASK.template_id), seed=1)
    finally:
        await core.stop()
    ids = {k: [r["row_id"] for r in v] for k, v in rows.items()}
    assert ids["train"] == [e.row_id for e in own.train]
    assert ids["val"] == [e.row_id for e in own.val[:60]]  # what rswitch's search scores on
    assert ids["test"] == [e.row_id for e in own.test]
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (162, 60, 65)
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["test"]) & set(ids["train"] + ids["val"])
    # the test rows are CLINC's own test sentences, the file's last 65, whatever the seed
    assert [r["user"] for r in rows["test"]] == labelled_inputs()[-65:]
    assert other["test"] == rows["test"] and other["train"] != rows["train"]
    first = rows["val"][0]
    assert first["variables"] == {"labels": "weather, alarm, flight, calories, traffic"}
    assert first["expected"] in {"weather", "alarm", "flight", "calories", "traffic"}


async def test_calls_and_tokens_are_counted_per_peer_from_the_analytics_store(tmp_path: Path) -> None:
    keys = peers.peer_keys(["rswitch", "dspy-mipro"])
    assert set(keys) == {"dspy-mipro", "dspy-mipro-test"}
    core = await started(tmp_path, keys)
    combo = core.gateway.combinations["rswitch"]
    body = {"model": peers.MODEL, "messages": [{"role": "user", "content": "will it rain in Oslo"}]}
    try:
        async with peers.served(core) as url, httpx.AsyncClient(base_url=url) as http:
            for name, n in (("dspy-mipro", 3), ("dspy-mipro-test", 2)):
                for _ in range(n):
                    r = await http.post(
                        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {keys[name]}"}
                    )
                    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Weather."
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 401  # no key
            for kind, n in (("optimizer", 4), ("benchmark", 1)):
                for _ in range(n):
                    await core.gateway.call_direct(combo, body["messages"], {}, kind=kind)
    finally:
        await core.stop()
    counted = peers.usage(tmp_path / "analytics.duckdb")
    assert {who: c["calls"] for who, c in counted.items()} == {
        "dspy-mipro": 3,
        "dspy-mipro-test": 2,
        "rswitch": 4,
        "rswitch-test": 1,
    }
    # the mock counts a word a token: 5 words asked, 1 answered, per call
    assert counted["dspy-mipro"]["prompt_tokens"] == 15 and counted["dspy-mipro"]["completion_tokens"] == 3
    assert all(c["failed"] == 0 for c in counted.values())


async def test_rswitch_side_end_to_end_on_the_mock_scores_the_test_rows_and_counts_its_calls() -> None:
    args = argparse.Namespace(peers=["rswitch"], quick=True, verbose=False)
    live: list[int] = []
    seed = await peers.one_seed(
        TASK, 0, args, provider=MOCK, on_peer=lambda r: live.append(r["peers"]["rswitch"]["usage_calls"])
    )
    res, test = seed["peers"]["rswitch"], seed["test_expected"]
    assert live == [res["usage_calls"]]  # counted while the core still ran: nothing was missing
    assert seed["sizes"]["test"] == len(test) == len(res["answers"]) == len(seed["row_ids"]["test"]) > 0
    assert all(a == "Weather." for a in res["answers"])
    # "Weather." is the label exactly, ignoring case and punctuation, for the weather rows only
    assert res["test_score"] == pytest.approx(sum(e == "weather" for e in test) / len(test))
    assert 0 < res["test_score"] < 1
    assert res["usage_calls"] == sum(res["own_calls"].values()) > 0  # the store agrees with the run
    assert res["test_usage"]["calls"] == len(test)


def test_the_same_metric_scores_every_peer() -> None:
    assert peers.test_score(TASK, "Weather.", "weather") == 1.0
    assert peers.test_score(TASK, "weather, alarm", "weather") == 0.0
    assert peers.test_score(TASK, "The weather is fine", "weather") == 0.0
    extract = peers.TASKS["extract-bench"]
    assert (
        peers.test_score(extract, '{"city": "Oslo", "date": "monday"}', '{"city": "oslo", "date": "friday"}')
        == 0.5
    )
    assert peers.test_score(extract, "no json here", '{"city": "oslo"}') == 0.0


def test_dspy_starts_from_the_same_seed_instruction_naming_its_input_fields() -> None:
    assert (
        peers.dspy_instruction("Which of these topics is the user's message about: {labels}?\n")
        == "Which of these topics is the user's message about: `labels`?"
    )
    assert (
        peers.dspy_instruction("Reply as JSON {{like this}} for {city}.")
        == "Reply as JSON {like this} for `city`."
    )


def test_table_gives_mean_sd_per_seed_scores_calls_tokens_and_wall_time() -> None:
    def run(score: float, calls: int, wall: float) -> dict[str, Any]:
        return {"test_score": score, "usage_calls": calls, "usage_prompt_tokens": 10 * calls,
                "usage_completion_tokens": calls, "wall_seconds": wall}  # fmt: skip

    seeds = [
        {"seed": 0, "peers": {"rswitch": run(0.4, 400, 100), "dspy-mipro": run(0.7, 600, 300)}},
        {"seed": 1, "peers": {"rswitch": run(0.6, 500, 200), "dspy-mipro": run(0.5, 600, 500)}},
    ]
    seeds[0]["failed"] = {"dspy-gepa": "RuntimeError: dspy-gepa worker failed (exit 1)"}
    lines = peers.table(TASK, seeds).splitlines()
    assert lines[0].startswith("| optimizer | test accuracy (mean ± sd) | per seed (0, 1) | model calls |")
    assert lines[2] == "| rswitch | 50.0 ± 14.1 | 40.0 / 60.0 | 450 ± 71 | 4950 ± 778 | 150 ± 71 |"
    assert lines[3] == "| dspy-mipro | 60.0 ± 14.1 | 70.0 / 50.0 | 600 ± 0 | 6600 ± 0 | 400 ± 141 |"
    assert lines[4] == "| dspy-gepa | – | failed / – | – | – | – |"  # a failure is shown, not dropped
    # an optimizer run on one seed only: its value, not a spread of 0; rows in rswitch-first order
    seeds[1]["peers"]["rswitch-reflective"] = run(0.1, 200, 50)
    lines = peers.table(TASK, seeds).splitlines()
    assert (
        lines[3]
        == "| rswitch-reflective | 10.0 (1 seed) | – / 10.0 | 200 (1 seed) | 2200 (1 seed) | 50 (1 seed) |"
    )


def test_rswitch_never_imports_dspy() -> None:
    """DSPy is the benchmark's extra: serving, the console and the optimizer run without it."""
    import subprocess

    code = (
        "import sys, rswitch.cli, rswitch.server, rswitch.core, rswitch.optimizer.service, "
        "rswitch.optimizer.reflective; print(sorted(m for m in sys.modules if m.split('.')[0] in ('dspy', 'litellm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _seed(seed: int, rows: list[int], **runs: dict[str, Any]) -> dict[str, Any]:
    return {"seed": seed, "row_ids": {"test": rows}, "sizes": {"train": 2, "val": 1, "test": len(rows)},
            "peers": runs, "failed": {}}  # fmt: skip


def _run(score: float, calls: int) -> dict[str, Any]:
    return {"test_score": score, "usage_calls": calls, "wall_seconds": 1.0, "answers": []}


def test_merge_joins_runs_of_the_same_splits_and_versus_says_who_won_each_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = {"task": "intent-bench", "commit": "aaa", "threads": 1, "quick": False,
             "seeds": [_seed(0, [1, 2], rswitch=_run(0.9, 400)), _seed(1, [3, 4], rswitch=_run(0.7, 450))]}  # fmt: skip
    later = {"task": "intent-bench", "commit": "bbb", "threads": 1, "quick": False,
             "seeds": [_seed(0, [1, 2], **{"dspy-mipro": _run(0.6, 1000)}),
                       _seed(1, [3, 4], **{"dspy-mipro": _run(0.8, 900)})]}  # fmt: skip
    files = []
    for name, record in (("a.json", first), ("b.json", later)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(record))
    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["x", "--merge", *map(str, files), "--markdown", str(out)])
    peers.main()
    text = out.read_text()
    assert "| rswitch | 80.0 ± 14.1 | 90.0 / 70.0 |" in text
    assert "| dspy-mipro | 70.0 ± 14.1 | 60.0 / 80.0 |" in text
    # seed 1 is lost by 10 points: the verdict says so, whatever the mean says
    assert "seed 0 +30.0 points, 400 vs 1000 calls; seed 1 -10.0 points, 450 vs 900 calls" in text
    assert "NOT at least as good with no more calls on every seed" in text
    assert "--merge a.json b.json" in text and "aaa, bbb" in text

    later["seeds"][1]["row_ids"] = {"test": [5, 6]}  # another split: refused, nothing written
    files[1].write_text(json.dumps(later))
    out.unlink()
    with pytest.raises(SystemExit, match="seed 1's rows differ in b.json"):
        peers.main()
    assert not out.exists()
    assert peers.merge([first], ["a.json"]) is first  # one run is printed with its own command
    with pytest.raises(SystemExit, match="seed 0 has rswitch in more than one run"):
        peers.merge([first, first], ["a.json", "a2.json"])


def test_merge_can_take_some_optimizers_of_a_run_so_a_rerun_replaces_them(tmp_path: Path) -> None:
    """An earlier run of rswitch and DSPy, and a later run of rswitch alone on the same splits:
    FILE:dspy-mipro keeps DSPy's rows of the first and the later rswitch rows replace its own."""
    both = {"task": "intent-bench", "commit": "aaa", "threads": 1, "quick": False,
            "seeds": [_seed(0, [1, 2], rswitch=_run(0.5, 400), **{"dspy-mipro": _run(0.6, 1000)})]}  # fmt: skip
    rerun = {"task": "intent-bench", "commit": "ccc", "threads": 1, "quick": False,
             "seeds": [_seed(0, [1, 2], rswitch=_run(0.9, 420))]}  # fmt: skip
    (tmp_path / "both.json").write_text(json.dumps(both))
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    with pytest.raises(SystemExit, match="seed 0 has rswitch in more than one run"):
        peers.merge(*peers.load_runs([str(tmp_path / "both.json"), str(tmp_path / "rerun.json")]))
    records, names = peers.load_runs([f"{tmp_path / 'both.json'}:dspy-mipro", str(tmp_path / "rerun.json")])
    assert names == ["both.json:dspy-mipro", "rerun.json"]
    record = peers.merge(records, names)
    runs = record["seeds"][0]["peers"]
    assert runs["rswitch"]["test_score"] == 0.9 and runs["dspy-mipro"]["test_score"] == 0.6
    assert record["seeds"][0]["from"] == {"dspy-mipro": "both.json:dspy-mipro", "rswitch": "rerun.json"}
    assert both["seeds"][0]["peers"]["rswitch"]["test_score"] == 0.5  # the file's record is not changed
    with pytest.raises(SystemExit, match="unknown optimizer dspy-typo"):
        peers.load_runs([f"{tmp_path / 'both.json'}:dspy-typo"])
    with pytest.raises(SystemExit, match="no seed of this run has dspy-gepa"):
        peers.load_runs([f"{tmp_path / 'both.json'}:dspy-gepa"])
    with pytest.raises(SystemExit, match="missing.json is not a file"):
        peers.load_runs([str(tmp_path / "missing.json")])


def test_versus_needs_no_more_calls_as_well_as_the_score() -> None:
    seeds = [_seed(0, [1], rswitch=_run(0.8, 1200), **{"dspy-mipro": _run(0.7, 1000)})]
    assert "NOT at least as good" in peers.versus(seeds)
    seeds[0]["peers"]["rswitch"]["usage_calls"] = 1000
    assert peers.versus(seeds).endswith("at least as good with no more calls on every seed.")
