#!/usr/bin/env python3
"""Regenerate sample_prompts/intent-bench/{labelled,examples}.jsonl from CLINC150, deterministically.

CLINC150 (Larson et al., 2019; github.com/clinc/oos-eval; CC BY 3.0) holds `[text, intent]`
pairs for 150 intents in train/val/test splits. intent-bench keeps five intents whose short,
distinct label words the embedded SmolLM2-135M can learn to answer with from a few demos:

    labelled.jsonl  65 rows per intent, 325 in all: 52 per intent from CLINC's train split
                    (shuffled together), then 13 per intent from CLINC's test split (shuffled
                    together) at the end of the file. `rswitch dataset import` keeps file order,
                    and the optimizer's test split is the newest 20% of rows, so the promotion
                    gate scores exactly CLINC's own test sentences, never seen in train or
                    validation.
    examples.jsonl  2 per intent from CLINC's val split: the sample traffic `rswitch load` replays.

Usage: python benchmarks/make_intent_bench.py [--source PATH/clinc_full.json] [--out sample_prompts/intent-bench]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = Path(__file__).resolve().parent / "routing" / "data" / "clinc_full.json.gz"
DEFAULT_OUT = ROOT / "sample_prompts" / "intent-bench"

# CLINC150 intent → the label word the model answers with.
INTENTS = {
    "weather": "weather",
    "alarm": "alarm",
    "book_flight": "flight",
    "calories": "calories",
    "traffic": "traffic",
}
LABELS = ", ".join(INTENTS.values())
PER_INTENT_TRAIN = 52  # from CLINC train → the optimizer's train and validation splits
PER_INTENT_TEST = 13  # from CLINC test → the newest 20% of rows: the optimizer's test split
PER_INTENT_EXAMPLES = 2  # from CLINC val → examples.jsonl
SEED = 150


def pick(rows: list[list[str]], intent: str, n: int, rng: random.Random, seen: set[str]) -> list[str]:
    texts = sorted({t.strip() for t, i in rows if i == intent and t.strip().lower() not in seen})
    rng.shuffle(texts)
    chosen = texts[:n]
    if len(chosen) < n:
        raise SystemExit(f"CLINC150 has only {len(chosen)} unused '{intent}' texts, need {n}")
    seen.update(t.lower() for t in chosen)
    return chosen


def row(text: str, label: str) -> dict:
    return {"input": text, "variables": {"labels": LABELS}, "expected": label}


def build(source: Path) -> tuple[list[dict], list[dict]]:
    raw = source.read_bytes()
    data = json.loads(gzip.decompress(raw) if source.suffix == ".gz" else raw)
    rng = random.Random(SEED)
    seen: set[str] = set()  # no sentence twice, across all three files' splits
    train: list[dict] = []
    test: list[dict] = []
    examples: list[dict] = []
    for intent, label in INTENTS.items():
        train += [row(t, label) for t in pick(data["train"], intent, PER_INTENT_TRAIN, rng, seen)]
        test += [row(t, label) for t in pick(data["test"], intent, PER_INTENT_TEST, rng, seen)]
        examples += [
            {
                "variables": {"labels": LABELS},
                "messages": [{"role": "user", "content": t}],
                "expected": label,
            }
            for t in pick(data["val"], intent, PER_INTENT_EXAMPLES, rng, seen)
        ]
    rng.shuffle(train)
    rng.shuffle(test)
    rng.shuffle(examples)
    return train + test, examples


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="CLINC150's clinc_full.json")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the intent-bench sample folder")
    args = ap.parse_args()
    labelled, examples = build(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "labelled.jsonl", labelled)
    write_jsonl(args.out / "examples.jsonl", examples)
    print(
        f"wrote {len(labelled)} labelled rows and {len(examples)} examples to {args.out} (labels: {LABELS})"
    )


if __name__ == "__main__":
    main()
