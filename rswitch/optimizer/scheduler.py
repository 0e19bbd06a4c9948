"""The background optimizer: a worker thread that reruns MIPROv2 (or, with `strategy: reflective`,
the reflective instruction search) where new labels arrived.

It runs one template at a time on its own event loop, so its CPU work (search, scoring)
never runs on the gateway's loop; only the model calls are handed to the gateway's loop,
through the same providers and rate limits as production traffic. Stopping cancels the
current run between two calls.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any

from rswitch.optimizer.data import load_examples
from rswitch.optimizer.mipro import Budget, Settings
from rswitch.optimizer.reflective import ReflectiveSettings
from rswitch.optimizer.service import OptimizeError, optimize

log = logging.getLogger("rswitch.optimizer")


def _utc(text: str) -> datetime:
    """A stored time (ISO 8601, with or without a zone: naive ones are UTC) to the second."""
    at = datetime.fromisoformat(text)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).replace(microsecond=0)


def search_settings(cfg: Any, seed: int = 0) -> Settings | ReflectiveSettings:
    """The search a config's `gateway.optimization` asks for, with its settings."""
    if cfg.strategy == "reflective":
        return ReflectiveSettings(seed=seed, **cfg.reflective.model_dump())
    return Settings.auto(cfg.auto, seed=seed)


