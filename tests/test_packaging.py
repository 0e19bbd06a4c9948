"""Portable packages: round trips, consistency under load, and refusals that change nothing."""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import sqlite3
import tarfile
from pathlib import Path

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.config import parse_config
from rswitch.core import Core
from rswitch.packaging import PackageError, inspect_package
from rswitch.templates import Template
from tests.conftest import SUPPORT_VARS, chat

runner = CliRunner()


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its hash: 'exactly as it was' made checkable."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def dataset_rows(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT * FROM examples ORDER BY id").fetchall()
    finally:
        conn.close()


def analytics_rows(conn, template_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT * FROM invocations WHERE template_id = ? ORDER BY created_at, request_id, combination_id",
        [template_id],
    ).fetchall()


async def traffic(gw, n: int = 6) -> None:
    gw.core.registry.register(Template(id="support", template="You support {product}. Be {tone}."))
    gw.core.registry.register(Template(id="support", template="You support {product}. Be very {tone}."))
    for i in range(n):
        r = await gw.post(chat(f"question {i}", model="support", variables=SUPPORT_VARS))
        assert r.status_code == 200
    await gw.post(chat("other", model="sum-a", variables={"words": 3}))  # another template's traffic
    gw.flush()


def fresh_core(tmp_path: Path, name: str) -> Core:
    cfg = parse_config(
        {
            "model_providers": {"mock": {"type": "mock"}},
            "dataset": {"base_path": str(tmp_path / name / "prompts")},
            "analytics": {"path": str(tmp_path / name / "a.duckdb")},
        }
    )
    return Core(cfg)


@pytest.mark.parametrize("archive", [False, True])
async def test_round_trip_into_a_fresh_data_dir_is_identical(gateway, tmp_path, archive):
    await traffic(gateway)
    pkg = gateway.core.export_package("support", tmp_path / "out", archive=archive, logs_limit=4)
    assert pkg.name.startswith("support-") and (pkg.suffixes[-2:] == [".tar", ".gz"]) == archive

    other = fresh_core(tmp_path, "other")
    try:
        result = other.import_package(pkg)
        assert result["dataset_rows"] == 6 and result["analytics_rows_added"] == 6
        src = gateway.core.registry
        dst = other.registry
        assert (
            dst.get("support").template == src.get("support").template and dst.get("support").version == 3
        )  # v1 from the config, then two registrations
        assert dst.history("support") == src.history("support") and len(dst.history("support")) == 2
        assert dataset_rows(tmp_path / "other" / "prompts" / "support" / "dataset.sqlite") == dataset_rows(
            tmp_path / "prompts" / "support" / "dataset.sqlite"
        )
        assert analytics_rows(other.analytics._conn, "support") == analytics_rows(
            gateway.core.analytics._conn, "support"
        )
        assert analytics_rows(other.analytics._conn, "summarise") == []  # only this template's rows travel
    finally:
        await other.stop()


async def test_package_contents_and_inspect(gateway, tmp_path):
    await traffic(gateway)
    pkg = gateway.core.export_package("support", tmp_path / "out", logs_limit=4)
    meta = yaml.safe_load((pkg / "package.yaml").read_text())
    files = {f["path"]: f for f in meta["files"]}
    assert set(files) == {"manifest.yaml", "dataset.sqlite", "logs/recent.jsonl", "analytics.parquet"}
    assert (
        files["dataset.sqlite"]["rows"] == 6
        and files["logs/recent.jsonl"]["rows"] == 4
        and files["analytics.parquet"]["rows"] == 6
    )
    assert meta["format_version"] == 1 and meta["template_id"] == "support"
    logs = (pkg / "logs" / "recent.jsonl").read_text().splitlines()
    assert [yaml.safe_load(x)["messages"][0]["content"] for x in logs] == [
        f"question {i}" for i in range(2, 6)
    ]
    info = inspect_package(pkg)
    assert info["checksums_ok"] and info["versions"] == [1, 2, 3] and info["time_range"]["first"]
    r = runner.invoke(app, ["package", "inspect", str(pkg)])
    assert r.exit_code == 0 and "checks      OK" in r.output and "dataset.sqlite" in r.output


async def test_export_while_recording_is_a_consistent_snapshot(gateway, tmp_path):
    await traffic(gateway, 3)
    stop = asyncio.Event()

    async def keep_sending() -> int:
        n = 0
        while not stop.is_set():
            await gateway.post(chat(f"busy {n}", model="support", variables=SUPPORT_VARS))
            n += 1
            await asyncio.sleep(0)
        return n

    sender = asyncio.create_task(keep_sending())
    packages = []
    for i in range(3):
        packages.append(await asyncio.to_thread(gateway.core.export_package, "support", tmp_path / f"out{i}"))
    stop.set()
    sent = await sender
    assert sent > 0
    for pkg in packages:
        other = fresh_core(tmp_path, pkg.parent.name)
        try:
            result = other.import_package(pkg)  # checksums and row counts hold
            rows = dataset_rows(Path(result["path"]) / "dataset.sqlite")
            assert len(rows) == result["dataset_rows"] >= 3
        finally:
            await other.stop()


