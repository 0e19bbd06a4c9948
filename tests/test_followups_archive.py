"""Package archives have a size bound: one that would unpack to more than a package may hold (a
decompression bomb) is refused from its headers, before anything is written, and changes nothing."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.packaging import PackageError
from tests.test_packaging import tree
from tests.test_packaging_hostile import as_archive, world  # noqa: F401 (a fixture)

runner = CliRunner()
GiB = 1024**3


def claiming(tmp_path: Path, size: int) -> Path:
    """A few kilobytes of .tar.gz whose dataset.sqlite header claims `size` bytes."""
    out = tmp_path / "bomb.tar.gz"
    meta = b"format_version: 1\ntemplate_id: support\n"
    with gzip.open(out, "wb") as gz:
        head = tarfile.TarInfo("support-x/package.yaml")
        head.size = len(meta)
        gz.write(head.tobuf(format=tarfile.USTAR_FORMAT) + meta.ljust(512, b"\0"))
        big = tarfile.TarInfo("support-x/dataset.sqlite")
        big.size = size
        gz.write(big.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 8192)  # the first blocks of it
    return out


def zeros(tmp_path: Path, size: int) -> Path:
    """A real bomb, small: `size` bytes of zeros as dataset.sqlite, compressed to a few kilobytes."""
    out = tmp_path / "zeros.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        info = tarfile.TarInfo("support-x/dataset.sqlite")
        info.size = size
        with (tmp_path / "zeros").open("wb+") as fh:
            fh.truncate(size)
            fh.seek(0)
            tar.addfile(info, fh)
    (tmp_path / "zeros").unlink()
    return out


def unchanged(target, tmp_path: Path, path: Path, match: str, **limit: int) -> None:
    before = tree(tmp_path / "target")
    with pytest.raises(PackageError, match=match):
        target.import_package(path, **limit)
    assert tree(tmp_path / "target") == before
    assert [p.name for p in (tmp_path / "target" / "prompts").iterdir() if p.name.startswith(".")] == []
    assert target.registry.get("support") is None


async def test_headers_claiming_more_than_4_gib_are_refused_before_extracting(world):  # noqa: F811
    _, target, tmp = world
    bomb = claiming(tmp, 5 * GiB)
    assert bomb.stat().st_size < 64 * 1024
    unchanged(target, tmp, bomb, r"unpacks to more than 4\.0 GiB \(5\.0 GiB so far\).*nothing was extracted")
    r = runner.invoke(app, ["package", "inspect", str(bomb)])
    assert r.exit_code == 2 and "unpacks to more than 4.0 GiB" in r.output


async def test_a_compressed_bomb_past_the_limit_is_refused(world):  # noqa: F811
    _, target, tmp = world
    bomb = zeros(tmp, 8 * 1024 * 1024)
    assert bomb.stat().st_size < 64 * 1024
    unchanged(target, tmp, bomb, r"unpacks to more than 1\.0 MiB", max_unpacked_bytes=1024 * 1024)


async def test_a_real_package_within_the_limit_still_imports(world):  # noqa: F811
    pkg, target, tmp = world
    archive = as_archive(pkg)
    size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    unchanged(target, tmp, archive, r"unpacks to more than", max_unpacked_bytes=size - 1)
    assert target.import_package(archive, max_unpacked_bytes=size)["template_id"] == "support"
