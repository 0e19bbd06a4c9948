"""The optimizer and packages with `storage: {backend: postgres}`, against a real Postgres server
(tests/servers.py): the optimizer learns from the rows in Postgres (the same examples the SQLite
files give it) and records its runs there, in the foreground and in the background; packages
export from and import into Postgres in the unchanged format, round-trip rows and calls between
SQLite and Postgres, put a package in exactly once, and a refused package changes nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from typer.testing import CliRunner

from rswitch.admin.api import PREFIX
from rswitch.cli import app
from rswitch.config import parse_config
from rswitch.core import Core
from rswitch.optimizer.data import load_examples
from rswitch.optimizer.mipro import Settings
from rswitch.optimizer.service import optimize
from rswitch.packaging import PackageError
from rswitch.storage.datasets import DatasetStore
from rswitch.storage.postgres import PostgresDatabase, PostgresDatasetStore, open_postgres
from rswitch.storage.record import CallRecord, Label
from tests.conftest import merge
from tests.test_mipro import MAGIC, rows
from tests.test_optimizer_background import BACKGROUND, wait_for_run, wire_one_model
from tests.test_optimizer_service import CONFIG, SETTINGS, wire
from tests.test_packaging import dataset_rows, traffic, tree
from tests.test_packaging_hostile import _replace_dataset, _rewrite_parquet
from tests.test_storage_postgres import on_postgres, query

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture
async def databases(postgres_dsn: str) -> AsyncIterator[Callable[[], Any]]:
    """`await databases()`: the DSN of a fresh, empty database on the session's server (dropped after)."""
    made: list[str] = []

    async def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        made.append(name)
        return postgres_dsn.rsplit("/", 1)[0] + "/" + name

    yield make
    conn = await asyncpg.connect(postgres_dsn)
    try:
        for name in made:
            await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()


def labelled(n: int) -> list[dict[str, Any]]:
    return [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(n)]


# -- the optimizer ------------------------------------------------------------------------------------


async def test_the_optimizer_learns_from_postgres_and_records_its_run_there(
    databases, make_gateway, tmp_path
):
    dsn = await databases()
    gw = await make_gateway(merge(CONFIG, on_postgres(dsn)))
    core = gw.core
    core.datasets.import_rows("echo", labelled(40))
    wire(core)
    assert len(load_examples(core.datasets, "echo")) == 40
    result, version = await optimize(
        core, "echo", settings=Settings(**SETTINGS), evaluator="exact_match", proposer="echo-ideas"
    )
    assert result.promote and version == 2
    assert MAGIC in core.registry.get("echo").template
    runs = await query(dsn, "SELECT run_id, template_id, promoted, new_version FROM optimizer_runs")
    assert runs == [{"run_id": result.run_id, "template_id": "echo", "promoted": True, "new_version": 2}]
    trials = await query(dsn, "SELECT count(*) AS n FROM optimizer_trials WHERE run_id = $1", result.run_id)
    assert trials[0]["n"] == 20
    assert not (tmp_path / "prompts" / "echo" / "dataset.sqlite").exists()  # nothing read from a file


async def test_the_background_optimizer_runs_on_postgres_rows(databases, make_gateway):
    dsn = await databases()
    gw = await make_gateway(merge(BACKGROUND, on_postgres(dsn)))
    wire_one_model(gw.core)
    gw.core.datasets.import_rows("echo", labelled(40))  # past min_new_labels: the next tick runs it
    run = await wait_for_run(gw.core, "echo")
    assert run["promoted"] and run["new_version"] == 2
    assert MAGIC in gw.core.registry.get("echo").template
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (status := (await gw.client.get("/status")).json()["optimizer"])["last"] is None:
        assert loop.time() < deadline, "the run was recorded but /status never showed it"
        await asyncio.sleep(0.05)  # the scheduler notes the run just after recording it
    assert status["last"]["run_id"] == run["run_id"] and status["run_counts"]["promoted"] == 1
    assert [r["run_id"] for r in await query(dsn, "SELECT run_id FROM optimizer_runs")] == [run["run_id"]]


