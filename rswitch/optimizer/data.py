"""What the optimizer learns from: labelled rows of a template's dataset, split without leaks.

Splits are fixed by seed and by time: the newest inputs form the test split (the promotion
gate's, and only the gate's); the rest is shuffled by seed into train (demo candidates) and
validation (the search's objective). Rows that share an input — the same messages and
variables — always land in the same split, so nothing seen in training is tested on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True)
class Example:
    row_id: int
    created_at: str
    messages: list[dict[str, Any]] = field(hash=False)
    variables: dict[str, Any] = field(hash=False)
    output: str  # what the model answered in production
    expected: str | None  # the label, when there is one
    score: float | None  # a label score for `output`, when there is one

    @property
    def key(self) -> str:
        """Identity of the input, for de-duplication across splits."""
        return hashlib.sha256(
            orjson.dumps([self.messages, self.variables], option=orjson.OPT_SORT_KEYS)
        ).hexdigest()

    @property
    def target(self) -> str | None:
        """The output a candidate should produce: the label, or a production answer scored >= 0.5."""
        if self.expected is not None:
            return self.expected
        if self.score is not None and self.score >= 0.5 and self.output:
            return self.output
        return None

    def user_text(self) -> str:
        for m in reversed(self.messages):
            if m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, list):
                    return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
                return str(c or "")
        return ""


def load_examples(
    datasets: Any, template_id: str, labelled_only: bool = True, reference: frozenset[str] = frozenset()
) -> list[Example]:
    """A template's successful rows (oldest first) from the datasets store, embedded or Postgres;
    with `labelled_only`, only those with a usable target.

    Answers of a `reference` combination (a strong model) count as labels for the others."""
    out = [
        Example(
            r["id"],
            r["created_at"],
            r["messages"],
            r["variables"],
            r["output"],
            r["label_expected"]
            if r["label_expected"] is not None or r["combination_id"] not in reference
            else r["output"],
            r["label_score"],
        )
        for r in datasets.examples(template_id)
    ]
    return [e for e in out if e.target is not None] if labelled_only else out


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


class NotEnoughData(ValueError):
    pass


def split(
    examples: list[Example],
    *,
    seed: int,
    test_fraction: float = 0.2,
    val_fraction: float = 0.3,
    min_per_split: int = 2,
) -> Splits:
    """Group by input, newest groups to test, the rest shuffled (by seed) into train and val."""
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.key, []).append(e)
    # a group is as new as its newest row
    ordered = sorted(groups.values(), key=lambda g: max(x.created_at for x in g))
    n = len(ordered)
    n_test = max(min_per_split, round(n * test_fraction))
    rest, test = ordered[: n - n_test], ordered[n - n_test :]
    random.Random(seed).shuffle(rest)
    n_val = max(min_per_split, round(len(rest) * val_fraction / (1 - test_fraction)))
    val, train = rest[:n_val], rest[n_val:]
    if len(train) < min_per_split or len(val) < min_per_split or len(test) < min_per_split:
        raise NotEnoughData(
            f"need at least {3 * min_per_split} distinct labelled inputs to split into train/validation/test; have {n}"
        )

    def flat(gs: list[list[Example]]) -> list[Example]:
        return [e for g in gs for e in g]

    return Splits(flat(train), flat(val), flat(test))
