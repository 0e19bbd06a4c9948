"""Typed views of a running gateway: what `/status`, the admin API and the console read.

Each view is a pydantic model; `build_*` functions make them from a core. The live parts
(metrics, balancer, recent calls, events) are owned by the gateway's event loop: call the
builders there, never from a worker thread. Parts whose keys other modules own (a
provider's `describe()`, the recorder's and optimizer's counters) declare the keys the
README documents and allow more, so a new counter shows up without touching this file.

`dump(view)` gives the JSON-able dict: fields a builder did not set (an optional part that
does not apply) are left out, so `/status` keeps the shape it always had."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from rswitch.gateway.resolver import PASSTHROUGH

if TYPE_CHECKING:
    from rswitch.core import Core

RECENT_IN_SNAPSHOT = 50  # the last attempts a console snapshot carries


class View(BaseModel):
    """A closed view: exactly these keys."""

    model_config = ConfigDict(extra="forbid")


class OpenView(BaseModel):
    """A view over a part another module owns: these keys, and any it adds."""

    model_config = ConfigDict(extra="allow")


def dump(view: BaseModel) -> dict[str, Any]:
    return view.model_dump(exclude_unset=True)


# -- status ----------------------------------------------------------------------------------------


class TrafficWindow(OpenView):
    seconds: float
    requests: int
    success_rate: float | None
    requests_per_s: float


class Traffic(OpenView):
    """Client requests since start by outcome, the upstream attempts made for them, and the
    gateway's success per client request over the window."""

    requests: int
    succeeded: int
    failed: int
    rejected: int
    cancelled: int
    attempts: int
    attempt_errors: int
    window: TrafficWindow


class Totals(OpenView):
    requests: int
    errors: int
    cost: float
    tokens: int


class Performance(OpenView):
    """A combination's attempts over the live window, and since start."""

    requests: int
    success_rate: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    avg_latency_ms: float | None
    ttft_p50_ms: float | None
    cost: float
    tokens: int
    requests_per_s: float
    quality: float | None
    quality_n: int
    window_seconds: float
    since_start: Totals


class BreakerView(View):
    """A combination's circuit breaker (gateway.circuit_breaker): open, requests skip it until
    `retry_in` seconds pass; half_open, one probe request is out."""

    state: Literal["closed", "open", "half_open"]
    failures: int  # consecutive failed attempts
    retry_in: float | None  # seconds until an open one admits a probe


class CombinationView(View):
    id: str
    name: str
    kind: Literal["configured", "passthrough", "default"]
    implicit: bool
    template_id: str
    model: str
    provider: str
    weight: float
    effective_weight: float
    enabled: bool
    is_primary: bool
    fallbacks: list[str]
    demoted: bool
    breaker: BreakerView | None = None  # None from a gateway older than circuit breakers
    performance: Performance
    analytics: dict[str, Any] | None = None  # DuckDB history; /status merges it in, snapshots do not


class ProviderView(OpenView):
    name: str
    type: str
    base_url: str | None = None
    api_key: str  # where the key comes from, never the key
    rate_limit: int | float | None = None
    tpm: int | None = None
    malformed_events: int = 0  # stream events skipped because they could not be read


class RecorderStats(OpenView):
    queue_depth: int
    queue_capacity: int
    dropped: int
    written: int
    write_errors: int
    last_error: str | None = None
    rejected_records: int = 0
    last_rejected: str | None = None
    records_lost: int = 0
    failing: dict[str, dict[str, Any]] = {}


class Trial(OpenView):
    """One optimizer trial: live in the optimizer's status, or recorded in DuckDB."""

    run_id: str | None = None
    template_id: str | None = None
    trial: int
    instruction: int | None = None
    instruction_text: str | None = None
    demo_set: int | None = None
    minibatch_score: float | None = None
    full_score: float | None = None
    best_score: float | None = None
    calls: int | None = None
    cost: float | None = None
    recorded_at: str | None = None