def _records(now: float) -> list[CallRecord | Label]:
    """Calls of every kind the optimizer must tell apart, in the order they happened."""

    def call(i: int, **kw: Any) -> CallRecord:
        return CallRecord(
            request_id=f"r{i}",
            created_at=now + i,
            template_id="t",
            combination_id=kw.pop("combination_id", "cheap"),
            provider="p",
            model="m",
            system_prompt="sys",
            messages=[{"role": "user", "content": f"question {i}"}],
            variables={"i": i},
            output=kw.pop("output", f"answer {i}"),
            success=kw.pop("success", True),
            **kw,
        )

    return [
        call(0),  # unlabelled: an example, but no target
        call(1),
        Label("t", "r1", now + 1.5, "the right answer", None, None),  # labelled by feedback
        call(2, success=False, output="", error_type="upstream", error_message="boom", status=502),
        call(3, combination_id="strong"),  # a reference's answer: a label for the others
        call(4, extra={"attempts": [{"combination_id": "a"}, {"combination_id": "b", "diverged_at": 3}]}),
        call(5),
        Label("t", "r5", now + 5.5, None, 0.9, "good"),  # a score alone makes the output the target
        call(
            6, extra={"attempts": [{"combination_id": "a"}, {"combination_id": "b"}]}
        ),  # replayed, not diverged
    ]


async def test_postgres_and_sqlite_give_the_optimizer_the_same_examples(databases, tmp_path):
    dsn = await databases()
    now = time.time() - 100
    embedded = DatasetStore(tmp_path / "prompts", max_records=100, reference={"strong"})
    db = PostgresDatabase(dsn)
    postgres = PostgresDatasetStore(db, max_records=100, reference={"strong"})
    try:
        for store in (embedded, postgres):
            for record in _records(now):  # one at a time: a label lands after its row
                report = store.write([record])
                assert not report.refused and not report.failed
        reference = frozenset({"strong"})
        for labelled_only in (False, True):
            got = [
                [
                    (e.created_at, e.messages, e.variables, e.output, e.expected, e.score, e.target)
                    for e in load_examples(store, "t", labelled_only=labelled_only, reference=reference)
                ]
                for store in (embedded, postgres)
            ]
            assert got[0] == got[1]
        every = load_examples(postgres, "t", labelled_only=False, reference=reference)
        assert [e.output for e in every] == ["answer 0", "answer 1", "answer 3", "answer 5", "answer 6"]
        targets = [e.target for e in load_examples(postgres, "t", reference=reference)]
        assert targets == ["the right answer", "answer 3", "answer 5"]
        assert load_examples(postgres, "nothing-here") == []
    finally:
        embedded.close()
        postgres.close()


# -- packages -----------------------------------------------------------------------------------------


def target_core(tmp_path: Path, name: str, dsn: str | None = None) -> Core:
    """A core with its own data dir, on Postgres at `dsn` (else on files), as `rswitch` opens one."""
    data: dict[str, Any] = {
        "model_providers": {"mock": {"type": "mock"}},
        "dataset": {"base_path": str(tmp_path / name / "prompts")},
        "analytics": {"path": str(tmp_path / name / "a.duckdb")},
    }
    if dsn is not None:
        data["storage"] = {"backend": "postgres", "dsn": dsn}
    return Core(parse_config(data))


EXAMPLE = (
    "request_id, created_at, template_id, combination_id, provider, model, system_prompt, messages, "
    "variables, output, success, error_type, error, status, prompt_tokens, completion_tokens, "
    "tokens_estimated, cost, latency_ms, ttft_ms, stream, label_expected, label_score, label_comment, "
    "label_source, labelled_at, origin, labelled, attempts"
)
CALL = "request_id, created_at, combination_id, kind, success, duration_ms, cost, prompt_tokens, route"


