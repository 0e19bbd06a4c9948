"""Hostile packages: every name and every file that comes from a package is checked before it
becomes a path or a row, and a refusal changes nothing.

Each tampered package is built the way an attacker would: from a real export, modified, with
its checksums recomputed (anyone can), in both forms (folder and .tar.gz)."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import tarfile
from collections.abc import Callable
from datetime import date
from pathlib import Path

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.packaging import PackageError, inspect_package
from rswitch.templates import Template
from tests.test_packaging import fresh_core, traffic, tree

runner = CliRunner()


def reseal(pkg: Path) -> None:
    """Recompute every listed file's size and sha256 in package.yaml, as an attacker can."""
    meta = yaml.safe_load((pkg / "package.yaml").read_text())
    for f in meta["files"]:
        p = pkg / str(f.get("path"))
        if p.is_file():
            f["size"] = p.stat().st_size
            f["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    (pkg / "package.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def edit_yaml(path: Path, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def as_archive(pkg: Path) -> Path:
    out = pkg.parent / f"{pkg.name}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(pkg, arcname=pkg.name)
    return out


@pytest.fixture
async def world(gateway, tmp_path):
    """A real export, and a target data dir with another template and a file beside it that an
    escape would overwrite."""
    await traffic(gateway)
    pkg = gateway.core.export_package("support", tmp_path / "out")
    target = fresh_core(tmp_path, "target")
    target.registry.register(Template(id="keep", template="keep me"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "manifest.yaml").write_text("id: victim\ntemplate: untouched\n")
    yield pkg, target, tmp_path
    await target.stop()


def refused(target, pkg: Path, archive: bool, match: str, tmp_path: Path) -> PackageError:
    """Import `pkg` (as a folder or as an archive) and check that it is refused with `match`
    and that nothing changed: the data dir, the analytics rows, the files around it."""
    path = as_archive(pkg) if archive else pkg
    before_data = tree(tmp_path / "target")
    before_victim = tree(tmp_path / "victim")
    rows = target.analytics._conn.execute("SELECT count(*) FROM invocations").fetchone()[0]
    with pytest.raises(PackageError, match=match) as exc:
        target.import_package(path)
    assert tree(tmp_path / "target") == before_data
    assert tree(tmp_path / "victim") == before_victim
    assert target.analytics._conn.execute("SELECT count(*) FROM invocations").fetchone()[0] == rows
    assert target.registry.get("support") is None
    return exc.value


# -- the reported attack: a version that is a path --------------------------------------------------


@pytest.mark.parametrize("archive", [False, True])
@pytest.mark.parametrize(
    "escape",
    [
        "/../../../victim/manifest",  # as reported: lands in the data dir, as another template
        "/../../../../../victim/manifest",  # out of the data dir, onto tmp/victim/manifest.yaml
    ],
)
async def test_history_version_that_is_a_path_is_refused_and_writes_nothing(world, archive, escape):
    pkg, target, tmp = world
    edit_yaml(pkg / "manifest.yaml", lambda m: m["history"][0].__setitem__("version", escape))
    reseal(pkg)
    err = refused(target, pkg, archive, r"manifest\.yaml: history\[0\]\.version .*must be an integer", tmp)
    assert escape in str(err)
    assert (tmp / "victim" / "manifest.yaml").read_text() == "id: victim\ntemplate: untouched\n"


@pytest.mark.parametrize(
    ("version", "why"),
    [
        ("2", "must be an integer"),
        (2.5, "must be an integer"),
        (True, "must be an integer"),
        (0, "must be 1 or more"),
        (-3, "must be 1 or more"),
        (None, "must be an integer"),
    ],
)
async def test_history_versions_must_be_positive_integers(world, version, why):
    pkg, target, tmp = world
    edit_yaml(pkg / "manifest.yaml", lambda m: m["history"][0].__setitem__("version", version))
    reseal(pkg)
    refused(target, pkg, False, rf"manifest\.yaml: history\[0\]\.version .*{why}", tmp)


async def test_duplicate_or_later_history_versions_are_refused(world):
    pkg, target, tmp = world
    edit_yaml(pkg / "manifest.yaml", lambda m: m["history"][1].__setitem__("version", 1))
    reseal(pkg)
    refused(target, pkg, False, r"history\[1\]\.version 1 appears twice", tmp)
    edit_yaml(pkg / "manifest.yaml", lambda m: m["history"][1].__setitem__("version", 7))
    reseal(pkg)
    refused(target, pkg, False, r"history\[1\]\.version 7 is not earlier than the current version 3", tmp)


@pytest.mark.parametrize("archive", [False, True])
async def test_history_entry_for_another_template_is_refused(world, archive):
    pkg, target, tmp = world
    edit_yaml(pkg / "manifest.yaml", lambda m: m["history"][0].__setitem__("id", "../keep"))
    reseal(pkg)
    refused(target, pkg, archive, r"manifest\.yaml: history\[0\]\.id: invalid template id '\.\./keep'", tmp)


# -- the manifest gets the same checks as `template register` ---------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.__setitem__("template", "   "), r"manifest\.yaml: template must be a non-empty"),
        (lambda m: m.__setitem__("template", ["a"]), r"manifest\.yaml: template must be a non-empty"),
        (lambda m: m.__setitem__("variables", "product"), r"manifest\.yaml: variables must be a list"),
        (lambda m: m.__setitem__("variables", ["product"]), r"manifest\.yaml: .*undeclared variable"),
        (lambda m: m.__setitem__("name", {"x": 1}), r"manifest\.yaml: name must be a string"),
        (lambda m: m.__setitem__("default_model", 5), r"manifest\.yaml: default_model must be a string"),
        (lambda m: m.__setitem__("version", "3"), r"manifest\.yaml: version .*must be an integer"),
        (lambda m: m.__setitem__("demos", [{"user": "hi"}]), r"manifest\.yaml: .*demos\[0\]"),
        (lambda m: m.__setitem__("provenance", "x"), r"manifest\.yaml: provenance must be a mapping"),
        (lambda m: m.__setitem__("history", {"a": 1}), r"manifest\.yaml: history must be a list"),
        (lambda m: m["history"].__setitem__(0, "v1"), r"manifest\.yaml: history\[0\] must be a mapping"),
        (lambda m: m.__setitem__("shell", "rm -rf"), r"manifest\.yaml: unknown field 'shell'"),
    ],
)
async def test_manifest_that_register_would_refuse_is_refused(world, change, match):
    pkg, target, tmp = world
    edit_yaml(pkg / "manifest.yaml", change)
    reseal(pkg)
    refused(target, pkg, False, match, tmp)


async def test_manifest_that_is_not_a_mapping_is_refused(world):
    pkg, target, tmp = world
    (pkg / "manifest.yaml").write_text("- just\n- a list\n")
    reseal(pkg)
    refused(target, pkg, True, r"manifest\.yaml must be a mapping", tmp)


async def test_manifest_nested_too_deeply_is_refused(world):
    pkg, target, tmp = world
    text = (pkg / "manifest.yaml").read_text()
    (pkg / "manifest.yaml").write_text(text + "provenance: " + "[" * 20000 + "]" * 20000 + "\n")
    reseal(pkg)
    refused(target, pkg, False, r"manifest\.yaml is nested too deeply", tmp)


async def test_package_yaml_template_id_that_is_a_path_is_refused(world):
    pkg, target, tmp = world
    edit_yaml(pkg / "package.yaml", lambda m: m.__setitem__("template_id", "../victim"))
    edit_yaml(pkg / "manifest.yaml", lambda m: m.__setitem__("id", "../victim"))
    reseal(pkg)
    refused(target, pkg, True, r"package\.yaml: template_id: invalid template id '\.\./victim'", tmp)


# -- the file list -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("/etc/hostname", r"package\.yaml: files\[4\]\.path '/etc/hostname' is not a file a package holds"),
        ("../victim/manifest.yaml", r"files\[4\]\.path '\.\./victim/manifest\.yaml' is not a file"),
        ("logs/../manifest.yaml", r"files\[4\]\.path 'logs/\.\./manifest\.yaml' is not a file"),
        ("manifest.yaml", r"package\.yaml: files\[4\]\.path 'manifest\.yaml' is listed twice"),
        (["x"], r"package\.yaml: files\[4\]\.path must be a string"),
    ],
)
async def test_file_list_with_unsafe_or_duplicate_names_is_refused(world, entry, match):
    pkg, target, tmp = world
    edit_yaml(
        pkg / "package.yaml", lambda m: m["files"].append({"path": entry, "size": 1, "sha256": "0" * 64})
    )
    refused(target, pkg, False, match, tmp)