class OptimizerRun(OpenView):
    """A finished optimizer run: the DuckDB row, or (in the live status) its verdict or error."""

    run_id: str | None = None
    template_id: str | None = None
    verdict: str | None = None
    new_version: int | None = None
    promoted: bool | None = None
    error: str | None = None
    calls: int | None = None
    cost: float | None = None
    started_at: str | None = None


class OptimizerStatus(OpenView):
    """The background optimizer; only `enabled: false` when it is not running."""

    enabled: bool
    periodic: bool | None = None
    running: str | None = None
    strategy: str | None = None  # mipro | reflective (gateway.optimization.strategy)
    stage: str | None = None  # e.g. bootstrapping demos, trial 3/12, round 2/12: reflecting on 3 failure(s)
    calls: int | None = None
    cost: float | None = None
    queued: list[str] = []
    last: OptimizerRun | None = None
    interval_seconds: float | None = None
    trials: list[Trial] = []
    runs: list[OptimizerRun] = []


class StateView(OpenView):
    """Where live state (rate limits, upstream blocks) is kept, and whether it is reachable."""

    backend: Literal["local", "redis"] = "local"
    status: Literal["ok", "degraded"] = "ok"  # degraded: Redis is away, each process limits alone
    degraded_since: float | None = None
    last_error: str | None = None
    outages: int = 0
    leading: list[str] = []  # roles this replica holds: "optimizer" runs the periodic optimizer
    shared: list[str] = []  # what is shared on Redis: rate_limits, circuit_breakers, demotions, bandits…
    shared_bandits: list[str] = []  # bandit steps whose statistics are summed across replicas


class Status(View):
    """`GET /status` and `GET /admin/v1/status`: the gateway as of now."""

    status: Literal["ok"] = "ok"
    strategy: str
    traffic: Traffic
    count: int
    combinations: list[CombinationView]
    providers: list[ProviderView]
    recorder: RecorderStats
    optimizer: OptimizerStatus
    state: StateView = StateView()
    analytics_error: str | None = None  # set when the DuckDB history could not be read


# -- console ---------------------------------------------------------------------------------------


class Event(View):
    """Something an operator should see (a fallback, an error, an optimizer verdict, an action)."""

    seq: int  # increasing; ask for `events_after` the last one seen
    at: float  # unix time
    kind: str
    text: str


class RecentAttempt(OpenView):
    """One attempt among the last calls (a retried or failed-over request has one per attempt)."""

    request_id: str
    attempt: int
    created_at: float
    combination_id: str
    success: bool
    status: int | None = None
    duration_ms: float
    cost: float
    tokens: int


class RecentCall(OpenView):
    """One attempt in full: what the request inspector shows."""

    request_id: str
    created_at: float
    template_id: str
    combination_id: str
    provider: str
    model: str
    system_prompt: str
    messages: list[dict[str, Any]]
    variables: dict[str, Any]
    output: str
    success: bool
    error: str | None = None
    status: int | None = None
    prompt_tokens: int
    completion_tokens: int
    tokens_estimated: bool
    cost: float
    duration_ms: float
    ttft_ms: float | None = None
    stream: bool
    attempt: int
    route: str | None = None
    # the request's attempts up to this one (combination, provider, model, status, error_type, ms,
    # tokens), when it made more than one: a fallback's, a retry's or a continued stream's chain
    attempts: list[dict[str, Any]] | None = None


class InFlightCall(OpenView):
    """A chat request not yet ended, as the gateway's in-flight registry saw it at the snapshot
    (rswitch.gateway.inflight): its stage code and sentence, and what is known so far."""

    request_id: str
    started_at: float
    elapsed_ms: float
    stage: str  # routing, waiting (for a rate limit), backing off, calling, streaming
    text: str  # e.g. "calling openai/gpt-4o, attempt 2"
    template_id: str | None = None
    combination_id: str | None = None  # once an attempt is made
    provider: str | None = None
    model: str | None = None
    attempt: int  # 0 while routing
    wait_until: float | None = None  # unix time a wait ends
    tokens: int | None = None  # content pieces streamed so far (about one token each)


