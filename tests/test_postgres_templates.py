"""Template versions in Postgres (`storage: {backend: postgres}`), against a real Postgres server
(tests/servers.py): registries on one database serve each other's versions, concurrent
registrations get distinct versions, rollback adds a version, manifests already on a replica's
disk are imported once, a running gateway serves a version registered elsewhere within the
watcher's period, and the CLI works against the database."""

# ruff: noqa: F811  (the fixtures imported below, pg and upstream, are what the tests take as arguments)

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.cli.serve import startup_summary
from rswitch.core import Core, open_registry
from rswitch.storage.pg_templates import PostgresTemplateVersions
from rswitch.storage.postgres import PostgresDatabase
from rswitch.templates import Template, TemplateError, TemplateRegistry
from rswitch.templates_watch import TemplateWatcher
from tests.conftest import chat, make_config
from tests.servers import free_port
from tests.test_storage_postgres import on_postgres, pg, query  # noqa: F401  (pg: a fresh database)
from tests.test_template_reload import WAIT, config, system_prompt_sent, upstream  # noqa: F401

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture
def registries(pg: str) -> Any:
    """`open(folder)`: a registry keeping its versions in the test's database, as a replica's is;
    all closed afterwards."""
    made: list[TemplateRegistry] = []

    def open_(folder: Path) -> TemplateRegistry:
        reg = TemplateRegistry(folder, versions=PostgresTemplateVersions(PostgresDatabase(pg, max_size=2)))
        made.append(reg)
        return reg

    yield open_
    for reg in made:
        reg.close()


def text_of(reg: TemplateRegistry, template_id: str) -> tuple[int, str]:
    tpl = reg.get(template_id)
    assert tpl is not None
    return tpl.version, tpl.template


async def test_two_registries_on_one_database_serve_each_others_versions(registries, tmp_path, pg):
    a, b = registries(tmp_path / "a"), registries(tmp_path / "b")
    watch_b, watch_a = TemplateWatcher(b), TemplateWatcher(a)

    a.register(Template(id="greeter", template="Greet {name}."))
    assert [(t.id, t.version) for t in await watch_b.check()] == [("greeter", 1)]
    assert text_of(b, "greeter") == (1, "Greet {name}.")

    b.register(Template(id="greeter", template="Greet {name} warmly."))
    [tpl] = await watch_a.check()
    assert (tpl.version, tpl.template, tpl.source) == (2, "Greet {name} warmly.", "registry")
    assert await watch_a.check() == []  # nothing new: nothing served anew
    assert [v["template"] for v in a.history("greeter")] == ["Greet {name}."]
    assert [(t.id, t.version) for t in a.list()] == [("greeter", 2)]

    # nothing on either disk: the versions are in the database only
    assert not list(tmp_path.rglob("*.yaml"))
    rows = await query(pg, "SELECT version FROM template_versions WHERE template_id = 'greeter' ORDER BY 1")
    assert [r["version"] for r in rows] == [1, 2]


def test_concurrent_registrations_get_distinct_versions(registries, tmp_path):
    replicas = [registries(tmp_path / "a"), registries(tmp_path / "b")]
    per_thread, threads = 3, 8
    start = threading.Barrier(threads)
    got: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        reg = replicas[i % 2]
        start.wait()
        for n in range(per_thread):
            try:
                got.append(reg.register(Template(id="busy", template=f"Writer {i} turn {n}.")).version)
            except BaseException as exc:
                errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert errors == []
    assert sorted(got) == list(range(1, threads * per_thread + 1))  # no version given twice, none skipped
    fresh = registries(tmp_path / "c")
    assert fresh.get("busy").version == threads * per_thread
    assert [v["version"] for v in fresh.history("busy")] == list(range(1, threads * per_thread))


async def test_rollback_adds_a_version_that_every_registry_serves(registries, tmp_path):
    a, b = registries(tmp_path / "a"), registries(tmp_path / "b")
    a.register(Template(id="support", template="You support {product}."))
    a.register(Template(id="support", template="You sell {product}."))
    await TemplateWatcher(b).check()

    tpl = b.rollback("support", 1)
    assert (tpl.version, tpl.template) == (3, "You support {product}.")
    assert tpl.provenance == {"rollback_of": 1, "previous_version": 2}
    [served] = await TemplateWatcher(a).check()
    assert (served.version, served.template) == (3, "You support {product}.")
    assert [(v["version"], v["template"]) for v in a.history("support")] == [
        (1, "You support {product}."),
        (2, "You sell {product}."),
    ]
    with pytest.raises(
        TemplateError, match=r"no earlier version 7 \(earlier versions: \[1, 2\]; current: 3\)"
    ):
        a.rollback("support", 7)
    assert a.get("support").version == 3