async def test_file_list_entry_that_is_not_a_mapping_or_has_a_bad_size_is_refused(world):
    pkg, target, tmp = world
    edit_yaml(pkg / "package.yaml", lambda m: m["files"].append("manifest.yaml"))
    refused(target, pkg, False, r"package\.yaml: files\[4\] must be a mapping", tmp)
    edit_yaml(pkg / "package.yaml", lambda m: m["files"].pop())
    edit_yaml(pkg / "package.yaml", lambda m: m["files"][1].__setitem__("rows", -1))
    refused(target, pkg, False, r"package\.yaml: files\[1\]\.rows must be an integer of 0 or more", tmp)


# -- archives ----------------------------------------------------------------------------------------


def _tar_with(pkg: Path, extra: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    out = pkg.parent / "evil.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(pkg, arcname=pkg.name)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (
            lambda root: _member(f"{root}/manifest.yaml", data=b"id: x\n"),
            r"entry '.*manifest\.yaml' appears twice",
        ),
        (
            lambda root: _member(f"{root}/./manifest.yaml", data=b"id: x\n"),
            r"entry '.*manifest\.yaml' appears twice",
        ),
        (lambda root: _member(f"{root}/hard", tarfile.LNKTYPE, link=f"{root}/manifest.yaml"), "is a link"),
        (lambda root: _member(f"{root}/dev", tarfile.CHRTYPE), "not a regular file or folder"),
        (lambda root: _member(f"{root}/fifo", tarfile.FIFOTYPE), "not a regular file or folder"),
        (lambda root: _member("other/x", data=b"x"), "exactly one package folder"),
        (
            lambda root: _member(f"{root}/notes.txt", data=b"x"),
            r"entry '.*/notes\.txt' is not a file a package",
        ),
        (
            lambda root: _member(f"{root}/logs/more/x", data=b"x"),
            r"entry '.*/logs/more/x' is not a file a pack",
        ),
        (lambda root: _member(f"{root}\\..\\..\\x", data=b"x"), r"entry '.*' has a '\\' in its name"),
    ],
)
async def test_archive_with_hostile_members_is_refused(world, member, match):
    pkg, target, tmp = world
    before = tree(tmp / "target")
    evil = _tar_with(pkg, [member(pkg.name)])
    with pytest.raises(PackageError, match=match):
        target.import_package(evil)
    assert tree(tmp / "target") == before
    assert target.registry.get("support") is None


