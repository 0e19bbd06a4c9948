"""The operator interface over HTTP: a client of a running gateway's admin API (/admin/v1).

`HttpOperator(url, admin_key)` implements `rswitch.admin.actions.Operator` with the same
methods, arguments, typed answers and errors as `LocalOperator`, so a face (the CLI, an
attached console) does not know which it has. A refusal by the gateway is raised as the
`GatewayError` it answered with (status, message, code, param); a gateway that cannot be
reached, or stops answering mid-call, is `Unreachable` (a GatewayError too, status 503).
The admin key is sent as `Authorization: Bearer …` and never appears in an error.

One client holds one pooled connection set bound to the event loop that first uses it: use
it from one loop, and `await op.aclose()` (or `async with HttpOperator(...)`) when done."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import orjson
from pydantic import BaseModel

from rswitch.admin import actions, views
from rswitch.admin.api import PREFIX
from rswitch.gateway.errors import GatewayError

M = TypeVar("M", bound=BaseModel)

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# building or importing a package, or a big dataset, may take a while on the server
SLOW = httpx.Timeout(600.0, connect=5.0)
CHUNK = 1 << 16


class Unreachable(GatewayError):
    """The gateway could not be reached, or the connection broke before it answered."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            503, f"cannot reach the gateway at {url}: {reason}", error_type="api_error", code="unreachable"
        )
        self.url = url