async def test_second_import_merges_analytics_without_duplicates_and_overwrite_replaces(gateway, tmp_path):
    await traffic(gateway)
    pkg = gateway.core.export_package("support", tmp_path / "out")
    other = fresh_core(tmp_path, "other")
    try:
        other.import_package(pkg)
        with pytest.raises(PackageError, match="already exists.*--overwrite"):
            other.import_package(pkg)
        again = other.import_package(pkg, overwrite=True)
        assert again["replaced"] and again["analytics_rows_added"] == 0
        assert other.analytics._conn.execute("SELECT count(*) FROM invocations").fetchone()[0] == 6
    finally:
        await other.stop()


async def test_no_secret_ends_up_in_a_package(make_gateway, tmp_path, monkeypatch):
    monkeypatch.setenv("RSWITCH_PKG_API_KEY", "sk-package-secret-123")
    gw = await make_gateway(
        {"model_providers": {"keyed": {"type": "mock", "api_key_env": "RSWITCH_PKG_API_KEY"}}}
    )
    await traffic(gw)
    pkg = gw.core.export_package("support", tmp_path / "clean", archive=True)
    assert b"sk-package-secret-123" not in pkg.read_bytes()
    with tarfile.open(pkg) as tar:
        for m in tar.getmembers():
            if m.isfile():
                assert b"sk-package-secret-123" not in tar.extractfile(m).read()
    # a key that reached the data (pasted into a message) stops the export, and nothing is written
    await gw.post(chat("my key is sk-package-secret-123", model="support", variables=SUPPORT_VARS))
    with pytest.raises(
        PackageError, match=r"dataset.sqlite contains a secret \(the value of \$RSWITCH_PKG_API_KEY\)"
    ) as exc:
        gw.core.export_package("support", tmp_path / "leaky")
    assert "sk-package-secret-123" not in str(exc.value)
    assert list((tmp_path / "leaky").iterdir()) == []


# -- refusals ----------------------------------------------------------------------------------------


@pytest.fixture
async def exported(gateway, tmp_path):
    await traffic(gateway)
    pkg = gateway.core.export_package("support", tmp_path / "out")
    target = fresh_core(tmp_path, "target")
    # the target already holds other data that must survive every refusal untouched
    target.registry.register(Template(id="keep", template="keep me"))
    yield pkg, target, tmp_path / "target"
    await target.stop()


@pytest.mark.parametrize(
    "victim", ["manifest.yaml", "dataset.sqlite", "logs/recent.jsonl", "analytics.parquet"]
)
async def test_flipped_byte_in_any_file_is_refused(exported, victim):
    pkg, target, data = exported
    before = tree(data)
    path = pkg / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match=f"checksum mismatch for {victim}"):
        target.import_package(pkg)
    assert tree(data) == before


async def test_missing_file_is_refused(exported):
    pkg, target, data = exported
    before = tree(data)
    (pkg / "dataset.sqlite").unlink()
    with pytest.raises(PackageError, match="missing file: dataset.sqlite"):
        target.import_package(pkg)
    assert tree(data) == before


async def test_unknown_format_version_is_refused(exported):
    pkg, target, data = exported
    before = tree(data)
    meta = yaml.safe_load((pkg / "package.yaml").read_text())
    meta["format_version"] = 99
    (pkg / "package.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(PackageError, match="unsupported package format version 99"):
        target.import_package(pkg)
    assert tree(data) == before


async def test_truncated_archive_and_non_archive_are_refused(exported, tmp_path):
    pkg, target, data = exported
    before = tree(data)
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pkg, arcname=pkg.name)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(PackageError, match="truncated or corrupt"):
        target.import_package(cut)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive at all")
    with pytest.raises(PackageError, match="is not a package archive"):
        target.import_package(junk)
    assert tree(data) == before