async def test_package_folder_with_a_pipe_is_refused(world):
    pkg, target, tmp = world
    os.mkfifo(pkg / "logs" / "pipe")
    refused(target, pkg, False, r"'logs/pipe' is not a regular file or folder", tmp)


# -- the dataset -------------------------------------------------------------------------------------


def _replace_dataset(pkg: Path, build: Callable[[sqlite3.Connection], None] | bytes) -> None:
    path = pkg / "dataset.sqlite"
    if isinstance(build, bytes):
        path.write_bytes(build)
    else:
        conn = sqlite3.connect(path)
        try:
            build(conn)
            conn.commit()
        finally:
            conn.close()
    reseal(pkg)


@pytest.mark.parametrize("archive", [False, True])
async def test_dataset_that_is_not_sqlite_is_refused(world, archive):
    pkg, target, tmp = world
    _replace_dataset(pkg, b"definitely not a database" * 100)
    refused(target, pkg, archive, r"dataset\.sqlite is not a SQLite database", tmp)


async def test_dataset_without_the_examples_table_is_refused(world):
    pkg, target, tmp = world
    _replace_dataset(pkg, lambda c: c.execute("DROP TABLE examples"))
    refused(target, pkg, False, r"dataset\.sqlite has no 'examples' table", tmp)


async def test_dataset_missing_a_column_is_refused(world):
    pkg, target, tmp = world
    _replace_dataset(pkg, lambda c: c.execute("ALTER TABLE examples DROP COLUMN output"))
    refused(target, pkg, False, r"dataset\.sqlite: table 'examples' lacks column\(s\) output", tmp)


