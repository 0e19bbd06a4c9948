"""Which process owns a data directory: `<data dir>/rswitch.lock`.

A gateway (`rswitch serve`, or `rswitch tui`'s in-process one) writes the lock once it is
answering: JSON {pid, admin_url, started_at}, written to a temporary file and renamed, so a
reader never sees half of it; it removes the lock when it stops gracefully. The CLI's commands
that change or read the stores ask `live_owner` and, when a gateway owns the directory, go
through its admin API instead of opening files that gateway holds (DuckDB allows one writer).

A lock is stale, and ignored (then replaced by the next gateway), when it cannot be read, its
process is gone, or its /health does not answer: a gateway killed with SIGKILL never stops a
later command or gateway."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

LOCK_NAME = "rswitch.lock"
HEALTH_TIMEOUT = 2.0  # seconds a live gateway has to answer /health


@dataclass(frozen=True)
class Owner:
    pid: int
    admin_url: str
    started_at: str


def lock_path(data_dir: Path) -> Path:
    return Path(data_dir) / LOCK_NAME


def admin_url(host: str, port: int) -> str:
    """Where a process on this machine reaches a gateway bound to `host`: a wildcard address
    (0.0.0.0, ::) is reached on loopback; an IPv6 address goes in brackets."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write(data_dir: Path, url: str) -> Owner:
    """Record this process as the owner of `data_dir` (replacing whatever lock was there)."""
    owner = Owner(os.getpid(), url, datetime.now(UTC).isoformat(timespec="seconds"))
    path = lock_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{LOCK_NAME}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(orjson.dumps(owner.__dict__, option=orjson.OPT_INDENT_2) + b"\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return owner


def remove(data_dir: Path) -> None:
    """Remove the lock if it is this process's (never another gateway's that replaced it)."""
    path = lock_path(data_dir)
    found = read(data_dir)
    if found is not None and found.pid == os.getpid():
        path.unlink(missing_ok=True)


def read(data_dir: Path) -> Owner | None:
    """The lock as written, or None when there is none or it cannot be read."""
    try:
        data: Any = orjson.loads(lock_path(data_dir).read_bytes())
        owner = Owner(int(data["pid"]), str(data["admin_url"]), str(data.get("started_at") or ""))
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return owner if owner.pid > 0 and owner.admin_url.startswith(("http://", "https://")) else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def answers(url: str, timeout: float = HEALTH_TIMEOUT) -> bool:
    """Whether an rswitch gateway answers /health at `url`."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=timeout)
        return r.status_code == 200 and r.json().get("status") == "healthy"
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def live_owner(data_dir: Path) -> Owner | None:
    """The running gateway that owns `data_dir`, or None (no lock, or a stale one)."""
    owner = read(data_dir)
    if owner is None or not alive(owner.pid) or not answers(owner.admin_url):
        return None
    return owner