async def test_manifests_on_a_replicas_disk_are_imported_once(registries, tmp_path, pg, caplog):
    disk = tmp_path / "replica1"
    files = TemplateRegistry(disk)  # as this replica registered before its templates moved to Postgres
    files.register(Template(id="greeter", template="Hello {name}."))
    files.register(Template(id="greeter", template="Hi {name}.", provenance={"run_id": "r1"}))

    with caplog.at_level(logging.INFO, logger="rswitch.templates"):
        first = registries(disk)
    assert text_of(first, "greeter") == (2, "Hi {name}.")
    assert [v["template"] for v in first.history("greeter")] == ["Hello {name}."]
    assert first.get("greeter").provenance == {"run_id": "r1"}
    imported = [r.getMessage() for r in caplog.records if "imported" in r.getMessage()]
    assert len(imported) == 1 and "template 'greeter': imported 2 version(s)" in imported[0]

    # another replica's disk holds its own copy: the database already has the template
    other = tmp_path / "replica2"
    TemplateRegistry(other).register(Template(id="greeter", template="Yo {name}."))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rswitch.templates"):
        second = registries(other)
        again = registries(disk)  # the first replica restarting
    assert text_of(second, "greeter") == (2, "Hi {name}.")
    assert text_of(again, "greeter") == (2, "Hi {name}.")
    assert not [r for r in caplog.records if "imported" in r.getMessage()]
    rows = await query(pg, "SELECT count(*) AS n FROM template_versions")
    assert rows[0]["n"] == 2


async def test_config_and_bundled_templates_stay_as_they_are(pg, tmp_path):
    cfg = make_config(tmp_path, on_postgres(pg))
    reg = open_registry(cfg)
    try:
        assert (reg.get("support").source, reg.get("support").version) == ("inline", 1)
        # registering over the config's template makes it version 2, the config's text version 1
        tpl = reg.register(Template(id="support", template="You sell {product}."))
        assert (tpl.version, tpl.source) == (2, "registry")
        assert [v["template"] for v in reg.history("support")] == ["You support {product}. Be {tone}."]
        assert reg.get("summarise").source == "inline"
    finally:
        reg.close()
    rows = await query(pg, "SELECT template_id, version FROM template_versions ORDER BY 1, 2")
    assert [(r["template_id"], r["version"]) for r in rows] == [("support", 1), ("support", 2)]


async def test_a_gateway_serves_a_version_registered_elsewhere_within_the_watchers_period(
    make_gateway, registries, tmp_path, upstream, pg
):
    gw = await make_gateway({**config(tmp_path, upstream), **on_postgres(pg)})  # its watcher runs
    body = chat("hi", model="support-a", variables={"product": "Acme"})
    assert await system_prompt_sent(gw, upstream, body) == "You support Acme."

    elsewhere = registries(tmp_path / "another-machine")
    elsewhere.register(Template(id="support", template="You cherish {product}."))
    deadline = time.monotonic() + WAIT
    while await system_prompt_sent(gw, upstream, body) != "You cherish Acme.":
        assert time.monotonic() < deadline, "the gateway never served the version registered elsewhere"
        await asyncio.sleep(0.05)
    assert "template 'support' version 1 is served now" in [
        text for _, _, kind, text in gw.core.gateway.events if kind == "template"
    ]
    banner = {
        x.split()[0]: x
        for x in startup_summary(gw.core, "127.0.0.1:8080")
        if x.startswith("  ") and x.split()
    }
    assert "(Postgres at 127.0.0.1:" in banner["templates"]  # the serve banner says where the versions are
    assert "Postgres at 127.0.0.1:" in banner["datasets"] and "table examples" in banner["datasets"]
    assert "Postgres at 127.0.0.1:" in banner["analytics"] and ".duckdb" not in banner["analytics"]
    assert "dataset.sqlite" not in "\n".join(banner.values())


async def test_the_watcher_says_once_when_postgres_does_not_answer_and_keeps_serving(
    registries, tmp_path, pg, caplog
):
    reg = registries(tmp_path / "a")
    reg.register(Template(id="greeter", template="Greet {name}."))
    watcher = TemplateWatcher(reg)
    await query(pg, "ALTER TABLE template_versions RENAME TO away")  # every query of it fails now
    with caplog.at_level(logging.INFO, logger="rswitch.templates"):
        assert await watcher.check() == []
        assert await watcher.check() == []
        assert text_of(reg, "greeter") == (1, "Greet {name}.")
        await query(pg, "ALTER TABLE away RENAME TO template_versions")
        assert await watcher.check() == []
    said = [r.getMessage() for r in caplog.records if "Postgres at" in r.getMessage()]
    assert len(said) == 2, said
    assert "does not answer" in said[0] and "the versions served keep serving" in said[0]
    assert said[1].endswith("answers again")


def cli(cfg_path: Path, *args: str, ok: bool = True) -> str:
    r = runner.invoke(app, [*args, "-c", str(cfg_path)])
    assert (r.exit_code == 0) == ok, r.output
    return r.output