async def test_dataset_with_a_trigger_is_refused(world):
    pkg, target, tmp = world
    _replace_dataset(
        pkg,
        lambda c: c.execute(
            "CREATE TRIGGER stop BEFORE INSERT ON examples BEGIN SELECT RAISE(FAIL, 'no more'); END"
        ),
    )
    refused(target, pkg, False, r"dataset\.sqlite holds a trigger 'stop'", tmp)


async def test_dataset_with_bad_json_or_wrong_row_count_is_refused(world):
    pkg, target, tmp = world
    _replace_dataset(pkg, lambda c: c.execute("UPDATE examples SET messages = '{not json' WHERE id = 2"))
    refused(target, pkg, False, r"dataset\.sqlite: row id 2 has a 'messages' that is not JSON", tmp)
    _replace_dataset(pkg, lambda c: c.execute("UPDATE examples SET messages = '[]'"))
    edit_yaml(pkg / "package.yaml", lambda m: m["files"][1].__setitem__("rows", 99))
    refused(target, pkg, False, r"dataset\.sqlite holds 6 row\(s\); package\.yaml says 99", tmp)


async def test_dataset_with_values_of_the_wrong_type_is_refused(world):
    pkg, target, tmp = world
    _replace_dataset(pkg, lambda c: c.execute("UPDATE examples SET success = 'yes' WHERE id = 3"))
    refused(target, pkg, False, r"dataset\.sqlite: row id 3 has a text in 'success'; expected integer", tmp)


async def test_dataset_that_is_corrupt_is_refused(world):
    pkg, target, tmp = world
    raw = bytearray((pkg / "dataset.sqlite").read_bytes())
    page = 4096
    assert len(raw) > 2 * page
    raw[page + 8 : 2 * page] = b"\xa5" * (page - 8)  # a scrambled b-tree page, header intact
    _replace_dataset(pkg, bytes(raw))
    refused(target, pkg, False, r"dataset\.sqlite (is corrupt|is not a SQLite database)", tmp)


# -- the analytics excerpt and the logs --------------------------------------------------------------


def _rewrite_parquet(pkg: Path, select: str) -> None:
    path = pkg / "analytics.parquet"
    tmp = path.with_name("new.parquet")
    conn = duckdb.connect()
    try:
        conn.execute(
            f"COPY ({select.format(src=f'read_parquet({str(path)!r})')}) TO '{tmp}' (FORMAT parquet)"
        )
    finally:
        conn.close()
    tmp.replace(path)
    reseal(pkg)


@pytest.mark.parametrize("archive", [False, True])
async def test_analytics_rows_for_another_template_are_refused(world, archive):
    pkg, target, tmp = world
    _rewrite_parquet(pkg, "SELECT * REPLACE ('keep' AS template_id) FROM {src}")
    refused(target, pkg, archive, r"analytics\.parquet holds 6 row\(s\) for other templates \('keep'\)", tmp)


async def test_analytics_with_unknown_columns_or_wrong_types_is_refused(world):
    pkg, target, tmp = world
    _rewrite_parquet(pkg, "SELECT *, 1 AS payload FROM {src}")
    refused(
        target, pkg, False, r"analytics\.parquet has column\(s\) the analytics store does not: payload", tmp
    )
    _rewrite_parquet(pkg, "SELECT * EXCLUDE (payload) REPLACE (cost::VARCHAR AS cost) FROM {src}")
    refused(target, pkg, False, r"analytics\.parquet: column 'cost' is VARCHAR; expected DOUBLE", tmp)


async def test_analytics_that_is_not_parquet_is_refused(world):
    pkg, target, tmp = world
    (pkg / "analytics.parquet").write_bytes(b"PAR1 but not really")
    reseal(pkg)
    refused(target, pkg, False, r"analytics\.parquet is not a readable Parquet file", tmp)


async def test_logs_that_are_not_json_lines_are_refused(world):
    pkg, target, tmp = world
    (pkg / "logs" / "recent.jsonl").write_text('{"ok": 1}\nnot json\n')
    reseal(pkg)
    refused(target, pkg, False, r"logs/recent\.jsonl: line 2 is not a JSON object", tmp)


# -- the faces ---------------------------------------------------------------------------------------


