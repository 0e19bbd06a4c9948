"""The ASGI app: HTTP routes over the core. A face, like cli.py — no logic of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from rswitch import prometheus
from rswitch.auth import Auth, Ticket, foreign_host, foreign_origin, host_names, json_content_type
from rswitch.core import Core
from rswitch.gateway.access import access
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.streaming import dumps

log = logging.getLogger("rswitch.server")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(err: GatewayError) -> JSON:
    headers = err.headers()
    if err.status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSON(err.body(), status_code=err.status, headers=headers)


def internal_error(request: Request, exc: BaseException) -> JSON:
    """A bug of rswitch's: logged with its traceback, answered as a 500 without its details."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        GatewayError(500, f"internal error: {type(exc).__name__}", error_type="server_error")
    )


async def read_body(request: Request, limit: int) -> Any:
    return (await read_json(request, limit))[0]


def estimate_tokens(body: Any, size: int) -> int:
    """A key's tpm estimate before the call: the body's size in tokens (about 4 bytes each)
    plus the answer it asks for; settled against the real usage when the call is answered."""
    out = 0
    if isinstance(body, dict):
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
            out = asked
    return size // 4 + out


async def read_json(request: Request, limit: int) -> tuple[Any, int]:
    """The parsed JSON body and its size in bytes. JSON only: a web page can POST text/plain or a
    form to any origin without the browser asking first, so those are refused (415)."""
    refused = json_content_type(request.headers.get("content-type"))
    if refused is not None:
        raise refused
    length = request.headers.get("content-length")
    if length is not None and length.isdigit():
        if int(length) > limit:
            raise GatewayError(
                413,
                f"request body is {int(length)} bytes; the limit is {limit} (gateway.max_body_bytes)",
                code="body_too_large",
            )
        raw = await request.body()
    else:  # chunked: count as it arrives
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise GatewayError(
                    413,
                    f"request body exceeds the limit of {limit} bytes (gateway.max_body_bytes)",
                    code="body_too_large",
                )
            chunks.append(chunk)
        raw = b"".join(chunks)
    if not raw:
        raise GatewayError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return orjson.loads(raw), len(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


class HostGuard:
    """Without client keys on loopback: a request addressed to another Host is refused before any
    route sees it (a web page reaching rswitch through DNS rebinding). One header lookup a request."""

    def __init__(self, app: Any, names: frozenset[str]) -> None:
        self.app, self.names = app, names

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = None
            for k, v in scope["headers"]:  # a loop, not a generator: this runs for every request
                if k == b"host":
                    host = v.decode("latin-1")
                    break
            refused = foreign_host(host, self.names)
            if refused is not None:
                await error_response(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ChatPath:
    """POST /v1/chat/completions (and /chat/completions) straight to its handler, inside the
    middleware before it (HostGuard, CORS): the hot path skips Starlette's router and exception
    layers, ~4 µs of CPU a request, which it has no use for (the handler answers every error
    itself). Everything else goes through the app as before."""

    PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})

    def __init__(self, app: Any, handler: Any) -> None:
        self.app, self.handler = app, handler

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in self.PATHS
            and not scope.get("root_path")
        ):
            response = await self.handler(Request(scope, receive, send))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(core: Core, *, manage_lifecycle: bool = True, bind_host: str | None = None) -> Starlette:
    """The HTTP face. Who may call what (README, "Security"):

    - app endpoints (chat completions, embeddings, models and the other GET /v1/* views): a
      client key from gateway.auth.keys, or the admin key; open when no client keys are set;
    - the operator's endpoints (every mutation, /status, /metrics, /health/storage): the admin
      key; open only when no key at all is configured; /health is always open.

    With no keys configured `auth` is None and no key guard is installed. Without client keys, a
    gateway bound to loopback (`bind_host`; None in-process) answers only requests addressed to a
    loopback Host (HostGuard); bound beyond it (--insecure-no-auth), anyone may call."""
    cfg = core.config.gateway
    limit = cfg.max_body_bytes
    gateway = core.gateway
    auth = Auth.from_config(cfg.auth)
    origins = frozenset(cfg.cors.allow_origins)

    async def chat_completions(request: Request) -> Response:
        ticket: Ticket | None = None
        started, reached = time.perf_counter(), False
        try:
            try:
                key = auth.client(request.headers.get("authorization")) if auth is not None else None
                body, size = await read_json(request, limit)  # (a wrong key is refused before reading it)
                if key is not None:
                    ticket = key.admit(estimate_tokens(body, size) if key.limiter is not None else 0)
                reached = True  # from here on the gateway counts and logs the request itself
                if isinstance(body, dict) and body.get("stream") is True:
                    session = await gateway.open_stream(body, client=ticket)
                    headers = {
                        "x-rswitch-combination": session.combination.id,
                        "x-rswitch-provider": session.provider,
                        "x-rswitch-request-id": session.p.request_id,
                        "x-rswitch-attempts": str(
                            session.attempt.number
                        ),  # so far: it may continue elsewhere
                        **(
                            {"x-rswitch-route": session.p.route.explanation}
                            if session.p.route.explanation
                            else {}
                        ),
                        "cache-control": "no-cache",
                        "x-accel-buffering": "no",
                    }
                    return StreamingResponse(
                        session.__aiter__(), media_type="text/event-stream", headers=headers
                    )
                done = await gateway.complete(body, client=ticket)
                headers = {
                    "x-rswitch-combination": done.combination.id,
                    "x-rswitch-provider": done.combination.provider,
                    "x-rswitch-request-id": done.request_id,
                    "x-rswitch-cost": f"{done.cost:.8f}",
                    "x-rswitch-attempts": str(done.attempts),
                }
                if done.route:
                    headers["x-rswitch-route"] = done.route
                return JSON(done.response, headers=headers)
            except BaseException:  # nothing answered: the key's token estimate is given back
                if ticket is not None:
                    ticket.settle(0)
                raise
        except GatewayError as err:
            if not reached:  # refused before the gateway saw it (key, body): still a client request
                gateway.refused(request.url.path, err.status, started)
            return error_response(err)
        except ClientDisconnect:
            if not reached:
                gateway.refused(request.url.path, 499, started)
            return Response(status_code=499)
        except Exception as exc:
            if not reached:
                gateway.refused(request.url.path, 500, started)
            return internal_error(request, exc)

    async def embeddings(request: Request) -> Response:
        ticket: Ticket | None = None
        try:
            try:
                key = auth.client(request.headers.get("authorization")) if auth is not None else None
                body, size = await read_json(request, limit)
                if key is not None:
                    ticket = key.admit(estimate_tokens(body, size) if key.limiter is not None else 0)
                done = await gateway.embed(body, client=ticket)
                if ticket is not None:
                    usage = done.response.get("usage") if isinstance(done.response, dict) else None
                    used = usage.get("total_tokens") if isinstance(usage, dict) else None
                    ticket.settle(used if isinstance(used, int) else ticket.est)
            except BaseException:  # nothing answered: the key's token estimate is given back
                if ticket is not None:
                    ticket.settle(0)
                raise
        except GatewayError as err:
            return error_response(err)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:
            return internal_error(request, exc)
        headers = {
            "x-rswitch-combination": done.combination.id,
            "x-rswitch-provider": done.combination.provider,
            "x-rswitch-request-id": done.request_id,
        }
        return JSON(done.response, headers=headers)

    async def feedback(request: Request) -> Response:
        try:
            return JSON(await core.feedback(await read_body(request, limit)), status_code=202)
        except GatewayError as err:
            return error_response(err)

    async def optimizer_runs(request: Request) -> Response:
        tid = request.query_params.get("template_id")
        key = getattr(request.state, "key", None)  # set by `reader`
        limited = key is not None and key.templates is not None
        runs = await asyncio.to_thread(core.analytics.runs, tid, 500 if limited else 20)
        running = core.optimizer.status() if core.optimizer is not None else {"enabled": False}
        if limited:  # its templates' runs only; the live state (queue, trials, prompts) is the operator's
            runs, running = key.only_own(runs)[:20], {"enabled": running.get("enabled", False)}
        return JSON({"runs": runs, "optimizer": running})

    async def optimizer_trials(request: Request) -> Response:
        run_id, tid = request.query_params.get("run_id"), request.query_params.get("template_id")
        if not run_id and not tid:
            return error_response(GatewayError(400, "give run_id or template_id", code="missing_parameter"))
        trials = await asyncio.to_thread(core.analytics.trials, run_id, tid)
        key = getattr(request.state, "key", None)  # set by `reader`: a limited key sees its templates'
        return JSON({"trials": trials if key is None else key.only_own(trials)})

    async def optimizer_request(request: Request) -> Response:
        try:
            body = await read_body(request, limit)
            tid = body.get("template_id") if isinstance(body, dict) else None
            queued = await admin.op.optimize(tid if isinstance(tid, str) else repr(tid))  # as /admin/v1's
        except GatewayError as err:
            return error_response(err)
        return JSON(queued.model_dump(), status_code=202)

    async def health(request: Request) -> Response:
        return JSON({"status": "healthy"})

    async def health_storage(request: Request) -> Response:
        try:
            result = await asyncio.to_thread(core.storage_health)
        except Exception as exc:
            return JSON({"status": "unhealthy", "error": f"{type(exc).__name__}: {exc}"}, status_code=503)
        return JSON({"status": "healthy", **result})

    async def status(request: Request) -> Response:
        return JSON(await core.status_with_analytics())

    async def prompt_stats(request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]
        try:
            stats = await asyncio.to_thread(core.prompt_stats, prompt_id)
            key = getattr(request.state, "key", None)  # set by `reader`
            if key is not None:  # a key limited to templates reads only theirs (403)
                key.readable(stats["template_id"], prompt_id)
            return JSON(stats)
        except KeyError:
            return error_response(
                GatewayError(404, f"unknown template or combination id '{prompt_id}'", code="unknown_prompt")
            )
        except GatewayError as err:
            return error_response(err)

    async def system_analytics(request: Request) -> Response:
        return JSON(await asyncio.to_thread(core.system_analytics))

    async def metrics(request: Request) -> Response:
        return Response(prometheus.render(core), media_type=prometheus.CONTENT_TYPE)

    async def models(request: Request) -> Response:
        return JSON({"object": "list", "data": core.models()})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        access(request.method, request.url.path, exc.status_code, None)
        if exc.status_code == 405:
            return error_response(
                GatewayError(
                    405,
                    f"method {request.method} is not allowed on {request.url.path}",
                    code="method_not_allowed",
                )
            )
        return error_response(
            GatewayError(exc.status_code, f"no route {request.method} {request.url.path}", code="not_found")
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        return internal_error(request, exc)

    def answered(handler: Any) -> Any:
        """An error of rswitch's own becomes a 500 answer here, not an exception for the server:
        raised, it would make uvicorn close the client's keep-alive connection."""

        async def guarded(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except ClientDisconnect:
                response = Response(status_code=499)
            except Exception as exc:
                response = internal_error(request, exc)
            access(
                request.method, request.url.path, response.status_code, (time.perf_counter() - started) * 1000
            )
            return response

        return guarded

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_lifecycle:
            await core.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await core.stop()

    def reader(handler: Any) -> Any:
        """A GET view for apps: a client key (or the admin key) when client keys are set."""
        if auth is None:
            return handler

        async def guarded(request: Request) -> Response:
            try:
                key = auth.client(request.headers.get("authorization"))
                tid = request.query_params.get("template_id")
                if key is not None and tid is not None:  # a key limited to templates: theirs only
                    key.readable(tid)
            except GatewayError as err:
                return error_response(err)
            request.state.key = key  # the views filter what they show to the key's templates
            return await handler(request)

        return guarded

    def operator(handler: Any) -> Any:
        """The operator's views: the admin key when any key is configured."""
        if auth is None:
            return handler

        async def guarded(request: Request) -> Response:
            try:
                auth.admin(request.headers.get("authorization"), request.url.path)
            except GatewayError as err:
                return error_response(err)
            return await handler(request)

        return guarded

    def mutation(handler: Any) -> Any:
        """Changes to rswitch: never from another origin's web page; the admin key when keys are on."""
        guarded_handler = operator(handler)

        async def guarded(request: Request) -> Response:
            refused = foreign_origin(request.headers.get("origin"), request.headers.get("host"), origins)
            if refused is not None:
                return error_response(refused)
            return await guarded_handler(request)

        return guarded

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", answered(embeddings), methods=["POST"]),
        Route("/embeddings", answered(embeddings), methods=["POST"]),
        Route("/v1/feedback", answered(mutation(feedback)), methods=["POST"]),
        Route("/v1/optimizer/runs", answered(reader(optimizer_runs)), methods=["GET"]),
        Route("/v1/optimizer/runs", answered(mutation(optimizer_request)), methods=["POST"]),
        Route("/v1/optimizer/trials", answered(reader(optimizer_trials)), methods=["GET"]),
        Route("/health", answered(health), methods=["GET"]),
        Route("/health/storage", answered(operator(health_storage)), methods=["GET"]),
        Route("/status", answered(operator(status)), methods=["GET"]),
        Route("/v1/prompts/{prompt_id:path}/stats", answered(reader(prompt_stats)), methods=["GET"]),
        Route("/v1/system/analytics", answered(reader(system_analytics)), methods=["GET"]),
        Route("/v1/models", answered(reader(models)), methods=["GET"]),
        Route("/metrics", answered(operator(metrics)), methods=["GET"]),
    ]
    from rswitch.admin.api import AdminAPI  # imported here: it builds on this module's helpers

    admin = AdminAPI(core, body_limit=limit)  # /admin/v1/…: the operator's, like /status
    routes += admin.routes(read=lambda h: answered(operator(h)), write=lambda h: answered(mutation(h)))
    middleware = []
    names = host_names(bind_host) if auth is None or not auth.keys else None
    if names is not None:  # first, so nothing (CORS included) answers a rebound name
        middleware.append(Middleware(HostGuard, names=names))
    if origins:  # off by default: no browser page of another origin may read answers
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=sorted(origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type"],
                expose_headers=[
                    "x-rswitch-combination",
                    "x-rswitch-provider",
                    "x-rswitch-request-id",
                    "x-rswitch-cost",
                    "x-rswitch-attempts",
                    "x-rswitch-route",
                    "retry-after",
                ],
                max_age=600,
            )
        )
    middleware.append(Middleware(ChatPath, handler=chat_completions))  # innermost: after the guards
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found, Exception: server_error},
    )
    app.state.core = core
    app.state.admin = admin  # admin.close() ends its event streams
    return app
