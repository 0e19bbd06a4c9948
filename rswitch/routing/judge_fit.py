"""Fitting a judge step's threshold from labelled prompts, and telling whether the judge helps.

The judge's expected score is a ranking of prompts by difficulty: its AUROC against hard/easy
labels (the chance that a hard prompt scores above an easy one) says how good that ranking is,
whatever the threshold; 0.5 is a coin. The threshold then picks an operating point on it:

- balanced: the best mean of hard recall and easy recall (the default; robust to few hard);
- accuracy: the most examples routed to their label;
- share: the threshold that sends closest to a target share of prompts to `hard` (RouteLLM's
  knob: how much strong-model traffic you can afford), whatever the labels say.

A prompt is routed hard when its score is >= the threshold, as `JudgeStep.decide` does.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rswitch.routing.fit import candidates, scan
from rswitch.routing.judge import JudgeStep

OBJECTIVES = ("balanced", "accuracy", "share")
SCALE = (1.0, 5.0)  # the judge's scores, and the thresholds its config accepts


@dataclass(frozen=True)
class Operating:
    """How a threshold routes the labelled examples."""

    threshold: float
    accuracy: float
    hard_recall: float | None  # share of the hard examples routed hard (None: no hard examples)
    easy_recall: float | None
    hard_share: float  # share of all examples routed hard

    @property
    def balanced(self) -> float:
        parts = [r for r in (self.hard_recall, self.easy_recall) if r is not None]
        return sum(parts) / len(parts)


@dataclass(frozen=True)
class Chance:
    """The AUROC, and how far from 0.5 chance alone would put it with these many examples."""

    auroc: float
    noise: float  # two standard errors of the AUROC of a judge that knows nothing

    @property
    def verdict(self) -> str:
        if abs(self.auroc - 0.5) <= self.noise:
            return (
                f"no better than chance: AUROC {self.auroc:.3f} is within {self.noise:.3f} of 0.5, as a "
                "coin would score on these examples; its threshold cannot help — use a stronger judge model"
            )
        if self.auroc < 0.5:
            return (
                f"worse than chance: AUROC {self.auroc:.3f}, it rates the easy prompts harder "
                "(check the rubric and the labels)"
            )
        return f"better than chance: AUROC {self.auroc:.3f} (0.5 = a coin, 1 = perfect ranking)"


def auroc(scores: np.ndarray, hard: np.ndarray) -> Chance:
    """P(a hard example scores above an easy one), ties counting half (Mann-Whitney U / n1 n2)."""
    pos, neg = np.sort(scores[hard]), np.sort(scores[~hard])
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs both hard and easy examples")
    below = np.searchsorted(neg, pos, side="left")
    not_above = np.searchsorted(neg, pos, side="right")
    u = float(np.sum(below) + 0.5 * np.sum(not_above - below))
    n1, n2 = pos.size, neg.size
    return Chance(u / (n1 * n2), 2 * math.sqrt((n1 + n2 + 1) / (12 * n1 * n2)))


def operating(scores: np.ndarray, hard: np.ndarray, threshold: float) -> Operating:
    routed = scores >= threshold
    recall = lambda mask: float(np.mean(routed[mask] == hard[mask])) if mask.any() else None  # noqa: E731
    return Operating(
        threshold=threshold,
        accuracy=float(np.mean(routed == hard)),
        hard_recall=recall(hard),
        easy_recall=recall(~hard),
        hard_share=float(np.mean(routed)),
    )


def fit_threshold(
    scores: np.ndarray, hard: np.ndarray, objective: str = "balanced", share: float | None = None
) -> Operating:
    """The threshold that maximises `objective` (or meets the hard `share`) on the examples: the
    same scan as the semantic thresholds' (`fit.scan`), with its tie rule (the middle of the tied
    thresholds), over every distinct split of the scores within the 1-5 scale."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if scores.size == 0:
        raise ValueError("no scored examples to fit on")
    if objective == "share" and (share is None or not 0 <= share <= 1):
        raise ValueError("the share objective needs a target share of prompts to hard, in [0, 1]")

    def value(t: float) -> Any:
        p = operating(scores, hard, t)
        if objective == "share":  # nearest the share first; among equals the better-ranked split
            assert share is not None
            return (-round(abs(p.hard_share - share), 9), round(p.balanced, 12))
        return round(p.balanced if objective == "balanced" else p.accuracy, 12)

    threshold, _ = scan(candidates(scores, margin=0.5, bounds=SCALE), value)
    return operating(scores, hard, threshold)


@dataclass(frozen=True)
class JudgeFit:
    step: str
    examples: int
    hard: int
    failed: int  # examples the judge gave no score for (errors, no score tokens): left out
    scores: tuple[float, ...]
    chance: Chance | None  # None with one class only
    current: Operating
    fitted: Operating


async def score_all(
    step: JudgeStep,
    texts: Sequence[str],
    *,
    timeout: float = 30.0,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[float | None]:
    """The judge's expected score for each text (None where it failed), a few calls at a time."""
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(text: str) -> float | None:
        nonlocal done
        async with gate:
            try:
                value = await step.score(text, timeout=timeout)
            except Exception:  # counted as failed and reported; one bad call must not end the fit
                value = None
        done += 1
        if progress is not None:
            progress(done, len(texts))
        return value

    return list(await asyncio.gather(*(one(t) for t in texts)))


def fit_judge(
    step: JudgeStep,
    scored: Sequence[float | None],
    hard: Sequence[bool],
    objective: str = "balanced",
    share: float | None = None,
) -> JudgeFit:
    """Fit `step`'s threshold on scored, labelled examples (those without a score left out)."""
    keep = [i for i, s in enumerate(scored) if s is not None]
    if not keep:
        raise ValueError(f"judge step '{step.name}' scored none of the {len(scored)} examples")
    scores = np.array([scored[i] for i in keep], dtype=float)
    labels = np.array([hard[i] for i in keep], dtype=bool)
    one_class = labels.all() or not labels.any()
    if one_class and objective != "share":
        which = "hard" if labels.all() else "easy"
        raise ValueError(
            f"every scored example is {which}: fitting by {objective} needs both hard and easy "
            "examples (or use --objective share with --share)"
        )
    return JudgeFit(
        step=step.name,
        examples=len(scored),
        hard=int(labels.sum()),
        failed=len(scored) - len(keep),
        scores=tuple(scores.tolist()),
        chance=None if one_class else auroc(scores, labels),
        current=operating(scores, labels, step.threshold),
        fitted=fit_threshold(scores, labels, objective, share),
    )


def report(fit: JudgeFit) -> list[str]:
    """The lines `rswitch route fit` prints for a judge step."""
    s = np.array(fit.scores)
    lines = [
        f"examples  {fit.examples}: {fit.hard} hard, {fit.examples - fit.failed - fit.hard} easy"
        + (f", {fit.failed} the judge gave no score for (left out)" if fit.failed else ""),
        f"scores    min {s.min():.2f}   median {float(np.median(s)):.2f}   max {s.max():.2f}",
    ]
    if fit.chance is not None:
        lines.append(f"judge     {fit.chance.verdict}")

    def line(name: str, p: Operating) -> str:
        recall = lambda r: f"{r:.1%}" if r is not None else "n/a"  # noqa: E731
        return (
            f"{name:<8}  threshold {p.threshold:.3f}   to hard {p.hard_share:.1%}   accuracy {p.accuracy:.1%}   "
            f"hard recall {recall(p.hard_recall)}   easy recall {recall(p.easy_recall)}"
        )

    lines += [line("current", fit.current), line("fitted", fit.fitted)]
    return lines