async def test_cli_refuses_with_exit_1_and_inspect_names_the_problem(world):
    pkg, target, tmp = world
    edit_yaml(
        pkg / "manifest.yaml", lambda m: m["history"][0].__setitem__("version", "/../../../victim/manifest")
    )
    reseal(pkg)
    info = inspect_package(pkg)
    assert not info["checksums_ok"] and "history[0].version" in info["problem"]
    cfg = tmp / "cli.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "dataset": {"base_path": str(tmp / "cli" / "prompts")},
                "analytics": {"path": str(tmp / "cli" / "a.duckdb")},
            }
        )
    )
    r = runner.invoke(app, ["package", "import", str(as_archive(pkg)), "-c", str(cfg)])
    assert r.exit_code != 0 and "history[0].version" in r.output, r.output
    assert not (tmp / "cli" / "prompts" / "support").exists()
    r = runner.invoke(app, ["package", "inspect", str(pkg)])
    assert r.exit_code != 0 and "history[0].version" in r.output, r.output


async def test_template_id_with_a_trailing_newline_is_refused(world):
    pkg, target, tmp = world
    edit_yaml(pkg / "package.yaml", lambda m: m.__setitem__("template_id", "support\n"))
    edit_yaml(pkg / "manifest.yaml", lambda m: m.__setitem__("id", "support\n"))
    reseal(pkg)
    refused(target, pkg, False, r"package\.yaml: template_id: invalid template id 'support\\n'", tmp)


# -- valid packages import as before -----------------------------------------------------------------


async def test_export_into_a_folder_with_a_quote_round_trips(gateway, tmp_path):
    await traffic(gateway)
    pkg = gateway.core.export_package("support", tmp_path / "it's here")
    other = fresh_core(tmp_path, "other")
    try:
        assert other.import_package(pkg)["analytics_rows_added"] == 6
    finally:
        await other.stop()


async def test_dataset_from_before_labels_imports_with_its_rows_and_ids(world):
    """A package exported before the label columns existed: rows and ids come in unchanged,
    the label columns are added, and nothing that was not ground truth becomes it."""
    pkg, target, tmp = world

    def drop_labels(c: sqlite3.Connection) -> None:
        c.execute("DELETE FROM examples WHERE id = 6")  # a gap retention left: ids are not reused
        for index in ("examples_request", "examples_labelled"):
            c.execute(f"DROP INDEX IF EXISTS {index}")
        for column in ("label_expected", "label_score", "label_comment", "label_source", "labelled_at"):
            c.execute(f"ALTER TABLE examples DROP COLUMN {column}")
        c.execute("ALTER TABLE examples DROP COLUMN labelled")
        c.execute("ALTER TABLE examples DROP COLUMN origin")

    before = sqlite3.connect(pkg / "dataset.sqlite")
    rows = before.execute("SELECT id, request_id, output FROM examples WHERE id < 6 ORDER BY id").fetchall()
    before.close()
    _replace_dataset(pkg, drop_labels)
    edit_yaml(pkg / "package.yaml", lambda m: m["files"][1].__setitem__("rows", 5))
    reseal(pkg)
    result = target.import_package(pkg)
    assert result["dataset_rows"] == 5
    conn = sqlite3.connect(Path(result["path"]) / "dataset.sqlite")
    try:
        assert conn.execute("SELECT id, request_id, output FROM examples ORDER BY id").fetchall() == rows
        assert conn.execute("SELECT sum(labelled), count(label_source) FROM examples").fetchone() == (0, 0)
        assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'examples'").fetchone() == (6,)
    finally:
        conn.close()
    assert target.registry.get("support") is not None


async def test_refusal_never_prints_a_name_from_the_package_raw(world):
    """A member name with a terminal escape is quoted in the message, so it cannot clear or
    recolour the operator's terminal."""
    pkg, target, tmp = world
    evil = _tar_with(pkg, [_member(f"{pkg.name}/\x1b[2Jgone", data=b"x")])
    with pytest.raises(PackageError, match="is not a file a package holds") as exc:
        target.import_package(evil)
    assert "\x1b" not in str(exc.value) and "\\x1b[2Jgone" in str(exc.value)


