"""The runtime object: config, templates, combinations, providers, balancer, stores and
live metrics wired together. The HTTP app, the CLI and (later) the TUI are views over it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rswitch.admin import views
from rswitch.config import (
    Config,
    ConfigError,
    ConfigProblem,
    config_warnings,
    resolve_api_key,
    secrets_to_withhold,
)
from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.metrics import LiveMetrics
from rswitch.gateway.pipeline import Gateway
from rswitch.packaging import Stores, export_package, import_package
from rswitch.providers import ChatCall, EmbedCall, Provider, build_provider
from rswitch.providers.pricing import PriceTable
from rswitch.routing.chains import build_chains
from rswitch.routing.learned import LearnedRefitter, learned_steps
from rswitch.state import build_limiters
from rswitch.storage.analytics import AnalyticsStore
from rswitch.storage.datasets import DatasetStore
from rswitch.storage.record import Label
from rswitch.storage.writer import Recorder
from rswitch.templates import Template, TemplateError, TemplateRegistry, check_id
from rswitch.templates_watch import TemplateWatcher

log = logging.getLogger("rswitch")


def inline_template_id(prompt: str) -> str:
    """Combinations that share an inline prompt share a template (and its dataset)."""
    return "inline-" + hashlib.sha1(prompt.encode()).hexdigest()[:10]


def open_registry(config: Config) -> TemplateRegistry:
    """The templates registered on disk (or in Postgres) plus those defined in the config's `templates:`."""
    from rswitch.storage.pg_templates import open_template_versions  # None unless storage is postgres

    registry = TemplateRegistry(config.dataset_dir, versions=open_template_versions(config))
    problems: list[ConfigProblem] = []
    for tid, tc in config.templates.items():
        try:
            check_id(tid)
            registry.add_inline(
                Template(
                    id=tid,
                    template=tc.template,
                    name=tc.name or tid,
                    variables=list(tc.variables),
                    default_model=tc.default_model,
                    default_provider=tc.default_provider,
                )
            )
        except TemplateError as exc:
            problems.append(ConfigProblem(f"templates.{tid}", str(exc)))
    for i, d in enumerate(config.template_dirs):
        folder = config.resolve_path(d)
        if not folder.is_dir():
            problems.append(ConfigProblem(f"template_dirs[{i}]", f"not a folder: {folder}", d, True))
            continue
        found, errors = TemplateRegistry.read_dir(folder)
        problems.extend(ConfigProblem(f"template_dirs[{i}]", e) for e in errors)
        for tpl in found:
            registry.add_inline(tpl, source="bundled")
    if problems:
        raise ConfigError(problems, config.source)
    return registry


def build_combinations(config: Config, registry: TemplateRegistry) -> list[Combination]:
    problems: list[ConfigProblem] = []
    out: list[Combination] = []
    for i, c in enumerate(config.gateway.combinations):
        if c.prompt is not None:
            template_id = inline_template_id(c.prompt)
            try:
                registry.add_inline(Template(id=template_id, template=c.prompt, name=c.name or c.id))
            except TemplateError as exc:
                problems.append(ConfigProblem(f"gateway.combinations[{i}].prompt", str(exc)))
                continue
        else:
            template_id = c.template_id or ""
            if registry.get(template_id) is None:
                known = ", ".join(t.id for t in registry.list()) or "none registered"
                problems.append(
                    ConfigProblem(
                        f"gateway.combinations[{i}].template_id",
                        f"unknown template (registered under {registry.base_dir}: {known})",
                        template_id,
                        True,
                    )
                )
                continue
        out.append(
            Combination(
                id=c.id,
                name=c.name or c.id,
                template_id=template_id,
                model=c.model,
                provider=c.provider,
                weight=c.weight,
                is_primary=c.is_primary,
                enabled=c.enabled,
                fallbacks=list(c.fallbacks),
                metadata=dict(c.metadata),
            )
        )
    if problems:
        raise ConfigError(problems, config.source)
    return out


def embedder_factory(providers: dict[str, Provider]) -> Any:
    """(provider, model) -> (an embed function over that configured provider, the encoder's id):
    what the semantic router embeds with."""

    def make(provider_name: str, model: str) -> tuple[Any, str]:
        provider = providers[provider_name]
        if hasattr(provider, "encode"):  # an in-process encoder: vectors straight, no JSON shape
            return provider.encode, f"encoder:{provider.encoder_id()}"
        describe = provider.describe()
        encoder_id = f"{provider.type}:{model}:{describe.get('model_path') or describe.get('base_url') or ''}"

        async def embed(texts: list[str]) -> list[list[float]]:
            resp = await provider.embed(EmbedCall(model=model, inputs=texts, params={}))
            return [d["embedding"] for d in sorted(resp["data"], key=lambda d: d["index"])]

        return embed, encoder_id

    return make