def cli_config(tmp_path: Path, storage: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "storage": storage,
                "dataset": {"base_path": str(tmp_path / "prompts")},
                "analytics": {"path": str(tmp_path / "analytics.duckdb")},
            }
        )
    )
    return path


def test_the_cli_registers_lists_and_rolls_back_in_postgres(registries, tmp_path, pg):
    path = cli_config(tmp_path, {"backend": "postgres", "dsn": pg})
    register = ("template", "register", "--template-id", "greeter", "--prompt-text")
    out = cli(path, *register, "Greet {name}.")
    assert "registered template 'greeter' version 1 → Postgres at 127.0.0.1:" in out
    cli(path, *register, "Greet {name} warmly.")
    assert "greeter                    2  registry" in cli(path, "template", "list")
    out = cli(path, "template", "rollback", "greeter", "1")
    assert "template 'greeter' is now version 3, a copy of version 1" in out
    history = cli(path, "template", "history", "greeter")
    assert [line.split()[0] for line in history.splitlines() if line.startswith("v")] == [
        "v1",
        "v2",
        "v3",
    ]
    assert "v3 (current)" in history and "rollback to version 1" in history

    bad = cli(path, "template", "rollback", "greeter", "9", ok=False)
    assert "template 'greeter' has no earlier version 9 (earlier versions: [1, 2]; current: 3)" in bad
    bad = cli(path, *register, "   ", ok=False)
    assert "the template text is empty" in bad
    assert not (tmp_path / "prompts" / "greeter" / "manifest.yaml").exists()  # nothing on disk
    assert text_of(registries(tmp_path / "elsewhere"), "greeter") == (3, "Greet {name}.")


def test_the_cli_names_an_unreachable_postgres_without_its_password(tmp_path):
    path = cli_config(
        tmp_path, {"backend": "postgres", "dsn": f"postgresql://rs:s3cr3t-pw@127.0.0.1:{free_port()}/db"}
    )
    for args in (
        ("template", "list"),
        ("template", "register", "--template-id", "x", "--prompt-text", "Hi."),
        ("dataset", "show", "x"),
    ):
        out = cli(path, *args, ok=False)
        assert "cannot use Postgres at 127.0.0.1:" in out and "/db" in out
        assert "s3cr3t-pw" not in out
    r = runner.invoke(app, ["config", "check", str(path)])
    assert r.exit_code == 1 and "cannot check its templates" in r.output and "s3cr3t-pw" not in r.output


async def test_a_package_imported_into_postgres_brings_its_versions_and_replaces_with_a_new_one(
    gateway, registries, tmp_path, pg
):
    src = gateway.core.registry  # manifest files, as a single box keeps them
    src.register(Template(id="support", template="You sell {product}. Be {tone}."))
    src.register(Template(id="support", template="You repair {product}. Be {tone}."))
    pkg = gateway.core.export_package("support", tmp_path / "out")

    cfg = make_config(tmp_path / "pg-side", on_postgres(pg))
    other = Core(cfg)
    try:
        worker = registries(cfg.dataset_dir)  # another process on the same box, same folder
        other.import_package(pkg)
        elsewhere = registries(tmp_path / "another-machine")  # a replica that never saw the package
        assert text_of(elsewhere, "support") == (3, "You repair {product}. Be {tone}.")
        assert [v["template"] for v in elsewhere.history("support")] == [
            "You support {product}. Be {tone}.",
            "You sell {product}. Be {tone}.",
        ]

        src.register(Template(id="support", template="You cherish {product}. Be {tone}."))
        pkg = gateway.core.export_package("support", tmp_path / "out2")
        other.import_package(pkg, overwrite=True)  # replacing it: the package's text is the next version
        assert text_of(other.registry, "support") == (4, "You cherish {product}. Be {tone}.")
        [served] = await TemplateWatcher(elsewhere).check()
        assert (served.version, served.template) == (4, "You cherish {product}. Be {tone}.")
        worker.reload()  # as a worker reloads after an import: the same manifest is not a version again
        assert text_of(worker, "support") == (4, "You cherish {product}. Be {tone}.")
        assert [v["version"] for v in worker.history("support")] == [1, 2, 3]
    finally:
        await other.stop()


async def test_a_registry_a_command_drops_without_closing_leaves_no_connection_open(pg, tmp_path):
    others = "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    reg = open_registry(make_config(tmp_path, on_postgres(pg)))  # as `rswitch dataset show` opens one
    assert (await query(pg, others))[0]["n"] >= 1
    del reg
    deadline = time.monotonic() + WAIT
    while (await query(pg, others))[0]["n"] > 0:  # a backend leaves a moment after its client
        assert time.monotonic() < deadline, "the dropped registry's connections stayed open"
        await asyncio.sleep(0.05)
