"""What an operator can ask of a running gateway, once: the admin API calls these, and the
console and the CLI are to call them too (directly in-process, or through the API).

`Operator` is the interface every face talks to; `LocalOperator` implements it over a core
in this process. Its methods are coroutines to be awaited on the gateway's loop (the HTTP
handlers run there; a console thread submits them with `asyncio.run_coroutine_threadsafe`):
what touches the core's live state runs on that loop, blocking file and database work in a
worker thread. Bad input raises a GatewayError (400/404/409) naming the field, and changes
nothing. No web framework here."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field

from rswitch.admin import views
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.resolver import PASSTHROUGH
from rswitch.templates import Template, TemplateError, check_id

if TYPE_CHECKING:
    from rswitch.core import Core

# What `dataset export` writes per example (and `dataset import` reads back).
DATASET_FIELDS = (
    "request_id",
    "created_at",
    "combination_id",
    "model",
    "variables",
    "messages",
    "output",
    "success",
    "label_expected",
    "label_score",
    "label_comment",
    "label_source",
    "origin",
)


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizeQueued(Result):
    status: str = "queued"
    template_id: str


class OptimizeCancelled(Result):
    status: str = "cancelling"
    template_id: str


class CompareSpec(Result):
    """What to compare (see `rswitch compare`): combination ids and/or provider/model pairs."""

    candidates: list[str] = []
    models: list[str] = []
    rows: int | None = Field(None, ge=1)
    split: str = "test"
    evaluator: str | None = None
    budget_calls: int | None = Field(None, ge=1)
    budget_cost: float | None = Field(None, ge=0)
    seed: int = 0
    apply: bool = False
    dry_run: bool = False  # only the plan: rows, calls, estimated cost


class CompareStarted(Result):
    status: str = "running"  # or "planned" for a dry run
    run_id: str
    template_id: str
    candidates: list[str]
    rows: int
    calls: int
    estimated_cost: float | None


class CompareRuns(Result):
    running: dict[str, Any] | None  # the run going now (any template): its plan and progress
    runs: list[dict[str, Any]]  # this template's finished runs, newest first


class CompareApplied(Result):
    run_id: str
    template_id: str
    recommended: str | None
    applied: str  # what changed, or why nothing did


class CombinationsChanged(Result):
    combinations: list[views.CombinationView]


class OptimizerRuns(Result):
    runs: list[views.OptimizerRun]
    optimizer: views.OptimizerStatus


class OptimizerTrials(Result):
    trials: list[views.Trial]


class PackageImported(Result):
    template_id: str
    path: str
    replaced: bool
    dataset_rows: int
    analytics_rows_added: int


class DatasetImported(Result):
    template_id: str
    imported: int
    labelled: int


class TemplateSpec(Result):
    """A template to register (a new version when the id exists: name and default model are
    kept unless given)."""

    template_id: str
    template: str
    name: str | None = None
    variables: list[str] | None = None
    default_model: str | None = None
    default_provider: str | None = None


class TemplateVersion(views.OpenView):
    """A template version's manifest (the keys templates.py writes)."""

    id: str
    version: int
    template: str
    name: str
    variables: list[str]
    default_model: str | None = None
    default_provider: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    demos: list[dict[str, Any]] = []
    provenance: dict[str, Any] = {}


class TemplateHistory(Result):
    template_id: str
    current: int
    source: str  # registry | inline | bundled: only registered templates have earlier versions
    versions: list[TemplateVersion]  # oldest first; the last is the current one