class InFlightDetail(InFlightCall):
    """One request in flight in full, for the request inspector; once it ends, its attempts
    are among the recent calls (`RecentCall`)."""

    in_flight: bool = True
    system_prompt: str = ""
    messages: list[dict[str, Any]] = []
    variables: dict[str, Any] = {}
    route: str | None = None
    output: str = ""  # streamed so far


class InFlight(View):
    count: int  # requests in flight now
    calls: list[InFlightCall]  # the longest running first, at most 50


class ConsoleSnapshot(Status):
    """What the console draws a frame from: the status, the events after `events_after`, the
    last attempts, the calls in flight. All in memory: no database is read."""

    events: list[Event]
    recent: list[RecentAttempt]
    inflight: InFlight


# -- builders (on the gateway's loop) -------------------------------------------------------------


def _combinations(core: Core) -> list[dict[str, Any]]:
    metrics, gateway = core.metrics, core.gateway
    configured = gateway.combinations
    # pass-through pools and templates' default models, once they have served something
    attempted = set(metrics.combination_ids())
    implicit = [c for cid, c in gateway.resolver.implicit.items() if cid in attempted]
    listed = [*configured.values(), *implicit]
    # fresh windows first: the balancer's demotion and effective weights read them
    windows = {c.id: metrics.window_stats(c.id, fresh=True) for c in listed}
    eff = gateway.effective_weights(fresh=True)  # as of now, not as of the last balanced request
    out = []
    for c in listed:
        kind = (
            "configured"
            if c.id in configured
            else "passthrough"
            if c.template_id == PASSTHROUGH
            else "default"
        )
        out.append(
            {
                "id": c.id,
                "name": c.name,
                "kind": kind,
                "implicit": kind != "configured",
                "template_id": c.template_id,
                "model": c.model,
                "provider": c.provider,
                "weight": c.weight,
                "effective_weight": round(eff.get(c.id, c.weight if c.implicit else 0.0), 4),
                "enabled": c.enabled,
                "is_primary": c.is_primary,
                "fallbacks": c.fallbacks,
                "demoted": c.enabled and core.balancer.demoted(c),
                "breaker": gateway.breakers.state(c.id),
                "performance": {
                    **windows[c.id].as_dict(),
                    "window_seconds": metrics.window,
                    "since_start": metrics.totals(c.id),
                },
            }
        )
    return out


def _status_fields(core: Core) -> dict[str, Any]:
    combos = _combinations(core)
    return {
        "status": "ok",
        "strategy": core.balancer.strategy,
        "traffic": core.metrics.traffic(),
        "count": len(combos),
        "combinations": combos,
        "providers": [
            {
                **p.describe(),
                "api_key": core.key_sources[name],
                "rate_limit": core.config.model_providers[name].rate_limit,
                "tpm": core.config.model_providers[name].tpm,
            }
            for name, p in core.providers.items()
        ],
        "recorder": core.recorder.stats(),
        "optimizer": optimizer_status(core),
        "state": core.shared_state.describe() if core.shared_state is not None else {"backend": "local"},
    }


def optimizer_status(core: Core) -> dict[str, Any]:
    return core.optimizer.status() if core.optimizer is not None else {"enabled": False}


def build_status(core: Core) -> Status:
    """The live status (no DuckDB history: see `with_analytics`)."""
    return Status(**_status_fields(core))


def with_analytics(
    status: Status, by_combination: dict[str, dict[str, Any]] | None, error: str | None
) -> Status:
    """The status with each combination's DuckDB history (read off the loop by the caller)."""
    for c in status.combinations:
        c.analytics = (by_combination or {}).get(c.id, {"total_requests": 0})
    if error is not None:
        status.analytics_error = error
    return status


