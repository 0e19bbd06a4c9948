"""The admin API: the operator's views and actions over HTTP, under one versioned prefix.

Every route is declared once in `ENDPOINTS` (method, path, handler, models); the Starlette
routes and the OpenAPI description (`GET /admin/v1/openapi.json`) are both made from it, so
the description cannot drift from what is served. The handlers only translate HTTP to the
operator interface (`rswitch.admin.actions`) and back; who may call them is decided by the
guards `rswitch.server` passes in (the admin key; mutations also refuse foreign origins)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from rswitch import __version__
from rswitch.admin import actions, views
from rswitch.gateway.errors import GatewayError
from rswitch.server import JSON, error_response, read_json

if TYPE_CHECKING:
    from rswitch.core import Core

PREFIX = "/admin/v1"
# a package or a dataset sent to import (a JSON action body has gateway.max_body_bytes)
MAX_UPLOAD_BYTES = 1024**3
HEARTBEAT_SECONDS = 15.0  # a comment line on an idle event stream, so proxies keep it open
EVENT_POLL_SECONDS = 0.2  # how often an event stream looks for new events (a deque read on the loop)
PACKAGE_TYPES = ("application/gzip", "application/x-gzip", "application/octet-stream")
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/json")

Handler = Callable[[Request], Awaitable[Response]]


# -- request bodies ----------------------------------------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReweightBody(Body):
    weight: float = Field(ge=0)


class OptimizeBody(Body):
    template_id: str


class ExportBody(Body):
    template_id: str
    include_analytics: bool = True
    logs_limit: int = Field(1000, ge=0)


class RollbackBody(Body):
    version: int = Field(ge=1)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every refusal: OpenAI's error shape."""

    error: ErrorDetail


# -- the route table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # path | query
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # under PREFIX
    name: str  # the handler's name on AdminAPI, and the OpenAPI operationId
    summary: str
    response: type[BaseModel] | None  # None: a non-JSON answer, described by `media`
    body: type[BaseModel] | None = None
    mutation: bool = False
    status: int = 200
    media: str = "application/json"  # the answer's type
    upload: tuple[str, ...] = ()  # a non-JSON request body's accepted types
    params: tuple[Param, ...] = field(default_factory=tuple)


