"""What the console may ask of the core: each action runs on the gateway's loop, never on the UI
thread's own, so the core's state is only ever touched from one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Controls:
    """What the app may ask of the core; each runs on the gateway's loop (see GatewayThread.call)."""

    gateway: Any  # GatewayThread, or a test double with .call and .core

    def reweight(self, cid: str, weight: float) -> None:
        self.gateway.call(self.gateway.core.reweight, cid, max(0.0, weight))

    def toggle(self, cid: str, enabled: bool) -> None:
        self.gateway.call(self.gateway.core.set_enabled, cid, enabled)

    def reset_weights(self) -> None:
        from rswitch.admin.actions import reset_weights  # the admin API's reset, the same code

        self.gateway.call(reset_weights, self.gateway.core)

    def optimize(self, template_id: str) -> str:
        optimizer = self.gateway.core.optimizer
        if optimizer is None:
            return "the optimizer is not running"
        self.gateway.call(optimizer.request, template_id)
        return f"optimization of '{template_id}' queued"

    def cancel_optimize(self) -> str:
        optimizer = self.gateway.core.optimizer
        if optimizer is None or not optimizer.cancel():
            return "no optimization is running"
        return f"cancelling the optimization of '{optimizer.running}'"

    def event(self, kind: str, text: str) -> None:
        self.gateway.core.event(kind, text)

    def call_detail(self, request_id: str, attempt: int | None = None) -> dict[str, Any] | None:
        return self.gateway.call(self.gateway.core.recent_call, request_id, attempt)

    def inflight_detail(self, request_id: str) -> dict[str, Any] | None:
        """What is known so far of a call still in flight; None once it has ended."""
        return self.gateway.call(self.gateway.core.gateway.inflight.detail, request_id)