def _archive_with(tmp_path: Path, pkg: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    out = tmp_path / f"evil-{extra.name.replace('/', '_')}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(pkg, arcname=pkg.name)
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return out


async def test_path_traversal_and_link_entries_are_refused(exported, tmp_path):
    pkg, target, data = exported
    before = tree(data)
    dotdot = tarfile.TarInfo(f"{pkg.name}/../../escaped.txt")
    dotdot.size = 3
    with pytest.raises(PackageError, match=r"escapes the package folder \('\.\.'\)"):
        target.import_package(_archive_with(tmp_path, pkg, dotdot, b"bad"))
    absolute = tarfile.TarInfo("/tmp/absolute.txt")
    absolute.size = 3
    with pytest.raises(PackageError, match="absolute path"):
        target.import_package(_archive_with(tmp_path, pkg, absolute, b"bad"))
    link = tarfile.TarInfo(f"{pkg.name}/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(PackageError, match="is a link"):
        target.import_package(_archive_with(tmp_path, pkg, link))
    assert tree(data) == before
    assert not (tmp_path / "escaped.txt").exists()


async def test_symlink_in_a_package_folder_is_refused(exported):
    pkg, target, data = exported
    before = tree(data)
    (pkg / "sneaky").symlink_to("/etc/hostname")
    with pytest.raises(PackageError, match="is a link"):
        target.import_package(pkg)
    assert tree(data) == before


async def test_failed_analytics_merge_leaves_everything_as_it_was(exported):
    pkg, target, data = exported
    # a store whose table lacks a column the package carries: the merge will fail
    target.analytics._conn.execute("ALTER TABLE invocations DROP COLUMN cost")
    before = tree(data)
    with pytest.raises(PackageError, match="could not merge analytics.parquet"):
        target.import_package(pkg)
    assert tree(data) == before
    assert target.registry.get("support") is None


# -- CLI ---------------------------------------------------------------------------------------------


async def test_cli_export_import_inspect(gateway, tmp_path):
    await traffic(gateway)
    await gateway.core.stop()  # the CLI opens the stores itself, as when no gateway is running
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "dataset": {"base_path": str(tmp_path / "prompts")},
                "analytics": {"path": str(tmp_path / "analytics.duckdb")},
            }
        )
    )
    r = runner.invoke(
        app,
        [
            "package",
            "export",
            "--template-id",
            "support",
            "-c",
            str(cfg),
            "--output-dir",
            str(tmp_path / "pk"),
            "--archive",
        ],
    )
    assert r.exit_code == 0, r.output
    [pkg] = list((tmp_path / "pk").iterdir())
    r = runner.invoke(
        app,
        ["package", "export", "--template-id", "ghost", "-c", str(cfg), "--output-dir", str(tmp_path / "pk")],
    )
    assert r.exit_code != 0 and "unknown template id 'ghost'" in r.output

    cfg2 = tmp_path / "config2.yaml"
    cfg2.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "dataset": {"base_path": str(tmp_path / "p2")},
                "analytics": {"path": str(tmp_path / "a2.duckdb")},
            }
        )
    )
    r = runner.invoke(app, ["package", "import", str(pkg), "-c", str(cfg2)])
    assert r.exit_code == 0 and "6 dataset row(s), 6 analytics row(s) added" in r.output, r.output
    r = runner.invoke(app, ["package", "import", str(pkg), "-c", str(cfg2)])
    assert r.exit_code != 0 and "already exists" in r.output
    r = runner.invoke(
        app, ["package", "import", str(pkg), "-c", str(cfg2), "--overwrite", "--no-restore-analytics"]
    )
    assert r.exit_code == 0 and "replaced" in r.output
    db = duckdb.connect(str(tmp_path / "a2.duckdb"), read_only=True)
    assert db.execute("SELECT count(*) FROM invocations").fetchone()[0] == 6
    db.close()
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "p2" / "support", broken)
    r = runner.invoke(app, ["package", "inspect", str(broken)])
    assert r.exit_code != 0 and "package.yaml is missing" in r.output


async def test_failed_swap_rolls_back_analytics_and_keeps_the_old_data(gateway, tmp_path, monkeypatch):
    await traffic(gateway)
    pkg = gateway.core.export_package("support", tmp_path / "out")
    target = fresh_core(tmp_path, "target")
    try:
        target.import_package(pkg)
        target.analytics._conn.execute("DELETE FROM invocations")  # so a merge would add rows again
        before = tree(tmp_path / "target" / "prompts")
        import rswitch.packaging as packaging

        real_replace = packaging.os.replace

        def failing_replace(src, dst):
            if Path(dst).name == "support" and ".import-" in Path(src).name:
                raise OSError("disk went away")
            return real_replace(src, dst)

        monkeypatch.setattr(packaging.os, "replace", failing_replace)
        with pytest.raises(OSError, match="disk went away"):
            target.import_package(pkg, overwrite=True)
        assert tree(tmp_path / "target" / "prompts") == before  # old template and dataset back in place
        assert target.analytics._conn.execute("SELECT count(*) FROM invocations").fetchone()[0] == 0
    finally:
        await target.stop()