def caller_factory(providers: dict[str, Provider]) -> Any:
    """(provider, model) -> a chat call to that configured model: what the judge router asks."""

    def make(provider_name: str, model: str) -> Any:
        provider = providers[provider_name]

        async def call(messages: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
            timeout = provider.settings.timeout_seconds
            return await provider.complete(
                ChatCall(model=model, messages=messages, params=params, timeout=timeout)
            )

        return call

    return make


def routing_providers(config: Config) -> dict[str, Provider]:
    """The providers the router chains use (encoders, judges), built from config, not started."""
    names: set[str] = set()
    for steps in [config.routing.default, *config.routing.templates.values()]:
        for s in steps:
            if s.type in ("semantic", "learned"):
                names.add(s.encoder.provider)
            elif s.type == "judge":
                names.add(s.provider)
            elif s.type == "bandit" and s.context == "embedding" and s.encoder is not None:
                names.add(s.encoder.provider)
    out = {}
    for name in sorted(names):
        pc = config.model_providers[name]
        out[name] = build_provider(
            name, pc, resolve_api_key(name, pc)[0], config.gateway.request_timeout_seconds
        )
    return out


class Core:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.warnings = config_warnings(config)
        self.registry = open_registry(config)
        self.combinations = build_combinations(config, self.registry)
        self.key_sources: dict[str, str] = {}
        self.providers: dict[str, Provider] = {}
        self._secrets = secrets_to_withhold(config)  # keys to keep out of packages
        for name, pc in config.model_providers.items():
            key, source = resolve_api_key(name, pc)
            self.key_sources[name] = source if key or source.startswith("none") else f"{source} (not set)"
            self.providers[name] = build_provider(name, pc, key, config.gateway.request_timeout_seconds)
        # every provider gets one: even without rpm/tpm it honours an upstream's Retry-After
        # rate limits and upstream blocks: this process's own, or shared on Redis (`state:`)
        self.shared_state, self.limiters = build_limiters(config)
        gw = config.gateway
        self.metrics = LiveMetrics(gw.window_seconds)
        self.balancer = Balancer(
            gw.strategy,
            self.metrics,
            fallback_threshold=gw.fallback_threshold,
            min_requests=gw.min_requests,
            exploration=gw.exploration,
        )
        self.datasets, self.analytics, self.recorder = self.open_stores(config)
        self.gateway = Gateway(
            registry=self.registry,
            combinations=self.combinations,
            providers=self.providers,
            limiters=self.limiters,
            balancer=self.balancer,
            metrics=self.metrics,
            prices=PriceTable(config.pricing),
            submit=self.recorder.submit,
            max_attempts=gw.max_attempts,
            request_timeout=gw.request_timeout_seconds,
            max_rate_wait=gw.max_rate_wait_seconds,
            breaker=gw.circuit_breaker,
            embedding_default=gw.embeddings,
            chains=build_chains(
                config.routing,
                embedder_factory(self.providers),
                config.dataset_dir.parent / "routing",
                caller_factory(self.providers),
            ),
        )
        if self.shared_state is not None:  # an opening on one replica is skipped by all
            self.shared_state.attach_breakers(self.gateway.breakers)
            self.shared_state.attach_balancer(self.balancer)  # demotions on every replica's window
            for chain in [self.gateway.default_chain, *self.gateway.template_chains.values()]:
                for step in chain.steps if chain else ():
                    self.shared_state.attach_bandit(step)  # every bandit learns from all
        self._started = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.optimizer: Any = None  # BackgroundOptimizer when gateway.optimization.enabled
        self.compares: Any = None  # rswitch.optimizer.compare.Jobs, once the admin API starts one
        self.learned = LearnedRefitter([], self.datasets)  # the learned routing steps, from start()
        self.on_demand_optimizer = False  # the TUI sets it: runs on a keypress, even when not periodic
        # manifests registered or rolled back by the CLI while this runs are served within ~1 s
        self.template_watcher = TemplateWatcher(
            self.registry, [config.resolve_path(d) for d in config.template_dirs], event=self.event
        )

    def open_stores(self, config: Config) -> tuple[Any, Any, Any]:
        """The datasets, the analytics and the recorder writing both; a worker of `serve --workers N`
        returns stand-ins that relay to the one process owning the files (rswitch.workers)."""
        if config.storage.backend == "postgres":  # one database for every replica (rswitch.storage.postgres)
            from rswitch.storage.postgres import open_postgres

            datasets, analytics = open_postgres(config)
        else:
            datasets = DatasetStore(
                config.dataset_dir,
                config.dataset.max_records,
                config.dataset.max_labelled_records,
                reference=frozenset(config.gateway.optimization.reference_combinations),
            )
            analytics = AnalyticsStore(config.analytics_file)
        rc = config.recorder
        recorder = Recorder(
            datasets,
            analytics,
            queue_size=rc.queue_size,
            batch_size=rc.batch_size,
            flush_interval=rc.flush_interval_ms / 1000,
        )
        return datasets, analytics, recorder

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self.loop = asyncio.get_running_loop()  # where the providers' clients live
        self.recorder.start()
        if self.shared_state is not None:
            await self.shared_state.start()
        for p in self.providers.values():
            await p.start()
        for chain in [self.gateway.default_chain, *self.gateway.template_chains.values()]:
            for step in chain.steps if chain else ():
                if hasattr(step, "warm"):
                    try:
                        await step.warm()  # embed the utterances now, not on the first request
                    except Exception as exc:
                        log.warning("routing step %s could not warm up: %s", step.name, exc)
        if self.config.gateway.optimization.enabled or self.on_demand_optimizer:
            from rswitch.optimizer.scheduler import BackgroundOptimizer

            self.optimizer = BackgroundOptimizer(
                self, self.config.gateway.optimization, periodic=self.config.gateway.optimization.enabled
            )
            self.optimizer.start()
        self.template_watcher.start()
        # learned steps read this gateway's recorded rows, and refit as new labels arrive
        chains = [self.gateway.default_chain, *self.gateway.template_chains.values()]
        self.learned = LearnedRefitter(learned_steps(chains), self.datasets, self.event)
        self.learned.start()
        self._started = True

    async def stop(self) -> None:
        """Stop the optimizer, close upstream clients, then drain the recorder so no answered call is lost."""
        await self.template_watcher.stop()
        await self.learned.stop()
        if self.shared_state is not None:
            await self.shared_state.close()
        for chain in [self.gateway.default_chain, *self.gateway.template_chains.values()]:
            for step in chain.steps if chain else ():
                if hasattr(step, "close"):
                    step.close()  # a bandit saves what it learned
        if self.optimizer is not None:
            await asyncio.to_thread(self.optimizer.stop)
            self.optimizer = None
        if self.compares is not None:
            await self.compares.stop()
        for p in self.providers.values():
            try:
                await p.close()
            except Exception:
                log.exception("closing provider %s", p.name)
        await asyncio.to_thread(self.recorder.close)
        self.datasets.close()
        self.analytics.close()
        self.registry.close()
        self._started = False

    # -- operator actions ---------------------------------------------------------------------

    def combination(self, combination_id: str) -> Combination:
        combo = self.gateway.combinations.get(combination_id)
        if combo is None:
            raise KeyError(f"unknown combination id '{combination_id}'")
        return combo

    def reweight(self, combination_id: str, weight: float) -> None:
        if weight < 0:
            raise ValueError("weight must be >= 0")
        self.combination(combination_id).weight = float(weight)
        self.gateway.reindex()

    def set_enabled(self, combination_id: str, enabled: bool) -> None:
        self.combination(combination_id).enabled = enabled
        self.gateway.reindex()

    def reset_weights(self) -> list[str]:
        """Every configured combination's weight and state back to the config's; the ids reset."""
        done = []
        for cfg in self.config.gateway.combinations:
            combo = self.gateway.combinations.get(cfg.id)
            if combo is not None:
                combo.weight, combo.enabled = cfg.weight, cfg.enabled
                done.append(cfg.id)
        self.gateway.reindex()
        return done

    # -- ground truth ----------------------------------------------------------------------------

    async def feedback(self, body: Any) -> dict[str, Any]:
        """Label an answered call by its request id: a score, an expected output, a comment."""
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object", code="invalid_body")
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise GatewayError(
                400,
                "'request_id' is required (the x-rswitch-request-id header of the answer)",
                param="request_id",
            )
        score, expected, comment = body.get("score"), body.get("expected"), body.get("comment")
        if score is None and expected is None and comment is None:
            raise GatewayError(
                400, "give at least one of 'score', 'expected' or 'comment'", code="empty_feedback"
            )
        if score is not None and (
            isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1
        ):
            raise GatewayError(400, f"'score' must be a number from 0 to 1; got {score!r}", param="score")
        for key, value in (("expected", expected), ("comment", comment)):
            if value is not None and not isinstance(value, str):
                raise GatewayError(400, f"'{key}' must be a string", param=key)
        template_id = self.recorder.recent_requests.get(request_id)
        if template_id is None:
            template_id = await asyncio.to_thread(self.datasets.find_request, request_id)
        # on Postgres another replica (or worker) may have answered it a moment ago: its row lands
        # within that writer's next batch, so a label sent at once through a load balancer is no 404
        wait = 2 * self.config.recorder.flush_interval_ms / 1000 + 1.0
        deadline = time.monotonic() + (wait if self.config.storage.backend == "postgres" else 0.0)
        while template_id is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            template_id = await asyncio.to_thread(self.datasets.find_request, request_id)
        if template_id is None:
            raise GatewayError(
                404, f"unknown request id '{request_id}' (no recorded answer has it)", code="unknown_request"
            )
        label = Label(
            template_id, request_id, time.time(), expected, None if score is None else float(score), comment
        )
        if not self.recorder.submit(label):
            raise GatewayError(
                503,
                "the recorder queue is full; retry shortly",
                error_type="service_unavailable",
                retry_after=1,
            )
        if score is not None:  # the live metrics and a bandit that routed this call learn its quality
            served = self.gateway.served.get(request_id)
            if served is not None:
                self.metrics.observe_quality(served, float(score))
            for chain in [self.gateway.default_chain, *self.gateway.template_chains.values()]:
                for step in chain.steps if chain else ():
                    if hasattr(step, "revise"):
                        step.revise(request_id, float(score))
        return {"status": "accepted", "request_id": request_id, "template_id": template_id}

    # -- packages ----------------------------------------------------------------------------

    def _stores(self) -> Stores:
        if self.config.storage.backend == "postgres":  # rows and calls in the database, manifests on disk
            return Stores(self.config.dataset_dir, postgres=self.datasets)
        return Stores(
            self.config.dataset_dir, self.config.analytics_file, self.analytics._conn, self.datasets.release
        )

    def export_package(self, template_id: str, output_dir: Path, **options: Any) -> Path:
        """Export a template's package; what is queued for recording is written first."""
        self.recorder.flush()
        path = export_package(
            self.registry, self._stores(), template_id, output_dir, secrets=self._secrets, **options
        )
        self.event("export", f"exported '{template_id}' → {path}")
        return path

    def import_package(self, path: Path, **options: Any) -> dict[str, Any]:
        self.recorder.flush()
        return import_package(path, self.registry, self._stores(), **options)

    # -- views ----------------------------------------------------------------------------------

    def event(self, kind: str, text: str) -> None:
        """An event for the operator console, from any thread (it is appended on the gateway's loop)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            self.gateway.event(kind, text)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.gateway.event(kind, text)
        else:
            loop.call_soon_threadsafe(self.gateway.event, kind, text)

    # The views live in rswitch.admin.views; these delegates keep the dict shapes the console and
    # tests read. Call them on the gateway's loop, which owns the metrics.

    def console_snapshot(self, events_after: int = 0) -> dict[str, Any]:
        """What the in-process console draws a frame from; events as (seq, time, kind, text)."""
        out = views.dump(views.build_console_snapshot(self, events_after))
        out["events"] = [(e["seq"], e["at"], e["kind"], e["text"]) for e in out["events"]]
        return out

    def recent_call(self, request_id: str, attempt: int | None = None) -> dict[str, Any] | None:
        call = views.build_recent_call(self, request_id, attempt)
        return None if call is None else views.dump(call)

    def may_lead(self, role: str) -> bool:
        """From a worker thread: whether this process should do `role`'s once-for-all work
        (always, alone; with shared state, while it holds the role's lock in Redis)."""
        if self.shared_state is None or self.loop is None:
            return True
        future = asyncio.run_coroutine_threadsafe(self.shared_state.lead(role), self.loop)
        try:
            return bool(future.result(5.0))
        except Exception:
            future.cancel()
            return False

    def status(self) -> dict[str, Any]:
        """Live view; DuckDB analytics are merged in by the caller (they are I/O)."""
        return views.dump(views.build_status(self))

    async def status_view(self) -> views.Status:
        """/status: the live view, taken on the gateway's loop (which owns the metrics), with
        the DuckDB history merged in from a worker thread."""
        status = views.build_status(self)
        try:
            by_combo = await asyncio.to_thread(self.analytics.combination_stats)
        except Exception as exc:
            return views.with_analytics(status, None, f"{type(exc).__name__}: {exc}")
        return views.with_analytics(status, by_combo, None)

    async def status_with_analytics(self) -> dict[str, Any]:
        return views.dump(await self.status_view())

    def prompt_stats(self, prompt_id: str) -> dict[str, Any]:
        return views.prompt_stats(self, prompt_id)

    def system_analytics(self) -> dict[str, Any]:
        return {**self.analytics.system_stats(), "recorder": self.recorder.stats()}

    def storage_health(self) -> dict[str, Any]:
        """Every store answers a query and took its latest writes; raises naming each that did not."""
        health, problems = {}, []
        for name, store in (("datasets", self.datasets), ("analytics", self.analytics)):
            try:
                health[name] = store.ping()
            except Exception as exc:
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        self.recorder.check_writes(problems)
        rec = self.recorder.stats()
        return {**health, "rejected_records": rec["rejected_records"], "last_rejected": rec["last_rejected"]}

    def models(self) -> list[dict[str, Any]]:
        return views.models(self)

    def combination_dicts(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.gateway.combinations.values()]
