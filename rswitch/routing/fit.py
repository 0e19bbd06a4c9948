"""Calibrating a semantic step's thresholds on labelled examples (`rswitch route fit`).

Each example is a text and the route it should take, or none (out of scope: the step should
pass). A route is taken when it is the nearest and its score reaches its threshold, so the
thresholds trade in-scope accuracy (too high: good matches rejected) against out-of-scope
recall (too low: everything is matched). `fit` picks them to maximise an objective:
`balanced` (the mean of in-scope accuracy and out-of-scope recall, CLINC150's two numbers)
or `accuracy` (share of all examples handled right).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUT_OF_SCOPE = -1
OBJECTIVES = ("balanced", "accuracy")


@dataclass
class Metrics:
    n: int
    in_scope: int
    out_of_scope: int
    accuracy: float  # all examples: right route, or rightly passed
    in_scope_accuracy: float  # in-scope examples routed to their route
    oos_recall: float | None  # out-of-scope examples passed (None: there were none)
    per_route: dict[int, float] = field(default_factory=dict)  # route -> recall on its examples

    def objective(self, kind: str) -> float:
        if kind == "accuracy" or self.oos_recall is None:
            return self.accuracy if kind == "accuracy" else self.in_scope_accuracy
        return (self.in_scope_accuracy + self.oos_recall) / 2


def predict(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The route each example takes (its nearest, if at or above that route's threshold), or -1."""
    best = scores.argmax(axis=1)
    top = scores[np.arange(len(scores)), best]
    return np.where(top >= thresholds[best], best, OUT_OF_SCOPE)


def evaluate(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> Metrics:
    pred = predict(scores, thresholds)
    ins = labels != OUT_OF_SCOPE
    n_in, n_out = int(ins.sum()), int((~ins).sum())
    per_route = {
        int(r): float((pred[labels == r] == r).mean()) for r in np.unique(labels[ins]) if r != OUT_OF_SCOPE
    }
    return Metrics(
        n=len(labels),
        in_scope=n_in,
        out_of_scope=n_out,
        accuracy=float((pred == labels).mean()) if len(labels) else 0.0,
        in_scope_accuracy=float((pred[ins] == labels[ins]).mean()) if n_in else 0.0,
        oos_recall=float((pred[~ins] == OUT_OF_SCOPE).mean()) if n_out else None,
        per_route=per_route,
    )


def candidates(
    values: np.ndarray,
    *,
    margin: float,
    bounds: tuple[float | None, float | None] = (None, None),
    limit: int | None = None,
) -> np.ndarray:
    """Every distinct way a threshold splits `values`, ascending: the midpoints between neighbouring
    distinct values (at most `limit` of them, spread over the quantiles), one `margin` below them all
    and one above (rejecting or taking everything is a choice too), kept within `bounds` (the
    thresholds a config accepts)."""
    v = np.unique(np.asarray(values, dtype=float))
    if not len(v):
        return np.array([bounds[0] if bounds[0] is not None else -1.0])
    if limit is not None and len(v) > limit + 1:
        v = np.unique(np.quantile(v, np.linspace(0, 1, limit + 1)))
    out = np.concatenate([[v[0] - margin], (v[:-1] + v[1:]) / 2, [v[-1] + margin]])
    return np.unique(np.clip(out, *bounds))


def scan(thresholds: np.ndarray, value: Callable[[float], Any]) -> tuple[float, Any]:
    """The threshold of `thresholds` (ascending) whose `value` is highest, and that value.

    The tie rule of every threshold fit in rswitch (semantic thresholds, trained probability
    thresholds, judge thresholds): of the thresholds that tie for the best value, the middle one
    (the upper of two), the split least sensitive to noise in the scores. Values are compared
    exactly (tuples allowed: a tie-break after the main value); round floats that should tie."""
    values = [value(float(t)) for t in thresholds]
    best = max(values)
    tied = [float(t) for t, v in zip(thresholds, values, strict=True) if v == best]
    return tied[len(tied) // 2], best


def fit(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    objective: str = "balanced",
    per_route: bool = False,
    rounds: int = 2,
) -> np.ndarray:
    """Thresholds (one per route) that maximise `objective` on these examples.

    One shared threshold first (a scan over the observed scores); with `per_route`, each
    route's own threshold is then tuned in turn, holding the others, for `rounds` passes.
    Ties: `scan`'s rule, the middle of the tied thresholds."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    routes = scores.shape[1]
    top = scores.max(axis=1)

    def score_of(th: np.ndarray) -> float:
        return round(evaluate(scores, labels, th).objective(objective), 12)

    shared, best_v = scan(
        candidates(top, margin=1e-3, bounds=(None, 1.0), limit=400), lambda t: score_of(np.full(routes, t))
    )
    thresholds = np.full(routes, shared)
    if not per_route:
        return thresholds
    nearest = scores.argmax(axis=1)
    for _ in range(rounds):
        for r in range(routes):
            mine = top[nearest == r]
            if not len(mine):
                continue

            def with_route(t: float, r: int = r) -> float:
                trial = thresholds.copy()
                trial[r] = t
                return score_of(trial)

            t, v = scan(candidates(mine, margin=1e-3, bounds=(None, 1.0), limit=100), with_route)
            if v > best_v:  # only a better route threshold moves it
                thresholds[r], best_v = t, v
    return thresholds