def _refusal(r: httpx.Response) -> GatewayError:
    """The gateway's OpenAI-shaped error as a GatewayError (or a plain one if the body is not that)."""
    try:
        err = orjson.loads(r.content)["error"]
        return GatewayError(
            r.status_code,
            str(err.get("message") or f"HTTP {r.status_code}"),
            error_type=str(err.get("type") or "invalid_request_error"),
            code=err.get("code"),
            param=err.get("param"),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        text = r.text.strip()[:200] or r.reason_phrase
        return GatewayError(
            r.status_code, f"HTTP {r.status_code} from the gateway: {text}", code="http_error"
        )


def _filename(r: httpx.Response, fallback: str) -> str:
    """The download's file name from Content-Disposition: a bare name only (no folders)."""
    m = re.search(r'filename="?([^";]+)"?', r.headers.get("content-disposition", ""))
    name = os.path.basename(m.group(1).strip()) if m else ""
    return name if name and name not in (".", "..") else fallback


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


class HttpOperator:
    """The `Operator` interface over a running gateway's admin API (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        admin_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url + PREFIX, headers=headers, timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpOperator:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the wire ---------------------------------------------------------------------------------------

    async def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = await self._client.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None
        if r.status_code >= 400:
            raise _refusal(r)
        return r

    async def _json(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        r = await self._send(method, path, **kw)
        return model.model_validate(orjson.loads(r.content))

    @staticmethod
    def _query(**params: Any) -> dict[str, Any]:
        out = {}
        for k, v in params.items():
            if v is not None:
                out[k] = ("true" if v else "false") if isinstance(v, bool) else v
        return out

    # -- views --------------------------------------------------------------------------------------

    async def snapshot(self, events_after: int = 0) -> views.ConsoleSnapshot:
        return await self._json(
            views.ConsoleSnapshot, "GET", "/snapshot", params={"events_after": events_after}
        )

    async def status(self) -> views.Status:
        return await self._json(views.Status, "GET", "/status")

    async def recent_call(self, request_id: str, attempt: int | None = None) -> views.RecentCall:
        return await self._json(
            views.RecentCall, "GET", f"/calls/{_seg(request_id)}", params=self._query(attempt=attempt)
        )

    async def inflight_call(self, request_id: str) -> views.InFlightDetail:
        return await self._json(views.InFlightDetail, "GET", f"/inflight/{_seg(request_id)}")

    async def optimizer_runs(self, template_id: str | None = None) -> actions.OptimizerRuns:
        return await self._json(
            actions.OptimizerRuns, "GET", "/optimizer/runs", params=self._query(template_id=template_id)
        )

    async def optimizer_trials(
        self, run_id: str | None = None, template_id: str | None = None
    ) -> actions.OptimizerTrials:
        return await self._json(
            actions.OptimizerTrials,
            "GET",
            "/optimizer/trials",
            params=self._query(run_id=run_id, template_id=template_id),
        )

    # -- combinations ----------------------------------------------------------------------------

    async def reweight(self, combination_id: str, weight: float) -> views.CombinationView:
        return await self._json(
            views.CombinationView,
            "POST",
            f"/combinations/{_seg(combination_id)}/weight",
            json={"weight": weight},
        )

    async def set_enabled(self, combination_id: str, enabled: bool) -> views.CombinationView:
        action = "enable" if enabled else "disable"
        return await self._json(
            views.CombinationView, "POST", f"/combinations/{_seg(combination_id)}/{action}"
        )

    async def reset_weights(self) -> actions.CombinationsChanged:
        return await self._json(actions.CombinationsChanged, "POST", "/combinations/reset")

    # -- optimizer --------------------------------------------------------------------------------

    async def optimize(self, template_id: str) -> actions.OptimizeQueued:
        return await self._json(
            actions.OptimizeQueued, "POST", "/optimizer/runs", json={"template_id": template_id}
        )

    async def cancel_optimize(self) -> actions.OptimizeCancelled:
        return await self._json(actions.OptimizeCancelled, "POST", "/optimizer/cancel")

    # -- compare ----------------------------------------------------------------------------------

    async def compare(self, template_id: str, spec: actions.CompareSpec) -> actions.CompareStarted:
        return await self._json(
            actions.CompareStarted,
            "POST",
            f"/templates/{_seg(template_id)}/compare",
            json=spec.model_dump(exclude_defaults=True),
        )

    async def compare_runs(self, template_id: str) -> actions.CompareRuns:
        return await self._json(actions.CompareRuns, "GET", f"/templates/{_seg(template_id)}/compare/runs")

    async def apply_compare(self, template_id: str, run_id: str) -> actions.CompareApplied:
        return await self._json(
            actions.CompareApplied,
            "POST",
            f"/templates/{_seg(template_id)}/compare/runs/{_seg(run_id)}/apply",
        )

    # -- packages ---------------------------------------------------------------------------------

    async def export_package(
        self, template_id: str, output_dir: Path, *, include_analytics: bool = True, logs_limit: int = 1000
    ) -> Path:
        """The server builds the package; it is downloaded into `output_dir` under the name the
        server gave it (`<id>-<stamp>.tar.gz`), written whole or not at all. Returns its path."""
        body = {"template_id": template_id, "include_analytics": include_analytics, "logs_limit": logs_limit}
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            async with self._client.stream("POST", "/packages/export", json=body, timeout=SLOW) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise _refusal(r)
                target = output_dir / _filename(r, f"{template_id}.tar.gz")
                part = target.with_name(target.name + ".part")
                try:
                    with part.open("wb") as fh:
                        async for chunk in r.aiter_bytes(CHUNK):
                            fh.write(chunk)
                    part.replace(target)
                finally:
                    part.unlink(missing_ok=True)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None
        return target

    async def import_package(
        self, path: Path, *, overwrite: bool = False, restore_analytics: bool = True
    ) -> actions.PackageImported:
        path = Path(path)
        return await self._json(
            actions.PackageImported,
            "POST",
            "/packages/import",
            params=self._query(overwrite=overwrite, restore_analytics=restore_analytics),
            content=_file_chunks(path),
            headers={"content-type": "application/gzip", "content-length": str(path.stat().st_size)},
            timeout=SLOW,
        )

    # -- datasets -----------------------------------------------------------------------------------

    async def dataset_export(self, template_id: str, *, labelled: bool = False) -> bytes:
        r = await self._send(
            "GET",
            f"/datasets/{_seg(template_id)}/export",
            params=self._query(labelled=labelled),
            timeout=SLOW,
        )
        return r.content

    async def dataset_import(self, template_id: str, rows: list[dict[str, Any]]) -> actions.DatasetImported:
        body = b"".join(orjson.dumps(r) + b"\n" for r in rows)
        return await self._json(
            actions.DatasetImported,
            "POST",
            f"/datasets/{_seg(template_id)}/import",
            content=body,
            headers={"content-type": "application/x-ndjson"},
            timeout=SLOW,
        )

    # -- templates ----------------------------------------------------------------------------------

    async def template_register(self, spec: actions.TemplateSpec) -> actions.TemplateVersion:
        return await self._json(
            actions.TemplateVersion, "POST", "/templates", json=spec.model_dump(exclude_none=True)
        )

    async def template_history(self, template_id: str) -> actions.TemplateHistory:
        return await self._json(actions.TemplateHistory, "GET", f"/templates/{_seg(template_id)}/history")

    async def template_rollback(self, template_id: str, version: int) -> actions.TemplateVersion:
        return await self._json(
            actions.TemplateVersion,
            "POST",
            f"/templates/{_seg(template_id)}/rollback",
            json={"version": version},
        )


def _seg(value: str) -> str:
    """One path segment, escaped (an id with a slash stays one segment)."""
    from urllib.parse import quote

    return quote(value, safe="")