async def test_inspect_never_lets_a_packages_text_drive_the_terminal(world):
    pkg, _target, _tmp = world
    edit_yaml(pkg / "manifest.yaml", lambda m: m.__setitem__("name", "Support\x1b[2J\x1b]0;owned\x07"))
    reseal(pkg)
    r = runner.invoke(app, ["package", "inspect", str(pkg)])
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "Support\\x1b[2J" in r.output
    assert "checks      " in r.output  # a content check, not only the checksums, decided


# -- YAML aliases: a few bytes that expand to billions of nodes ---------------------------------------


def _alias_bomb(levels: int = 6, width: int = 10) -> str:
    """The billion laughs, as a `provenance` mapping: `width ** levels` strings once expanded."""
    lines = ["provenance:", f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _without(path: Path, key: str) -> str:
    data = yaml.safe_load(path.read_text())
    data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("archive", [False, True])
async def test_manifest_with_a_yaml_alias_bomb_is_refused(world, archive):
    """Imported, it hung every tool that asked the template for its manifest, and the gateway."""
    pkg, target, tmp = world
    (pkg / "manifest.yaml").write_text(_without(pkg / "manifest.yaml", "provenance") + _alias_bomb())
    reseal(pkg)
    refused(target, pkg, archive, r"manifest\.yaml is not valid YAML: .*aliases and anchors", tmp)


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("manifest.yaml", "name: &n Support\n"),  # an anchor alone
        ("manifest.yaml", "provenance: {a: &x [1], b: *x}\n"),
        ("package.yaml", "extra: &x [1]\nmore: *x\n"),
    ],
)
async def test_any_yaml_alias_or_anchor_in_a_package_is_refused(world, file, text):
    pkg, target, tmp = world
    key = yaml.safe_load(text).keys()
    base = pkg / file
    data = yaml.safe_load(base.read_text())
    for k in key:
        data.pop(k, None)
    base.write_text(yaml.safe_dump(data, sort_keys=False) + text)
    if file == "manifest.yaml":
        reseal(pkg)
    refused(target, pkg, False, rf"{file.replace('.', '[.]')} is not valid YAML: .*aliases and anchors", tmp)


def test_registry_does_not_serve_a_manifest_on_disk_with_an_alias_bomb(tmp_path):
    """A manifest someone else wrote into the data dir is reported as broken, not served, so the
    gateway never copies its billion strings."""
    from rswitch.templates import TemplateRegistry

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "manifest.yaml").write_text("id: evil\ntemplate: hi\n" + _alias_bomb(levels=9))
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "manifest.yaml").write_text("id: good\ntemplate: hello\n")
    registry = TemplateRegistry(tmp_path)
    assert registry.get("evil") is None
    assert registry.get("good") is not None
    assert any("evil" in e and "aliases and anchors" in e for e in registry.load_errors), registry.load_errors
    (tmp_path / "evil" / "manifest.yaml").write_text("id: evil\ntemplate: hi\nname: &a x\n")
    changes = TemplateRegistry(tmp_path / "none").scan([tmp_path])
    assert [p.parent.name for p, *_ in changes.errors] == ["evil"]