STR = {"type": "string"}
INT = {"type": "integer", "minimum": 0}
BOOL = {"type": "boolean"}
CID = Param("combination_id", "path", STR)
TID = Param("template_id", "path", STR)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/snapshot",
        "snapshot",
        "What the console draws: status, events after `events_after`, recent attempts",
        views.ConsoleSnapshot,
        params=(Param("events_after", "query", INT, "only events with a greater seq"),),
    ),
    Endpoint("GET", "/status", "status", "The live status with each combination's history", views.Status),
    Endpoint(
        "GET",
        "/calls/{request_id}",
        "recent_call",
        "One of the last calls in full (the request inspector)",
        views.RecentCall,
        params=(
            Param("request_id", "path", STR),
            Param(
                "attempt", "query", {"type": "integer", "minimum": 1}, "that attempt (default: the newest)"
            ),
        ),
    ),
    Endpoint(
        "GET",
        "/inflight/{request_id}",
        "inflight_call",
        "A request still in flight: its stage and what is known so far (the inspector)",
        views.InFlightDetail,
        params=(Param("request_id", "path", STR),),
    ),
    Endpoint(
        "GET",
        "/optimizer/runs",
        "optimizer_runs",
        "Recorded optimizer runs and the optimizer's live state",
        actions.OptimizerRuns,
        params=(Param("template_id", "query", STR),),
    ),
    Endpoint(
        "GET",
        "/optimizer/trials",
        "optimizer_trials",
        "A run's trials (by run_id, or the newest run of template_id)",
        actions.OptimizerTrials,
        params=(Param("run_id", "query", STR), Param("template_id", "query", STR)),
    ),
    Endpoint(
        "GET",
        "/events",
        "events",
        "Server-sent events: each event as `data:` JSON (an Event) with its seq as `id:`, and a "
        "heartbeat comment when idle; resumes after `after` or the Last-Event-ID header",
        None,
        media="text/event-stream",
        params=(Param("after", "query", INT, "only events with a greater seq"),),
    ),
    Endpoint(
        "POST",
        "/combinations/{combination_id}/weight",
        "reweight",
        "Set a combination's weight",
        views.CombinationView,
        body=ReweightBody,
        mutation=True,
        params=(CID,),
    ),
    Endpoint(
        "POST",
        "/combinations/{combination_id}/enable",
        "enable",
        "Enable a combination",
        views.CombinationView,
        mutation=True,
        params=(CID,),
    ),
    Endpoint(
        "POST",
        "/combinations/{combination_id}/disable",
        "disable",
        "Disable a combination",
        views.CombinationView,
        mutation=True,
        params=(CID,),
    ),
    Endpoint(
        "POST",
        "/combinations/reset",
        "reset_weights",
        "Every configured combination's weight and state back to the config's",
        actions.CombinationsChanged,
        mutation=True,
    ),
    Endpoint(
        "POST",
        "/optimizer/runs",
        "optimize",
        "Optimize a template now (queued for the background optimizer)",
        actions.OptimizeQueued,
        body=OptimizeBody,
        mutation=True,
        status=202,
    ),
    Endpoint(
        "POST",
        "/optimizer/cancel",
        "cancel_optimize",
        "Stop the running optimization between two calls",
        actions.OptimizeCancelled,
        mutation=True,
    ),
    Endpoint(
        "POST",
        "/templates/{template_id}/compare",
        "compare",
        "Compare candidate models on the template's labelled rows, in the background (see `rswitch compare`)",
        actions.CompareStarted,
        body=actions.CompareSpec,
        mutation=True,
        status=202,
        params=(TID,),
    ),
    Endpoint(
        "GET",
        "/templates/{template_id}/compare/runs",
        "compare_runs",
        "The template's finished comparisons, newest first, and the one running now",
        actions.CompareRuns,
        params=(TID,),
    ),
    Endpoint(
        "POST",
        "/templates/{template_id}/compare/runs/{run_id}/apply",
        "apply_compare",
        "Give a finished comparison's recommended combination the template's traffic (reset weights undoes it)",
        actions.CompareApplied,
        mutation=True,
        params=(TID, Param("run_id", "path", STR)),
    ),
    Endpoint(
        "POST",
        "/packages/export",
        "export_package",
        "Build a template's package on the server and download it (.tar.gz)",
        None,
        body=ExportBody,
        mutation=True,
        media="application/gzip",
    ),
    Endpoint(
        "POST",
        "/packages/import",
        "import_package",
        "Import a package (.tar.gz body): verified first, all or nothing",
        actions.PackageImported,
        mutation=True,
        upload=PACKAGE_TYPES,
        params=(Param("overwrite", "query", BOOL), Param("restore_analytics", "query", BOOL)),
    ),
    Endpoint(
        "GET",
        "/datasets/{template_id}/export",
        "dataset_export",
        "A template's examples as JSONL, oldest first",
        None,
        media="application/x-ndjson",
        params=(TID, Param("labelled", "query", BOOL, "only labelled examples")),
    ),
    Endpoint(
        "POST",
        "/datasets/{template_id}/import",
        "dataset_import",
        'Import labelled examples: JSONL lines of {"messages" or "input", "variables", "expected", '
        '"score", "output"}; every bad line is named and nothing is imported',
        actions.DatasetImported,
        mutation=True,
        upload=JSONL_TYPES,
        params=(TID,),
    ),
    Endpoint(
        "POST",
        "/templates",
        "template_register",
        "Register a template, or a new version of one; served at once",
        actions.TemplateVersion,
        body=actions.TemplateSpec,
        mutation=True,
        status=201,
    ),
    Endpoint(
        "GET",
        "/templates/{template_id}/history",
        "template_history",
        "A template's versions, oldest first",
        actions.TemplateHistory,
        params=(TID,),
    ),
    Endpoint(
        "POST",
        "/templates/{template_id}/rollback",
        "template_rollback",
        "Make an earlier version current again (recorded as a new version)",
        actions.TemplateVersion,
        body=RollbackBody,
        mutation=True,
        params=(TID,),
    ),
    Endpoint("GET", "/openapi.json", "openapi", "This description", None),
)