class BackgroundOptimizer:
    def __init__(self, core: Any, settings: Any, *, periodic: bool = True) -> None:
        self.core = core
        self.cfg = settings  # config.OptimizationConfig
        self.periodic = periodic  # False: only runs asked for (the TUI's key), never on a timer
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._requests: queue.Queue[str] = queue.Queue()
        self._labels_at_last_run: dict[str, int] = {}
        self.running: str | None = None
        self.stage: str | None = None  # what the running run is doing (bootstrapping demos, trial 3/12, …)
        self._budget: Budget | None = None  # the running run's, for its calls so far
        self.trials: deque[dict[str, Any]] = deque(maxlen=200)  # the current (or last) run's trials, live
        self.runs: deque[dict[str, Any]] = deque(maxlen=20)  # finished runs, newest last
        self.run_counts = {"promoted": 0, "kept": 0, "failed": 0}  # since start, for /metrics
        self.queued: list[str] = []
        self._thread = threading.Thread(target=self._run, name="rswitch-optimizer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._cancel.set()
        self._requests.put("")  # wake the loop
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request(self, template_id: str) -> None:
        """Optimize this template as soon as the worker is free (the TUI's keypress)."""
        self.queued.append(template_id)
        self._requests.put(template_id)

    @property
    def last(self) -> dict[str, Any] | None:
        """The newest finished run (its verdict, or its error)."""
        return self.runs[-1] if self.runs else None

    def cancel(self) -> bool:
        """Stop the current run between two calls; False when nothing runs."""
        if self.running is None:
            return False
        self._cancel.set()
        return True

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "periodic": self.periodic,
            "running": self.running,
            "strategy": self.cfg.strategy,
            "stage": self.stage if self.running else None,
            "calls": self._budget.total_calls if self.running and self._budget else None,
            "cost": self._budget.cost if self.running and self._budget else None,
            "queued": list(self.queued),
            "last": self.last,
            "interval_seconds": self.cfg.interval_seconds,
            # list() first: one C call, safe while the optimizer thread appends
            "trials": [dict(t) for t in list(self.trials)],
            "runs": list(self.runs),
            "run_counts": dict(self.run_counts),
        }

    def due(self) -> list[str]:
        """Templates with a combination and at least `min_new_labels` labels since their last run."""
        out = []
        served = {c.template_id for c in self.core.gateway.combinations.values() if c.enabled}
        for tid in sorted(served):
            examples = load_examples(self.core.datasets, tid)
            if tid not in self._labels_at_last_run:
                self._labels_at_last_run[tid] = self._labels_at_recorded_run(tid, examples)
            if len(examples) - self._labels_at_last_run[tid] >= self.cfg.min_new_labels:
                out.append(tid)
        return out

    def _labels_at_recorded_run(self, template_id: str, examples: list[Any]) -> int:
        """The labelled rows the template's last recorded run could see (those created before it
        started), so that a restart, or a new leader among replicas, does not run it again on the
        same labels: the runs are in the shared store, this scheduler's counts only in memory."""
        try:
            last = self.core.analytics.runs(template_id, 1)
        except Exception:
            log.exception("optimizer could not read the last run of %s", template_id)
            return 0
        if not last or not last[0].get("started_at"):
            return 0
        started = _utc(str(last[0]["started_at"]))
        return sum(1 for e in examples if _utc(e.created_at) <= started)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wanted = self._requests.get(timeout=self.cfg.interval_seconds if self.periodic else 1.0)
            except queue.Empty:
                wanted = None
            if self._stop.is_set():
                return
            if not wanted and not self.periodic:
                continue
            if not wanted and not self.core.may_lead("optimizer"):
                continue  # another replica runs the periodic optimizer
            if wanted in self.queued:
                self.queued.remove(wanted)
            try:
                targets = [wanted] if wanted else self.due()
            except Exception:
                log.exception("optimizer could not look for due templates")
                continue
            for tid in targets:
                if self._stop.is_set():
                    return
                self._optimize(tid)

    def _trial(self, t: dict[str, Any]) -> None:
        self.trials.append(
            {
                k: t.get(k)
                for k in (
                    "run_id",
                    "trial",
                    "instruction",
                    "instruction_text",
                    "demo_set",
                    "minibatch_score",
                    "full_score",
                    "best_score",
                )
            }
            | {"calls": t.get("calls"), "cost": t.get("cost")}
        )

    def _on_stage(self, name: str) -> None:
        self.stage = name

    def _optimize(self, template_id: str) -> None:
        self.running = template_id
        self.stage = "loading examples"
        self._budget = Budget(self.cfg.budget_calls, self.cfg.budget_cost)
        self.trials.clear()
        self._cancel.clear()
        self.core.event("optimizer", f"optimizing '{template_id}'")
        settings = search_settings(self.cfg)
        labels = len(load_examples(self.core.datasets, template_id))
        # counted as tried even if it fails, so a failing template waits for new labels, not the next tick
        self._labels_at_last_run[template_id] = labels
        try:
            result, version = asyncio.run(
                optimize(
                    self.core,
                    template_id,
                    settings=settings,
                    evaluator=self.cfg.evaluator,
                    budget=self._budget,
                    cancel=self._cancel,
                    on_trial=self._trial,
                    on_stage=self._on_stage,
                )
            )
            self._labels_at_last_run[template_id] = labels
            self.runs.append(
                {
                    "template_id": template_id,
                    "run_id": result.run_id,
                    "verdict": result.verdict,
                    "new_version": version,
                    "calls": sum(result.calls.values()),
                    "cost": result.cost,
                }
            )
            self.run_counts["promoted" if version else "kept"] += 1
            promoted = f"promoted as version {version}" if version else "not promoted"
            self.core.event("optimizer", f"'{template_id}': {result.verdict} ({promoted})")
            log.info("optimizer: %s: %s", template_id, result.verdict)
        except OptimizeError as exc:
            self.run_counts["failed"] += 1
            self.runs.append({"template_id": template_id, "error": str(exc)})
            self.core.event("optimizer", f"'{template_id}' not optimized: {exc}")
            log.warning("optimizer: %s: %s", template_id, exc)
        except Exception as exc:  # a failed run must not end the worker
            self.run_counts["failed"] += 1
            self.runs.append({"template_id": template_id, "error": f"{type(exc).__name__}: {exc}"})
            self.core.event("optimizer", f"'{template_id}' optimization failed: {type(exc).__name__}")
            log.exception("optimizer run for %s failed", template_id)
        finally:
            self.running = self.stage = None