# -- every manifest field has the type export writes ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.__setitem__("provenance", {"when": date(2026, 1, 1)}), r"provenance\.when .*date"),
        (lambda m: m.__setitem__("provenance", {"blob": b"\x00\x01"}), r"provenance\.blob .*bytes"),
        (lambda m: m.__setitem__("provenance", {"set": {1, 2}}), r"provenance\.set .*set"),
        (lambda m: m.__setitem__("provenance", {1: "x"}), r"provenance has a key 1 that is not a string"),
        (lambda m: m.__setitem__("provenance", {"deep": _nested(100)}), r"provenance is nested more than"),
        (
            lambda m: m.__setitem__("demos", [{"user": "a", "assistant": "b", "x": "c"}]),
            r"demos\[0\] has unknown field 'x'",
        ),
        (
            lambda m: m.__setitem__("variables", ["product", "tone", "not a name"]),
            r"variables\[2\] 'not a name' is not a variable name",
        ),
        (lambda m: m.__setitem__("variables", ["product", "tone", "tone"]), r"variables\[2\] 'tone' twice"),
        (
            lambda m: m.__setitem__("created_at", "yesterday"),
            r"created_at 'yesterday' is not a UTC timestamp",
        ),
        (
            lambda m: m["history"][0].__setitem__("provenance", {"blob": b"x"}),
            r"history\[0\]\.provenance\.blob",
        ),
    ],
)
async def test_manifest_fields_of_a_type_export_never_writes_are_refused(world, change, match):
    pkg, target, tmp = world
    edit_yaml(pkg / "manifest.yaml", change)
    reseal(pkg)
    refused(target, pkg, False, rf"manifest\.yaml: .*{match}", tmp)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# -- ids and the autoincrement sequence ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        (
            "UPDATE sqlite_sequence SET seq = 9223372036854775807 WHERE name = 'examples'",
            r"sqlite_sequence gives 'examples' the next id after 9223372036854775807",
        ),
        (
            "UPDATE examples SET id = 9223372036854775807 WHERE id = 6",
            r"row id 9223372036854775807 is beyond",
        ),
        ("UPDATE examples SET id = -5 WHERE id = 6", r"row id -5 is not 1 or more"),
    ],
    ids=["sequence-2^63-1", "id-2^63-1", "id-negative"],
)
async def test_dataset_ids_that_leave_no_room_for_later_rows_are_refused(world, sql, match):
    """Imported, every later write to the dataset failed with 'database or disk is full'."""
    pkg, target, tmp = world
    _replace_dataset(pkg, lambda c: c.execute(sql))
    refused(target, pkg, False, rf"dataset\.sqlite: {match}", tmp)


# -- values that pass json_valid but break the tools --------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        (
            "UPDATE examples SET output = char(55296) WHERE id = 2",
            r"row id 2 has text in 'output' that is not",
        ),
        (
            "UPDATE examples SET error = CAST(x'c0ff' AS TEXT) WHERE id = 3",
            r"row id 3 has text in 'error' that is not valid UTF-8",
        ),
        (
            "UPDATE examples SET messages = json_array(json_object('role', 'user', 'content', char(55296))) "
            "WHERE id = 2",
            r"row id 2 has text in 'messages' that is not valid UTF-8",
        ),
        (
            """UPDATE examples SET messages = '[{"role": "user", "content": "\\ud800"}]' WHERE id = 2""",
            r"row id 2 has a 'messages' that is not JSON",
        ),
        ("UPDATE examples SET messages = '5' WHERE id = 2", r"row id 2: 'messages' must be a JSON array"),
        (
            """UPDATE examples SET messages = '[{"content": "hi"}]' WHERE id = 2""",
            r"row id 2: 'messages\[0\]' must be an object with a string 'role'",
        ),
        (
            """UPDATE examples SET messages = '[{"role": 5}]' WHERE id = 4""",
            r"row id 4: 'messages\[0\]' must be an object with a string 'role'",
        ),
        ("UPDATE examples SET variables = '[]' WHERE id = 2", r"row id 2: 'variables' must be a JSON object"),
        (
            "UPDATE examples SET variables = '" + '{"a":' * 900 + "1" + "}" * 900 + "' WHERE id = 5",
            r"row id 5: 'variables' is nested more than 64 levels",
        ),
        (
            """UPDATE examples SET messages = '[{"role": "user", "content": """
            + "[" * 70
            + "]" * 70
            + "}]' WHERE id = 2",
            r"row id 2: 'messages' is nested more than 64 levels",
        ),
        ("UPDATE examples SET cost = 9e999 WHERE id = 3", r"row id 3 has a 'cost' that is not a finite"),
        (
            "UPDATE examples SET latency_ms = -9e999 WHERE id = 3",
            r"row id 3 has a 'latency_ms' that is not a",
        ),
    ],
    ids=[
        "lone-surrogate",
        "not-utf8",
        "surrogate-in-json",
        "surrogate-escape",
        "messages-5",
        "no-role",
        "role-5",
        "variables-array",
        "variables-900-deep",
        "messages-70-deep",
        "inf-cost",
        "inf-latency",
    ],
)
async def test_dataset_values_the_tools_cannot_read_are_refused(world, sql, match):
    """Imported, `dataset show`, `dataset export` and `package export` crashed on them."""
    pkg, target, tmp = world
    _replace_dataset(pkg, lambda c: c.execute(sql))
    refused(target, pkg, False, rf"dataset\.sqlite: {match}", tmp)