class Operator(Protocol):
    """The operator's interface to a gateway: typed views and actions. In-process it is
    `LocalOperator`; an attached console or the CLI will get an HTTP client of the admin API."""

    async def snapshot(self, events_after: int = 0) -> views.ConsoleSnapshot: ...
    async def status(self) -> views.Status: ...
    async def recent_call(self, request_id: str, attempt: int | None = None) -> views.RecentCall: ...
    async def inflight_call(self, request_id: str) -> views.InFlightDetail: ...
    async def optimizer_runs(self, template_id: str | None = None) -> OptimizerRuns: ...
    async def optimizer_trials(
        self, run_id: str | None = None, template_id: str | None = None
    ) -> OptimizerTrials: ...
    async def reweight(self, combination_id: str, weight: float) -> views.CombinationView: ...
    async def set_enabled(self, combination_id: str, enabled: bool) -> views.CombinationView: ...
    async def reset_weights(self) -> CombinationsChanged: ...
    async def optimize(self, template_id: str) -> OptimizeQueued: ...
    async def cancel_optimize(self) -> OptimizeCancelled: ...
    async def compare(self, template_id: str, spec: CompareSpec) -> CompareStarted: ...
    async def compare_runs(self, template_id: str) -> CompareRuns: ...
    async def apply_compare(self, template_id: str, run_id: str) -> CompareApplied: ...
    async def export_package(
        self, template_id: str, output_dir: Path, *, include_analytics: bool = True, logs_limit: int = 1000
    ) -> Path: ...
    async def import_package(
        self, path: Path, *, overwrite: bool = False, restore_analytics: bool = True
    ) -> PackageImported: ...
    async def dataset_export(self, template_id: str, *, labelled: bool = False) -> bytes: ...
    async def dataset_import(self, template_id: str, rows: list[dict[str, Any]]) -> DatasetImported: ...
    async def template_register(self, spec: TemplateSpec) -> TemplateVersion: ...
    async def template_history(self, template_id: str) -> TemplateHistory: ...
    async def template_rollback(self, template_id: str, version: int) -> TemplateVersion: ...


# -- checks shared by every face --------------------------------------------------------------------