# -- reading requests -------------------------------------------------------------------------------------


def query_int(request: Request, name: str, default: int | None = None, minimum: int = 0) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise GatewayError(400, f"'{name}' must be an integer >= {minimum}; got {raw!r}", param=name)
    return value


def query_bool(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise GatewayError(400, f"'{name}' must be true or false; got {raw!r}", param=name)


async def parsed(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The JSON body as `model`; a 400 naming the first bad field."""
    body = await read_json(request, limit)
    try:
        return model.model_validate(body[0])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise GatewayError(400, f"'{where}': {first['msg']}", code="invalid_body", param=where) from None


def media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


async def upload(
    request: Request, accepted: tuple[str, ...], limit: int, into: Path | None = None
) -> bytes | int:
    """A non-JSON body of one of the `accepted` types, at most `limit` bytes: written to `into`
    (returns its size), or returned. Other types are 415 (a web page cannot send these without
    the browser asking first)."""
    kind = media_type(request)
    if kind not in accepted:
        raise GatewayError(
            415,
            f"send the body as {' or '.join(accepted)}; got {kind or 'no content type'}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before a byte is read
        raise GatewayError(413, f"the body is {declared} bytes; the limit is {limit}", code="body_too_large")
    size, chunks = 0, []
    fh = into.open("wb") if into is not None else None
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"the body exceeds the limit of {limit} bytes", code="body_too_large")
            if fh is not None:
                await asyncio.to_thread(fh.write, chunk)
            else:
                chunks.append(chunk)
    finally:
        if fh is not None:
            fh.close()
    if size == 0:
        raise GatewayError(400, "the request body is empty", code="empty_body")
    return size if into is not None else b"".join(chunks)


# -- the API -------------------------------------------------------------------------------------------------


class AdminAPI:
    """The admin routes over one operator; `close()` ends the open event streams (shutdown)."""

    def __init__(
        self,
        core: Core,
        *,
        body_limit: int,
        upload_limit: int = MAX_UPLOAD_BYTES,
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.core = core
        self.op: actions.Operator = actions.LocalOperator(core)
        self.body_limit = body_limit
        self.upload_limit = upload_limit
        self.heartbeat = heartbeat
        self._closing = False
        self._streams = 0

    def close(self) -> None:
        """Open event streams end after their next poll (callable from any thread)."""
        self._closing = True

    @property
    def open_streams(self) -> int:
        return self._streams

    def routes(self, read: Callable[[Handler], Handler], write: Callable[[Handler], Handler]) -> list[Route]:
        out = []
        for e in ENDPOINTS:
            handler = getattr(self, e.name)
            out.append(Route(PREFIX + e.path, (write if e.mutation else read)(handler), methods=[e.method]))
        return out

    @staticmethod
    def answer(view: BaseModel, status: int = 200) -> Response:
        return JSON(views.dump(view), status_code=status)

    # -- views -------------------------------------------------------------------------------------------

    async def snapshot(self, request: Request) -> Response:
        try:
            after = query_int(request, "events_after", 0) or 0
        except GatewayError as err:
            return error_response(err)
        return self.answer(await self.op.snapshot(after))

    async def status(self, request: Request) -> Response:
        return self.answer(await self.op.status())

    async def recent_call(self, request: Request) -> Response:
        try:
            attempt = query_int(request, "attempt", None, minimum=1)
            return self.answer(await self.op.recent_call(request.path_params["request_id"], attempt))
        except GatewayError as err:
            return error_response(err)

    async def inflight_call(self, request: Request) -> Response:
        try:
            return self.answer(await self.op.inflight_call(request.path_params["request_id"]))
        except GatewayError as err:
            return error_response(err)

    async def optimizer_runs(self, request: Request) -> Response:
        return self.answer(await self.op.optimizer_runs(request.query_params.get("template_id") or None))

    async def optimizer_trials(self, request: Request) -> Response:
        q = request.query_params
        try:
            return self.answer(
                await self.op.optimizer_trials(q.get("run_id") or None, q.get("template_id") or None)
            )
        except GatewayError as err:
            return error_response(err)

    async def events(self, request: Request) -> Response:
        try:
            after = query_int(request, "after", None)
        except GatewayError as err:
            return error_response(err)
        if after is None:  # a reconnecting EventSource resumes where it was
            resumed = request.headers.get("last-event-id", "")
            after = int(resumed) if resumed.isdigit() else 0
        return StreamingResponse(
            self._event_stream(after),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _event_stream(self, after: int) -> AsyncIterator[bytes]:
        """Events as they are appended (read on the loop that appends them), a heartbeat comment
        when idle, and a final `shutdown` event when the gateway stops."""
        self._streams += 1
        try:
            yield b": rswitch admin events\n\n"  # the answer starts now, not with the first event
            quiet_since = time.monotonic()
            while not self._closing:
                fresh = views.events_after(self.core, after)
                for e in fresh:
                    after = e.seq
                    yield b"id: %d\nevent: event\ndata: %s\n\n" % (e.seq, e.model_dump_json().encode())
                now = time.monotonic()
                if fresh:
                    quiet_since = now
                elif now - quiet_since >= self.heartbeat:
                    quiet_since = now
                    yield b": heartbeat\n\n"
                await asyncio.sleep(EVENT_POLL_SECONDS)
            yield b"event: shutdown\ndata: {}\n\n"
        finally:
            self._streams -= 1

    # -- actions -------------------------------------------------------------------------------------

    async def reweight(self, request: Request) -> Response:
        try:
            body = await parsed(request, ReweightBody, self.body_limit)
            return self.answer(await self.op.reweight(request.path_params["combination_id"], body.weight))
        except GatewayError as err:
            return error_response(err)

    async def enable(self, request: Request) -> Response:
        try:
            return self.answer(await self.op.set_enabled(request.path_params["combination_id"], True))
        except GatewayError as err:
            return error_response(err)

    async def disable(self, request: Request) -> Response:
        try:
            return self.answer(await self.op.set_enabled(request.path_params["combination_id"], False))
        except GatewayError as err:
            return error_response(err)

    async def reset_weights(self, request: Request) -> Response:
        return self.answer(await self.op.reset_weights())

    async def optimize(self, request: Request) -> Response:
        try:
            body = await parsed(request, OptimizeBody, self.body_limit)
            return self.answer(await self.op.optimize(body.template_id), 202)
        except GatewayError as err:
            return error_response(err)

    async def cancel_optimize(self, request: Request) -> Response:
        try:
            return self.answer(await self.op.cancel_optimize())
        except GatewayError as err:
            return error_response(err)

    async def compare(self, request: Request) -> Response:
        try:
            body = await parsed(request, actions.CompareSpec, self.body_limit)
            return self.answer(await self.op.compare(request.path_params["template_id"], body), 202)
        except GatewayError as err:
            return error_response(err)

    async def compare_runs(self, request: Request) -> Response:
        try:
            return self.answer(await self.op.compare_runs(request.path_params["template_id"]))
        except GatewayError as err:
            return error_response(err)

    async def apply_compare(self, request: Request) -> Response:
        try:
            p = request.path_params
            return self.answer(await self.op.apply_compare(p["template_id"], p["run_id"]))
        except GatewayError as err:
            return error_response(err)

    async def export_package(self, request: Request) -> Response:
        scratch = actions.scratch_dir("rswitch-export-")
        try:
            body = await parsed(request, ExportBody, self.body_limit)
            path = await self.op.export_package(
                body.template_id,
                scratch,
                include_analytics=body.include_analytics,
                logs_limit=body.logs_limit,
            )
        except GatewayError as err:
            actions.remove(scratch)
            return error_response(err)
        except BaseException:
            actions.remove(scratch)
            raise
        return FileResponse(
            path,
            media_type="application/gzip",
            filename=path.name,
            background=BackgroundTask(actions.remove, scratch),  # once sent (or the client left)
        )

    async def import_package(self, request: Request) -> Response:
        scratch = actions.scratch_dir("rswitch-import-")
        try:
            overwrite = query_bool(request, "overwrite", False)
            restore = query_bool(request, "restore_analytics", True)
            path = scratch / "upload.tar.gz"
            await upload(request, PACKAGE_TYPES, self.upload_limit, into=path)
            return self.answer(
                await self.op.import_package(path, overwrite=overwrite, restore_analytics=restore)
            )
        except GatewayError as err:
            return error_response(err)
        finally:
            await asyncio.to_thread(actions.remove, scratch)

    async def dataset_export(self, request: Request) -> Response:
        tid = request.path_params["template_id"]
        try:
            data = await self.op.dataset_export(tid, labelled=query_bool(request, "labelled", False))
        except GatewayError as err:
            return error_response(err)
        return Response(
            data,
            media_type="application/x-ndjson",
            headers={"content-disposition": f'attachment; filename="{tid}.jsonl"'},
        )

    async def dataset_import(self, request: Request) -> Response:
        try:
            data = await upload(request, JSONL_TYPES, self.upload_limit)
            assert isinstance(data, bytes)
            try:
                rows = await asyncio.to_thread(actions.parse_jsonl, data)  # large uploads: off the loop
            except ValueError as exc:
                raise GatewayError(
                    400, f"{exc}; nothing imported", code="invalid_examples", param="body"
                ) from None
            return self.answer(await self.op.dataset_import(request.path_params["template_id"], rows))
        except GatewayError as err:
            return error_response(err)

    async def template_register(self, request: Request) -> Response:
        try:
            spec = await parsed(request, actions.TemplateSpec, self.body_limit)
            return self.answer(await self.op.template_register(spec), 201)
        except GatewayError as err:
            return error_response(err)

    async def template_history(self, request: Request) -> Response:
        try:
            return self.answer(await self.op.template_history(request.path_params["template_id"]))
        except GatewayError as err:
            return error_response(err)

    async def template_rollback(self, request: Request) -> Response:
        try:
            body = await parsed(request, RollbackBody, self.body_limit)
            return self.answer(
                await self.op.template_rollback(request.path_params["template_id"], body.version)
            )
        except GatewayError as err:
            return error_response(err)

    async def openapi(self, request: Request) -> Response:
        return JSON(openapi())


# -- OpenAPI ---------------------------------------------------------------------------------------------------


def openapi() -> dict[str, Any]:
    """The description of ENDPOINTS, with the models' JSON schemas as components."""
    models: set[type[BaseModel]] = {ErrorBody}
    for e in ENDPOINTS:
        models.update(m for m in (e.response, e.body) if m is not None)
    components: dict[str, Any] = {}
    for m in sorted(models, key=lambda m: m.__name__):
        schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[m.__name__] = schema

    def ref(m: type[BaseModel]) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{m.__name__}"}

    error = {
        "description": "refused (OpenAI's error shape)",
        "content": {"application/json": {"schema": ref(ErrorBody)}},
    }
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        op: dict[str, Any] = {"operationId": e.name, "summary": e.summary}
        if e.params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.where == "path",
                    "schema": p.schema,
                    **({"description": p.description} if p.description else {}),
                }
                for p in e.params
            ]
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(e.body)}}}
        elif e.upload:
            op["requestBody"] = {
                "required": True,
                "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in e.upload},
            }
        content = (
            {e.media: {"schema": ref(e.response)}}
            if e.response is not None
            else {
                e.media: {
                    "schema": {"type": "object"} if e.media == "application/json" else {"type": "string"}
                }
            }
        )
        op["responses"] = {
            str(e.status): {"description": "OK", "content": content},
            "400": error,
            "401": error,
            "403": error,
            "404": error,
        }
        if e.mutation:
            op["responses"]["409"] = error
        paths.setdefault(PREFIX + e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rswitch admin API",
            "version": __version__,
            "description": "The operator's views and actions on a running gateway. With keys configured, "
            "send the admin key as `Authorization: Bearer …`; on loopback without keys it is open.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"admin": []}],
        "paths": paths,
    }