# -- analytics: bounded rows, finite numbers ----------------------------------------------------------


def _set_rows(pkg: Path, rel: str, rows: int) -> None:
    edit_yaml(
        pkg / "package.yaml",
        lambda m: [f.__setitem__("rows", rows) for f in m["files"] if f["path"] == rel],
    )


async def test_small_analytics_file_that_repeats_its_rows_is_refused(world):
    """820 KB of Parquet added 30,000,000 rows: repeated rows compress to nothing."""
    pkg, target, tmp = world
    _rewrite_parquet(pkg, "SELECT s.* FROM {src} s, range(2000)")
    _set_rows(pkg, "analytics.parquet", 12000)
    reseal(pkg)
    refused(target, pkg, False, r"analytics\.parquet: 11994 row\(s\) repeat another row's", tmp)


async def test_analytics_beyond_the_row_bound_is_refused(world):
    from rswitch.packaging.checks import MAX_ANALYTICS_ROWS

    pkg, target, tmp = world
    n = MAX_ANALYTICS_ROWS // 6 + 1
    _rewrite_parquet(
        pkg, f"SELECT s.* REPLACE (s.request_id || '-' || r.range AS request_id) FROM {{src}} s, range({n}) r"
    )
    _set_rows(pkg, "analytics.parquet", 6 * n)
    reseal(pkg)
    refused(target, pkg, False, rf"analytics\.parquet holds {6 * n} row\(s\); a package carries at most", tmp)


@pytest.mark.parametrize(
    ("replace", "match"),
    [
        ("'nan'::DOUBLE AS cost", r"'cost' that is not a finite number of 0 or more"),
        ("'inf'::DOUBLE AS duration_ms", r"'duration_ms' that is not a finite number of 0 or more"),
        ("-1.0::DOUBLE AS ttft_ms", r"'ttft_ms' that is not a finite number of 0 or more"),
        ("-5::INTEGER AS prompt_tokens", r"'prompt_tokens' that is not a count"),
    ],
)
async def test_analytics_numbers_that_are_not_finite_are_refused(world, replace, match):
    """Imported, /status showed total_cost null."""
    pkg, target, tmp = world
    _rewrite_parquet(pkg, f"SELECT * REPLACE ({replace}) FROM {{src}}")
    refused(target, pkg, False, rf"analytics\.parquet: 6 row\(s\) have a {match}", tmp)


async def test_export_keeps_the_newest_analytics_rows_within_the_bound_and_they_import(
    gateway, tmp_path, monkeypatch
):
    """A busy template's package carries its newest rows up to the bound, so import takes it."""
    from rswitch.packaging import checks

    await traffic(gateway)
    monkeypatch.setattr(checks, "MAX_ANALYTICS_ROWS", 4)
    pkg = gateway.core.export_package("support", tmp_path / "out")
    meta = yaml.safe_load((pkg / "package.yaml").read_text())
    assert [f["rows"] for f in meta["files"] if f["path"] == "analytics.parquet"] == [4]
    newest = gateway.core.analytics._conn.execute(
        "SELECT request_id FROM invocations WHERE template_id = 'support' "
        "ORDER BY created_at DESC, request_id DESC LIMIT 4"
    ).fetchall()
    other = fresh_core(tmp_path, "other")
    try:
        assert other.import_package(pkg)["analytics_rows_added"] == 4
        got = other.analytics._conn.execute("SELECT request_id FROM invocations").fetchall()
        assert sorted(got) == sorted(newest)
    finally:
        await other.stop()


def test_a_manifest_rswitch_writes_never_holds_an_alias(tmp_path):
    """Values shared inside what rswitch writes (the same list twice) are written out twice, so
    the registry, which refuses aliases, reads back every manifest rswitch wrote."""
    from rswitch.templates import TemplateRegistry, write_yaml

    shared = [0.5, 0.9]
    write_yaml(
        tmp_path / "t" / "manifest.yaml",
        {"id": "t", "template": "hi", "provenance": {"ci": shared, "again": shared}},
    )
    assert "&" not in (tmp_path / "t" / "manifest.yaml").read_text()
    registry = TemplateRegistry(tmp_path)
    assert registry.load_errors == []
    assert registry.get("t").provenance == {"ci": [0.5, 0.9], "again": [0.5, 0.9]}
