"""The access log: one line per request at INFO on the `rswitch.access` logger — method, path,
status, milliseconds and, for chat requests, the combination that answered and the attempts
made. The fields ride on the record as `access`, so a JSON formatter can emit them as keys."""

from __future__ import annotations

import logging
from typing import Any

access_log = logging.getLogger("rswitch.access")


def access(method: str, path: str, status: int, ms: float | None, **fields: Any) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    line = {"method": method, "path": path, "status": status, "ms": None if ms is None else round(ms, 2)}
    line.update((k, v) for k, v in fields.items() if v is not None)
    extra = " ".join(
        f"{k}={v}" for k, v in line.items() if k not in ("method", "path", "status", "ms", "route")
    )
    access_log.info(
        "%s %s %s %s%s",
        method,
        path,
        status,
        "-" if ms is None else f"{ms:.1f}ms",
        f" {extra}" if extra else "",
        extra={"access": line},
    )
