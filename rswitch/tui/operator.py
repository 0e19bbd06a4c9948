"""The console's one way to the gateway: the operator interface (`rswitch.admin.actions.Operator`).

In-process it is `InProcessOperator`: each call is `LocalOperator`'s coroutine, run on the gateway
thread's loop (the only place the core's live state is touched) and awaited from the console's
loop without blocking it. Attached (`rswitch tui --attach URL`) it is the admin API's HTTP
client, `rswitch.admin.client.HttpOperator`. The console awaits the same methods on either and
does not know which it has."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rswitch.admin import actions, views
from rswitch.admin.client import Unreachable


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the gateway could not be reached, rather than that it refused."""
    return isinstance(exc, Unreachable | ConnectionError)


def stopped() -> Unreachable:
    return Unreachable("in-process", "the gateway is not running")


def plain(view: BaseModel) -> dict[str, Any]:
    """A view as the dict the console's model reads (the keys the gateway set)."""
    return view.model_dump(exclude_unset=True, warnings=False)


def frame(snapshot: views.ConsoleSnapshot) -> dict[str, Any]:
    """A console snapshot as what the panes draw from; events as (seq, time, kind, text)."""
    out = plain(snapshot)
    out["events"] = [(e["seq"], e["at"], e["kind"], e["text"]) for e in out.get("events", [])]
    return out


class InProcessOperator:
    """The operator interface over a gateway running in this process (`GatewayThread`)."""

    def __init__(self, gateway: Any, timeout: float = 30.0) -> None:
        self.gateway = gateway  # GatewayThread: .core, whose .loop runs the gateway
        self.local = actions.LocalOperator(gateway.core)
        self.timeout = timeout

    async def _on_gateway(self, coro: Coroutine[Any, Any, Any]) -> Any:
        loop = self.gateway.core.loop
        if loop is None or loop.is_closed():
            coro.close()
            raise stopped()
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)

    async def snapshot(self, events_after: int = 0) -> views.ConsoleSnapshot:
        return await self._on_gateway(self.local.snapshot(events_after))

    async def status(self) -> views.Status:
        return await self._on_gateway(self.local.status())

    async def recent_call(self, request_id: str, attempt: int | None = None) -> views.RecentCall:
        return await self._on_gateway(self.local.recent_call(request_id, attempt))

    async def inflight_call(self, request_id: str) -> views.InFlightDetail:
        return await self._on_gateway(self.local.inflight_call(request_id))

    async def optimizer_runs(self, template_id: str | None = None) -> actions.OptimizerRuns:
        return await self._on_gateway(self.local.optimizer_runs(template_id))

    async def optimizer_trials(
        self, run_id: str | None = None, template_id: str | None = None
    ) -> actions.OptimizerTrials:
        return await self._on_gateway(self.local.optimizer_trials(run_id, template_id))

    async def reweight(self, combination_id: str, weight: float) -> views.CombinationView:
        return await self._on_gateway(self.local.reweight(combination_id, weight))

    async def set_enabled(self, combination_id: str, enabled: bool) -> views.CombinationView:
        return await self._on_gateway(self.local.set_enabled(combination_id, enabled))

    async def reset_weights(self) -> actions.CombinationsChanged:
        return await self._on_gateway(self.local.reset_weights())

    async def optimize(self, template_id: str) -> actions.OptimizeQueued:
        return await self._on_gateway(self.local.optimize(template_id))

    async def cancel_optimize(self) -> actions.OptimizeCancelled:
        return await self._on_gateway(self.local.cancel_optimize())

    async def compare(self, template_id: str, spec: actions.CompareSpec) -> actions.CompareStarted:
        return await self._on_gateway(self.local.compare(template_id, spec))

    async def compare_runs(self, template_id: str) -> actions.CompareRuns:
        return await self._on_gateway(self.local.compare_runs(template_id))

    async def apply_compare(self, template_id: str, run_id: str) -> actions.CompareApplied:
        return await self._on_gateway(self.local.apply_compare(template_id, run_id))

    async def export_package(
        self, template_id: str, output_dir: Path, *, include_analytics: bool = True, logs_limit: int = 1000
    ) -> Path:
        # no timeout of ours: a large package takes what it takes (the export runs in a worker thread)
        loop = self.gateway.core.loop
        if loop is None or loop.is_closed():
            raise stopped()
        coro = self.local.export_package(
            template_id, output_dir, include_analytics=include_analytics, logs_limit=logs_limit
        )
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    async def import_package(
        self, path: Path, *, overwrite: bool = False, restore_analytics: bool = True
    ) -> actions.PackageImported:
        return await self._on_gateway(
            self.local.import_package(path, overwrite=overwrite, restore_analytics=restore_analytics)
        )

    async def dataset_export(self, template_id: str, *, labelled: bool = False) -> bytes:
        return await self._on_gateway(self.local.dataset_export(template_id, labelled=labelled))

    async def dataset_import(self, template_id: str, rows: list[dict[str, Any]]) -> actions.DatasetImported:
        return await self._on_gateway(self.local.dataset_import(template_id, rows))

    async def template_register(self, spec: actions.TemplateSpec) -> actions.TemplateVersion:
        return await self._on_gateway(self.local.template_register(spec))

    async def template_history(self, template_id: str) -> actions.TemplateHistory:
        return await self._on_gateway(self.local.template_history(template_id))

    async def template_rollback(self, template_id: str, version: int) -> actions.TemplateVersion:
        return await self._on_gateway(self.local.template_rollback(template_id, version))