async def pg_examples(dsn: str, template_id: str = "support") -> list[dict[str, Any]]:
    """A template's rows, times to the millisecond (a package's dataset.sqlite holds them so)."""
    rows = await query(dsn, f"SELECT {EXAMPLE} FROM examples WHERE template_id = $1 ORDER BY id", template_id)
    for r in rows:
        for name in ("created_at", "labelled_at"):
            if r[name] is not None:
                r[name] = r[name].replace(microsecond=r[name].microsecond // 1000 * 1000)
    return rows


async def pg_calls(dsn: str, template_id: str = "support") -> list[dict[str, Any]]:
    return await query(
        dsn,
        f"SELECT {CALL} FROM invocations WHERE template_id = $1 ORDER BY created_at, request_id",
        template_id,
    )


async def labelled_traffic(gw: Any) -> None:
    """Traffic, a feedback label and two imported examples: rows of every origin and label."""
    await traffic(gw)
    gw.flush()
    request_id = gw.core.datasets.recent("support", 1)[0]["request_id"]
    r = await gw.client.post("/v1/feedback", json={"request_id": request_id, "score": 0.8, "expected": "yes"})
    assert r.status_code == 202, r.text
    gw.core.datasets.import_rows(
        "support",
        [
            {"messages": [{"role": "user", "content": "where is my order"}], "expected": "Let me check."},
            {"messages": [{"role": "user", "content": "refund?"}], "output": "Sure.", "score": 0.5},
        ],
    )
    gw.flush()


async def test_a_package_goes_from_postgres_into_another_postgres_exactly_once(
    databases, make_gateway, tmp_path
):
    source, target_dsn = await databases(), await databases()
    gw = await make_gateway(on_postgres(source))
    await labelled_traffic(gw)
    pkg = gw.core.export_package("support", tmp_path / "out")
    listed = {f["path"] for f in yaml.safe_load((pkg / "package.yaml").read_text())["files"]}
    assert listed == {"manifest.yaml", "dataset.sqlite", "logs/recent.jsonl", "analytics.parquet"}
    assert len(dataset_rows(pkg / "dataset.sqlite")) == 8  # 6 answered (1 labelled by feedback), 2 imported

    target = target_core(tmp_path, "target", target_dsn)
    try:
        result = target.import_package(pkg)
        assert result["dataset_rows"] == 8 and result["analytics_rows_added"] == 6
        assert await pg_examples(target_dsn) == await pg_examples(source)
        assert await pg_calls(target_dsn) == await pg_calls(source)
        assert await pg_examples(target_dsn, "summarise") == []  # only this template's rows travel
        assert target.registry.get("support").version == gw.core.registry.get("support").version
        assert target.registry.history("support") == gw.core.registry.history("support")
        # what the optimizer reads is what it read at the source
        assert [(e.messages, e.target) for e in load_examples(target.datasets, "support")] == [
            (e.messages, e.target) for e in load_examples(gw.core.datasets, "support")
        ]

        with pytest.raises(PackageError, match="template 'support' already exists"):
            target.import_package(pkg)
        again = target.import_package(pkg, overwrite=True)
        assert again["replaced"] and again["analytics_rows_added"] == 0  # each call once
        assert await pg_examples(target_dsn) == await pg_examples(source)  # replaced, not added
        assert len(await pg_calls(target_dsn)) == 6

        back = target.export_package("support", tmp_path / "again")
        assert dataset_rows(back / "dataset.sqlite") == dataset_rows(pkg / "dataset.sqlite")
    finally:
        await target.stop()


async def test_rows_already_in_postgres_refuse_an_import_without_overwrite(databases, make_gateway, tmp_path):
    dsn = await databases()
    gw = await make_gateway()  # on files
    await traffic(gw)
    pkg = gw.core.export_package("support", tmp_path / "out")
    target = target_core(tmp_path, "target", dsn)
    try:
        target.datasets.import_rows("support", labelled(2))  # another replica recorded this template
        before = await pg_examples(dsn)
        with pytest.raises(
            PackageError,
            match=r"'support' already exists in Postgres at 127\.0\.0\.1:\d+/t_\w+ \(it has rows there\)",
        ):
            target.import_package(pkg)
        assert await pg_examples(dsn) == before and await pg_calls(dsn) == []
        assert not (tmp_path / "target" / "prompts" / "support").exists()
    finally:
        await target.stop()


async def test_a_template_another_replica_registered_refuses_an_import_without_overwrite(
    databases, make_gateway, tmp_path
):
    dsn = await databases()
    gw = await make_gateway()  # on files
    await traffic(gw)
    pkg = gw.core.export_package("support", tmp_path / "out")
    elsewhere = target_core(tmp_path, "elsewhere", dsn)  # another replica, with its own disk
    target = target_core(tmp_path, "target", dsn)
    try:
        tpl = gw.core.registry.get("support")
        assert tpl is not None
        elsewhere.registry.register(replace(tpl, template="Registered elsewhere: {product}, {tone}."))
        versions = target.registry.versions.versions("support")
        with pytest.raises(
            PackageError,
            match=r"'support' already exists in Postgres at 127\.0\.0\.1:\d+/t_\w+ \(registered there, version \d+\)",
        ):
            target.import_package(pkg)
        assert await pg_examples(dsn) == [] and await pg_calls(dsn) == []
        assert target.registry.versions.versions("support") == versions  # the refusal wrote no version
        assert not (tmp_path / "target" / "prompts" / "support").exists()
        result = target.import_package(pkg, overwrite=True)  # asked for: it becomes the next version
        assert result["replaced"] is True
    finally:
        await elsewhere.stop()
        await target.stop()


async def test_a_package_goes_from_sqlite_into_postgres_and_back_unchanged(databases, make_gateway, tmp_path):
    dsn = await databases()
    gw = await make_gateway()  # on files: SQLite datasets and DuckDB analytics
    await labelled_traffic(gw)
    pkg = gw.core.export_package("support", tmp_path / "out")
    on_pg = target_core(tmp_path, "pg", dsn)
    on_files = target_core(tmp_path, "files")
    try:
        result = on_pg.import_package(pkg)
        assert result["dataset_rows"] == 8 and result["analytics_rows_added"] == 6
        rows = await pg_examples(dsn)
        assert [r["origin"] for r in rows] == ["gateway"] * 6 + ["import"] * 2
        assert sum(r["labelled"] for r in rows) == 3 and rows[-2]["label_expected"] == "Let me check."
        back = on_pg.export_package("support", tmp_path / "back")
        assert dataset_rows(back / "dataset.sqlite") == dataset_rows(
            tmp_path / "prompts" / "support" / "dataset.sqlite"
        )
        on_files.import_package(back)
        files_db = tmp_path / "files" / "prompts" / "support" / "dataset.sqlite"
        assert dataset_rows(files_db) == dataset_rows(tmp_path / "prompts" / "support" / "dataset.sqlite")
        calls = "SELECT * FROM invocations WHERE template_id = 'support' ORDER BY created_at, request_id"
        assert (
            on_files.analytics._conn.execute(calls).fetchall()
            == gw.core.analytics._conn.execute(calls).fetchall()
        )
    finally:
        await on_pg.stop()
        await on_files.stop()


async def test_a_refused_package_changes_nothing_in_postgres(databases, make_gateway, tmp_path):
    dsn = await databases()
    gw = await make_gateway()
    await traffic(gw)
    target = target_core(tmp_path, "target", dsn)
    pkgs = tmp_path / "pkgs"

    def fresh() -> Path:
        return gw.core.export_package("support", pkgs / uuid.uuid4().hex)

    def refused(pkg: Path, match: str) -> None:
        before = tree(tmp_path / "target")
        with pytest.raises(PackageError, match=match):
            target.import_package(pkg)
        assert tree(tmp_path / "target") == before
        assert target.registry.get("support") is None

    try:
        corrupt = fresh()
        raw = bytearray((corrupt / "dataset.sqlite").read_bytes())
        raw[4096 + 8 : 2 * 4096] = b"\xa5" * (4096 - 8)  # a scrambled b-tree page, header intact
        (corrupt / "dataset.sqlite").write_bytes(bytes(raw))
        refused(corrupt, "checksum mismatch for dataset.sqlite")
        resealed = fresh()
        _replace_dataset(resealed, bytes(raw))
        refused(resealed, r"dataset\.sqlite (is corrupt|is not a SQLite database)")
        # rows the package's checks pass but Postgres cannot hold: refused before anything is written
        nul = fresh()
        _replace_dataset(
            nul, lambda c: c.execute("UPDATE examples SET output = 'a' || char(0) || 'b' WHERE id = 4")
        )
        refused(nul, r"dataset\.sqlite: row id 4: output contains a NUL character")
        when = fresh()
        _replace_dataset(
            when, lambda c: c.execute("UPDATE examples SET created_at = 'yesterday' WHERE id = 2")
        )
        refused(when, r"row id 2: 'created_at' is not an ISO 8601 timestamp")
        # a call Postgres refuses in the middle of the transaction: the rows copied before it go too
        late = fresh()
        _rewrite_parquet(late, "SELECT * REPLACE (model || chr(0) AS model) FROM {src}")
        refused(late, "the package's rows could not go into Postgres")
        for table in ("examples", "invocations"):
            assert (await query(dsn, f"SELECT count(*) AS n FROM {table}"))[0]["n"] == 0
        assert target.import_package(fresh())["dataset_rows"] == 6  # the same package, intact, goes in
    finally:
        await target.stop()


async def test_packages_export_and_import_through_the_admin_api_on_postgres(databases, make_gateway):
    dsn = await databases()
    gw = await make_gateway(on_postgres(dsn))
    await traffic(gw)
    r = await gw.client.post(PREFIX + "/packages/export", json={"template_id": "support"})
    assert r.status_code == 200, r.text  # was refused: "packages do not export from … Postgres"
    gz = {"content-type": "application/gzip"}
    again = await gw.client.post(PREFIX + "/packages/import", content=r.content, headers=gz)
    assert again.status_code == 409 and "already exists" in again.text
    before = await pg_examples(dsn)
    done = await gw.client.post(PREFIX + "/packages/import?overwrite=true", content=r.content, headers=gz)
    assert done.status_code == 200 and done.json()["dataset_rows"] == 6, done.text
    assert await pg_examples(dsn) == before


async def test_rswitch_package_export_and_import_use_postgres_without_a_gateway(databases, tmp_path):
    source, target = await databases(), await databases()

    def config(name: str, dsn: str, **more: Any) -> Path:
        path = tmp_path / f"{name}.yaml"
        data = {
            "model_providers": {"mock": {"type": "mock"}},
            "dataset": {"base_path": str(tmp_path / name / "prompts")},
            "analytics": {"path": str(tmp_path / name / "a.duckdb")},
            "storage": {"backend": "postgres", "dsn": dsn},
            **more,
        }
        path.write_text(yaml.safe_dump(data))
        return path

    src = config("src", source, templates={"faq": {"template": "Answer briefly."}})
    datasets, _ = open_postgres(parse_config(yaml.safe_load(src.read_text())))
    try:
        datasets.import_rows("faq", labelled(3))
    finally:
        datasets.close()
    out = tmp_path / "out"
    r = await asyncio.to_thread(
        runner.invoke,
        app,
        ["package", "export", "--template-id", "faq", "--output-dir", str(out), "-c", str(src)],
    )
    assert r.exit_code == 0, r.output
    (pkg,) = out.iterdir()
    assert len(dataset_rows(pkg / "dataset.sqlite")) == 3
    r = await asyncio.to_thread(
        runner.invoke, app, ["package", "import", str(pkg), "-c", str(config("dst", target))]
    )
    assert r.exit_code == 0, r.output
    assert "3 dataset row(s)" in r.output
    assert await pg_examples(target, "faq") == await pg_examples(source, "faq")
    assert not (tmp_path / "dst" / "prompts" / "faq" / "dataset.sqlite").exists()  # rows in Postgres, no file


async def test_rswitch_dataset_import_show_and_export_use_postgres_without_a_gateway(databases, tmp_path):
    dsn = await databases()
    path = tmp_path / "pg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "templates": {"faq": {"template": "Answer briefly."}},
                "dataset": {"base_path": str(tmp_path / "prompts")},
                "analytics": {"path": str(tmp_path / "a.duckdb")},
                "storage": {"backend": "postgres", "dsn": dsn},
            }
        )
    )
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"input": "Where is my parcel?", "expected": "On its way."}\n{"input": "Refund?"}\n')

    def cli(*args: str) -> Any:
        return runner.invoke(app, [*args, "-c", str(path)])

    r = await asyncio.to_thread(cli, "dataset", "import", "faq", str(lines))
    assert r.exit_code == 0, r.output
    assert "imported 2 example(s) into 'faq' (1 labelled)" in r.output
    assert len(await pg_examples(dsn, "faq")) == 2  # in Postgres, where every replica reads
    assert not (tmp_path / "prompts" / "faq" / "dataset.sqlite").exists()
    r = await asyncio.to_thread(cli, "dataset", "show", "faq", "--labelled")
    assert r.exit_code == 0 and "Where is my parcel?" in r.output and "Refund?" not in r.output, r.output
    r = await asyncio.to_thread(cli, "dataset", "export", "faq")
    assert r.exit_code == 0, r.output
    exported = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [row["label_expected"] for row in exported] == ["On its way.", None]  # oldest first