def events_after(core: Core, after: int = 0) -> list[Event]:
    return [Event(seq=s, at=at, kind=k, text=t) for s, at, k, t in core.gateway.events if s > after]


def recent_attempts(core: Core, limit: int = RECENT_IN_SNAPSHOT) -> list[dict[str, Any]]:
    return [
        {
            "request_id": r.request_id,
            "attempt": r.attempt,
            "created_at": r.created_at,
            "combination_id": r.combination_id,
            "success": r.success,
            "status": r.status,
            "duration_ms": r.duration_ms,
            "cost": r.cost,
            "tokens": r.prompt_tokens + r.completion_tokens,
        }
        for r in list(core.gateway.recent)[-limit:]
    ]


def build_console_snapshot(core: Core, after: int = 0) -> ConsoleSnapshot:
    return ConsoleSnapshot(
        **_status_fields(core),
        events=events_after(core, after),
        recent=recent_attempts(core),
        inflight=InFlight(**core.gateway.inflight.view()),
    )


def build_recent_call(core: Core, request_id: str, attempt: int | None = None) -> RecentCall | None:
    """That attempt of one of the last calls, or its newest attempt when `attempt` is None."""
    for r in reversed(core.gateway.recent):
        if r.request_id == request_id and (attempt is None or r.attempt == attempt):
            return RecentCall(
                request_id=r.request_id,
                created_at=r.created_at,
                template_id=r.template_id,
                combination_id=r.combination_id,
                provider=r.provider,
                model=r.model,
                system_prompt=r.system_prompt,
                messages=r.messages,
                variables=r.variables,
                output=r.output,
                success=r.success,
                error=r.error_message,
                status=r.status,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                tokens_estimated=r.tokens_estimated,
                cost=r.cost,
                duration_ms=r.duration_ms,
                ttft_ms=r.ttft_ms,
                stream=r.stream,
                attempt=r.attempt,
                route=r.extra.get("route"),
                attempts=r.extra.get("attempts"),
            )
    return None


def build_inflight_call(core: Core, request_id: str) -> InFlightDetail | None:
    detail = core.gateway.inflight.detail(request_id)
    return None if detail is None else InFlightDetail(**detail)


# -- models (GET /v1/models) and prompt stats -----------------------------------------------------


def models(core: Core) -> list[dict[str, Any]]:
    """What an app can put in `model`: enabled combinations, templates, pass-through model names."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(mid: str, kind: str, **extra: Any) -> None:
        if mid not in seen:
            seen.add(mid)
            out.append(
                {
                    "id": mid,
                    "object": "model",
                    "created": 0,
                    "owned_by": "rswitch",
                    "rswitch_kind": kind,
                    **extra,
                }
            )

    for c in core.gateway.combinations.values():
        if c.enabled:
            add(c.id, "combination", template_id=c.template_id, model=c.model, provider=c.provider)
    for t in core.registry.list():
        add(t.id, "template", variables=t.variables)
    for model, pool in core.gateway.resolver.passthrough.items():
        add(model, "model", provider=pool[0].provider, providers=[c.provider for c in pool])
    return out


def prompt_stats(core: Core, prompt_id: str) -> dict[str, Any]:
    """A template's or combination's DuckDB history (I/O: call it from a worker thread).
    KeyError for an id that is neither."""
    is_template = core.registry.get(prompt_id) is not None or prompt_id == PASSTHROUGH
    combo = core.gateway.combinations.get(prompt_id) or core.gateway.resolver.implicit.get(prompt_id)
    if not is_template and combo is None:
        raise KeyError(f"unknown template or combination id '{prompt_id}'")
    stats = core.analytics.prompt_stats(prompt_id, is_template)
    return {
        "prompt_id": prompt_id,
        "template_id": prompt_id if is_template else combo.template_id,  # type: ignore[union-attr]
        "combination_id": None if is_template else prompt_id,
        **stats,
    }