def dataset_row(row: Any) -> dict[str, Any]:
    """One example to import, checked; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in row:
        msgs = row["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and "role" in m for m in msgs)
        ):
            raise ValueError("'messages' must be a non-empty array of {role, content}")
    elif not isinstance(row.get("input"), str) or not row["input"]:
        raise ValueError("give 'messages' or a non-empty 'input' string")
    if "variables" in row and not isinstance(row["variables"], dict):
        raise ValueError("'variables' must be an object")
    for key in ("expected", "output", "system_prompt", "comment"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"'{key}' must be a string")
    score = row.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1
    ):
        raise ValueError(f"'score' must be a number from 0 to 1; got {score!r}")
    if "input" in row and "messages" not in row:
        row["messages"] = [{"role": "user", "content": row.pop("input")}]
    return row


def parse_jsonl(data: bytes, check: Any = dataset_row) -> list[dict[str, Any]]:
    """Every non-blank line, checked; a ValueError lists every bad line ("line N: …")."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rows.append(check(orjson.loads(raw)))
        except orjson.JSONDecodeError as exc:
            problems.append(f"line {n}: not valid JSON ({exc})")
        except ValueError as exc:
            problems.append(f"line {n}: {exc}")
    if problems:
        raise ValueError(
            "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    if not rows:
        raise ValueError("the body holds no examples")
    return rows


def is_labelled(r: dict[str, Any]) -> bool:
    return r.get("label_expected") is not None or r.get("label_score") is not None


def exported_rows(rows: Iterable[dict[str, Any]], labelled: bool = False) -> bytes:
    """Dataset rows (newest first, as the store gives them) as JSONL, oldest first."""
    out = [
        {k: r.get(k) for k in DATASET_FIELDS} for r in reversed(list(rows)) if not labelled or is_labelled(r)
    ]
    return b"".join(orjson.dumps(r) + b"\n" for r in out)


def new_version(current: Template | None, spec: TemplateSpec) -> Template:
    """The template a registration writes: a new version keeps its name and default model
    unless the spec gives others. TemplateError says what is wrong."""
    check_id(spec.template_id)
    if not spec.template.strip():
        raise TemplateError("the template text is empty")
    return Template(
        id=spec.template_id,
        template=spec.template,
        name=spec.name or (current.name if current is not None else spec.template_id),
        variables=list(spec.variables or []),
        default_model=spec.default_model or (current.default_model if current is not None else None),
        default_provider=spec.default_provider or (current.default_provider if current is not None else None),
    )


# -- on the gateway's loop -------------------------------------------------------------------------


def reset_weights(core: Core) -> list[str]:
    """Every configured combination's weight and state back to the config's; the ids reset
    (with `serve --workers N`, on every worker: WorkerCore.reset_weights)."""
    return core.reset_weights()


def unknown_combination(core: Core, combination_id: str) -> GatewayError:
    known = ", ".join(core.gateway.combinations) or "none"
    return GatewayError(
        404,
        f"unknown combination id '{combination_id}' (configured: {known})",
        code="unknown_combination",
        param="combination_id",
    )


def unknown_template(core: Core, template_id: str, status: int = 404) -> GatewayError:
    known = ", ".join(t.id for t in core.registry.list()) or "none"
    return GatewayError(
        status,
        f"unknown template id '{template_id}' (known: {known})",
        code="unknown_template",
        param="template_id",
    )


class LocalOperator:
    """The operator interface over a core in this process (see the module's docstring)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    # -- views --------------------------------------------------------------------------------------

    async def snapshot(self, events_after: int = 0) -> views.ConsoleSnapshot:
        return views.build_console_snapshot(self.core, events_after)

    async def status(self) -> views.Status:
        return await self.core.status_view()

    async def recent_call(self, request_id: str, attempt: int | None = None) -> views.RecentCall:
        call = views.build_recent_call(self.core, request_id, attempt)
        if call is None:
            which = f"attempt {attempt} of request" if attempt is not None else "request"
            raise GatewayError(
                404,
                f"no {which} '{request_id}' among the last calls (only the newest are kept in memory)",
                code="unknown_request",
                param="request_id",
            )
        return call

    async def inflight_call(self, request_id: str) -> views.InFlightDetail:
        call = views.build_inflight_call(self.core, request_id)
        if call is None:
            raise GatewayError(
                404,
                f"request '{request_id}' is not in flight (once ended, its attempts are among the last calls)",
                code="unknown_request",
                param="request_id",
            )
        return call

    async def optimizer_runs(self, template_id: str | None = None) -> OptimizerRuns:
        runs = await asyncio.to_thread(self.core.analytics.runs, template_id)
        return OptimizerRuns(runs=runs, optimizer=views.optimizer_status(self.core))

    async def optimizer_trials(
        self, run_id: str | None = None, template_id: str | None = None
    ) -> OptimizerTrials:
        if not run_id and not template_id:
            raise GatewayError(400, "give run_id or template_id", code="missing_parameter", param="run_id")
        return OptimizerTrials(
            trials=await asyncio.to_thread(self.core.analytics.trials, run_id, template_id)
        )

    # -- combinations ----------------------------------------------------------------------------

    def _combination(self, combination_id: str) -> views.CombinationView:
        status = views.build_status(self.core)
        return next(c for c in status.combinations if c.id == combination_id)

    async def reweight(self, combination_id: str, weight: float) -> views.CombinationView:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise GatewayError(400, f"'weight' must be a number >= 0; got {weight!r}", param="weight")
        if combination_id not in self.core.gateway.combinations:
            raise unknown_combination(self.core, combination_id)
        self.core.reweight(combination_id, float(weight))
        self.core.event("operator", f"weight of {combination_id} set to {float(weight):g}")
        return self._combination(combination_id)

    async def set_enabled(self, combination_id: str, enabled: bool) -> views.CombinationView:
        if combination_id not in self.core.gateway.combinations:
            raise unknown_combination(self.core, combination_id)
        self.core.set_enabled(combination_id, enabled)
        self.core.event("operator", f"{combination_id} {'enabled' if enabled else 'disabled'}")
        return self._combination(combination_id)

    async def reset_weights(self) -> CombinationsChanged:
        reset_weights(self.core)
        self.core.event("operator", "weights and states reset to the configured values")
        status = views.build_status(self.core)
        return CombinationsChanged(combinations=[c for c in status.combinations if c.kind == "configured"])

    # -- optimizer --------------------------------------------------------------------------------

    async def optimize(self, template_id: str) -> OptimizeQueued:
        optimizer = self.core.optimizer
        refitting = self.core.learned.refit_soon(template_id)  # its learned routing steps too
        if optimizer is None:
            if refitting:
                return OptimizeQueued(status="queued", template_id=template_id)
            raise GatewayError(
                409,
                "the background optimizer is off (gateway.optimization.enabled)",
                code="optimizer_disabled",
            )
        if self.core.registry.get(template_id) is None:
            raise unknown_template(self.core, template_id, 400)
        optimizer.request(template_id)
        return OptimizeQueued(status="queued", template_id=template_id)

    async def cancel_optimize(self) -> OptimizeCancelled:
        optimizer = self.core.optimizer
        running = optimizer.running if optimizer is not None else None
        if optimizer is None or running is None or not optimizer.cancel():
            raise GatewayError(409, "no optimization is running", code="nothing_running")
        self.core.event("optimizer", f"cancelling the optimization of '{running}'")
        return OptimizeCancelled(status="cancelling", template_id=running)

    # -- compare ------------------------------------------------------------------------------

    async def compare(self, template_id: str, spec: CompareSpec) -> CompareStarted:
        from rswitch.optimizer.compare import CompareBusy, CompareError, Jobs

        if self.core.registry.get(template_id) is None:
            raise unknown_template(self.core, template_id)
        if self.core.compares is None:
            self.core.compares = Jobs()
        try:
            plan = self.core.compares.start(
                self.core,
                template_id,
                candidates=spec.candidates,
                models=spec.models,
                rows=spec.rows,
                split_name=spec.split,
                evaluator=spec.evaluator,
                budget_calls=spec.budget_calls,
                budget_cost=spec.budget_cost,
                seed=spec.seed,
                apply_result=spec.apply,
                dry_run=spec.dry_run,
            )
        except CompareBusy as exc:
            raise GatewayError(409, str(exc), code="busy") from None
        except CompareError as exc:
            raise GatewayError(400, str(exc), code="invalid_compare") from None
        return CompareStarted(**plan)

    async def compare_runs(self, template_id: str) -> CompareRuns:
        if self.core.registry.get(template_id) is None:
            raise unknown_template(self.core, template_id)
        runs = await asyncio.to_thread(self.core.analytics.compare_runs, template_id)
        running = self.core.compares.running if self.core.compares is not None else None
        return CompareRuns(running=running, runs=runs)

    async def apply_compare(self, template_id: str, run_id: str) -> CompareApplied:
        from rswitch.optimizer.compare import apply

        if self.core.registry.get(template_id) is None:
            raise unknown_template(self.core, template_id)
        run = await asyncio.to_thread(self.core.analytics.compare_run, run_id)
        if run is None or run["template_id"] != template_id:
            raise GatewayError(
                404, f"no comparison '{run_id}' of '{template_id}'", code="unknown_run", param="run_id"
            )
        run["applied"] = apply(self.core, run)
        await asyncio.to_thread(self.core.analytics.compare_applied, run_id, run["applied"])
        return CompareApplied(
            run_id=run_id, template_id=template_id, recommended=run.get("recommended"), applied=run["applied"]
        )

    # -- packages (blocking: in a worker thread) ------------------------------------------------

    async def export_package(
        self, template_id: str, output_dir: Path, *, include_analytics: bool = True, logs_limit: int = 1000
    ) -> Path:
        """Build `<id>-<stamp>.tar.gz` in `output_dir`; returns its path."""
        from rswitch.packaging import PackageError

        if self.core.registry.get(template_id) is None:
            raise unknown_template(self.core, template_id)
        if isinstance(logs_limit, bool) or not isinstance(logs_limit, int) or logs_limit < 0:
            raise GatewayError(
                400, f"'logs_limit' must be an integer >= 0; got {logs_limit!r}", param="logs_limit"
            )
        try:
            return await asyncio.to_thread(
                self.core.export_package,
                template_id,
                output_dir,
                include_analytics=include_analytics,
                logs_limit=logs_limit,
                archive=True,
            )
        except PackageError as exc:
            raise GatewayError(400, f"export refused: {exc}", code="export_refused") from None

    async def import_package(
        self, path: Path, *, overwrite: bool = False, restore_analytics: bool = True
    ) -> PackageImported:
        from rswitch.packaging import PackageError

        try:
            result = await asyncio.to_thread(
                self.core.import_package, path, overwrite=overwrite, restore_analytics=restore_analytics
            )
        except PackageError as exc:
            exists = "already exists" in str(exc)
            raise GatewayError(
                409 if exists else 400,
                f"import refused: {exc}",
                code="template_exists" if exists else "bad_package",
            ) from None
        # (the import reloads the registry itself: its template is served at once)
        self.core.event("import", f"imported package of '{result['template_id']}'")
        return PackageImported(**{k: result[k] for k in PackageImported.model_fields})

    # -- datasets -----------------------------------------------------------------------------------

    def _dataset_template(self, template_id: str) -> None:
        if template_id != PASSTHROUGH and self.core.registry.get(template_id) is None:
            raise unknown_template(self.core, template_id)

    async def dataset_export(self, template_id: str, *, labelled: bool = False) -> bytes:
        """The template's examples as JSONL, oldest first (what is queued is written first)."""
        self._dataset_template(template_id)

        def read() -> bytes:
            self.core.recorder.flush()
            return exported_rows(self.core.datasets.recent(template_id, 10_000_000), labelled)

        return await asyncio.to_thread(read)

    async def dataset_import(self, template_id: str, rows: list[dict[str, Any]]) -> DatasetImported:
        """Labelled examples (checked with `dataset_row`), all or nothing."""
        self._dataset_template(template_id)
        count = await asyncio.to_thread(self.core.datasets.import_rows, template_id, rows)
        labelled = sum(1 for r in rows if r.get("expected") is not None or r.get("score") is not None)
        self.core.event("import", f"imported {count} example(s) into '{template_id}' ({labelled} labelled)")
        return DatasetImported(template_id=template_id, imported=count, labelled=labelled)

    # -- templates ----------------------------------------------------------------------------------

    async def template_register(self, spec: TemplateSpec) -> TemplateVersion:
        providers = self.core.config.model_providers
        if spec.default_provider is not None and spec.default_provider not in providers:
            raise GatewayError(
                400,
                f"'default_provider' {spec.default_provider!r} is not a provider in the config; "
                f"known: {', '.join(providers) or 'none'}",
                param="default_provider",
            )
        try:
            check_id(spec.template_id)
        except TemplateError as exc:
            raise GatewayError(400, str(exc), code="invalid_template", param="template_id") from None
        try:
            tpl = new_version(self.core.registry.get(spec.template_id), spec)
        except TemplateError as exc:
            raise GatewayError(400, str(exc), code="invalid_template", param="template") from None
        tpl = await asyncio.to_thread(self.core.registry.register, tpl)
        self.core.event("template", f"template '{tpl.id}' version {tpl.version} is served now")
        return TemplateVersion(**tpl.manifest())

    async def template_history(self, template_id: str) -> TemplateHistory:
        tpl = self.core.registry.get(template_id)
        if tpl is None:
            raise unknown_template(self.core, template_id)
        earlier = (
            await asyncio.to_thread(self.core.registry.history, template_id)
            if tpl.source == "registry"
            else []
        )
        return TemplateHistory(
            template_id=template_id,
            current=tpl.version,
            source=tpl.source,
            versions=[TemplateVersion(**v) for v in [*earlier, tpl.manifest()]],
        )

    async def template_rollback(self, template_id: str, version: int) -> TemplateVersion:
        if isinstance(version, bool) or not isinstance(version, int):
            raise GatewayError(400, f"'version' must be an integer; got {version!r}", param="version")
        if self.core.registry.get(template_id) is None:
            raise unknown_template(self.core, template_id)
        try:
            tpl = await asyncio.to_thread(self.core.registry.rollback, template_id, version)
        except TemplateError as exc:
            raise GatewayError(400, str(exc), code="invalid_rollback", param="version") from None
        self.core.event(
            "template",
            f"template '{template_id}' version {tpl.version} (version {version} again) is served now",
        )
        return TemplateVersion(**tpl.manifest())


def scratch_dir(prefix: str) -> Path:
    """A private temporary folder (for a package being built or received)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
