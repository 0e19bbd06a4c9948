"""Calibrating a semantic step's thresholds on labelled examples (`rswitch route fit`).

Each example is a text and the route it should take, or none (out of scope: the step should
pass). A route is taken when it is the nearest and its score reaches its threshold, so the
thresholds trade in-scope accuracy (too high: good matches rejected) against out-of-scope
recall (too low: everything is matched). `fit` picks them to maximise an objective:
`balanced` (the mean of in-scope accuracy and out-of-scope recall, CLINC150's two numbers)
or `accuracy` (share of all examples handled right).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _candidates(values: np.ndarray, limit: int = 400) -> np.ndarray:
    """Midpoints between neighbouring distinct scores (at most `limit`), one below them all and
    one above (capped at 1, the most a threshold may be)."""
    v = np.unique(values)
    if len(v) > limit + 1:
        v = np.unique(np.quantile(v, np.linspace(0, 1, limit + 1)))
    mids = (v[:-1] + v[1:]) / 2 if len(v) > 1 else v
    low = (v[0] - 1e-3) if len(v) else -1.0
    high = [min(v[-1] + 1e-3, 1.0)] if len(v) else []  # rejecting everything is a choice too
    return np.concatenate([[low], mids, high])


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
    Ties go to the lower threshold (fewer good matches thrown away)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    routes = scores.shape[1]
    top = scores.max(axis=1)

    def score_of(th: np.ndarray) -> float:
        return evaluate(scores, labels, th).objective(objective)

    best_t, best_v = None, -1.0
    for t in _candidates(top):
        v = score_of(np.full(routes, t))
        if v > best_v + 1e-12:
            best_t, best_v = t, v
    thresholds = np.full(routes, float(best_t if best_t is not None else -1.0))
    if not per_route:
        return thresholds
    nearest = scores.argmax(axis=1)
    for _ in range(rounds):
        for r in range(routes):
            mine = top[nearest == r]
            if not len(mine):
                continue
            for t in _candidates(mine, limit=100):
                trial = thresholds.copy()
                trial[r] = t
                v = score_of(trial)
                if v > best_v + 1e-12:
                    thresholds, best_v = trial, v
    return thresholds
