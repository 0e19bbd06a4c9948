#!/usr/bin/env python3
"""Regenerate sample_prompts/extract-bench/{labelled,examples}.jsonl from usaddress's labelled addresses.

usaddress (DataMade; PyPI `usaddress`, MIT licence) ships `training/labeled.xml` in its source
distribution: 1,513 real-world US addresses, each hand-tagged token by token (AddressNumber,
StreetName, PlaceName, StateName, ZipCode, ...). benchmarks/data/usaddress/labeled.xml.gz is that
file, gzipped and otherwise unchanged. extract-bench turns the tagging into a JSON extraction task:

    input     "1525 W. Homer St., Ste. 401, Chicago, IL 60601"
    expected  {"number": "1525", "street": "W. Homer St.", "city": "Chicago", "state": "IL", "zip": "60601"}

scored by rswitch's `json_fields` evaluator (the share of the five fields that match, case- and
surrounding-space-insensitively). Only addresses with every one of the five parts, each as one
run of tokens that appears as written in the text, are kept; addresses with a recipient, building or landmark name, a PO box, an
intersection or a country are left out, so each field has one right answer. Units ("Suite 1515",
"# 132") stay in the text and belong to no field. A field's value is its tokens joined by one
space, with the commas that separate parts in the text removed ("Chicago," → "Chicago");
everything else (case, "St.", "30092-2755") is as written.

    labelled.jsonl  TRAIN_ROWS + TEST_ROWS rows drawn (seeded) from the kept addresses, the TEST_ROWS
                    held-out rows last. usaddress has no test split of its own, so the held-out rows
                    are a seeded random draw; `rswitch dataset import` keeps file order and the
                    optimizer's test split is the newest 20% of rows, so the promotion gate scores
                    exactly these rows, never seen in train or validation.
    examples.jsonl  EXAMPLE_ROWS further addresses: the sample traffic `rswitch load` replays.

Usage: python benchmarks/make_extract_bench.py [--source PATH/labeled.xml[.gz]] [--out sample_prompts/extract-bench]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import xml.etree.ElementTree as ET
from pathlib import Path

from make_intent_bench import write_jsonl  # this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = Path(__file__).resolve().parent / "data" / "usaddress" / "labeled.xml.gz"
DEFAULT_OUT = ROOT / "sample_prompts" / "extract-bench"

# JSON key → the usaddress tags whose tokens make its value, in the order they appear.
FIELDS: dict[str, tuple[str, ...]] = {
    "number": ("AddressNumber",),
    "street": (
        "StreetNamePreModifier",
        "StreetNamePreDirectional",
        "StreetNamePreType",
        "StreetName",
        "StreetNamePostType",
        "StreetNamePostDirectional",
    ),
    "city": ("PlaceName",),
    "state": ("StateName",),
    "zip": ("ZipCode",),
}
KEYS = ", ".join(FIELDS)
# Tags a kept address may also carry: they stay in the text and belong to no field.
ALLOWED_EXTRA = frozenset({"OccupancyType", "OccupancyIdentifier"})
TRAIN_ROWS = 240  # → the optimizer's train and validation splits
TEST_ROWS = 60  # the newest 20% of rows: the optimizer's test split
EXAMPLE_ROWS = 10  # → examples.jsonl
SEED = 1513


def read_source(source: Path) -> ET.Element:
    raw = source.read_bytes()
    return ET.fromstring(gzip.decompress(raw) if source.suffix == ".gz" else raw)


def _clean(token: str) -> str:
    return token.strip().rstrip(",;").strip()


def parse_address(node: ET.Element) -> tuple[str, dict[str, str]] | None:
    """(the address text, its five fields), or None if the address is not kept (see the docstring)."""
    tag_of = {tag: key for key, tags in FIELDS.items() for tag in tags}
    runs: list[tuple[str, list[str]]] = []  # (field key, tokens) per run of consecutive tokens
    for token in node:
        key = tag_of.get(token.tag)
        if key is None:
            if token.tag not in ALLOWED_EXTRA:
                return None
            key = ""  # a unit: breaks a run, belongs to no field
        text = _clean(token.text or "")
        if runs and runs[-1][0] == key:
            runs[-1][1].append(text)
        else:
            runs.append((key, [text]))
    fields: dict[str, str] = {}
    for key, tokens in runs:
        if not key:
            continue
        if key in fields:  # a field in two places: no single right answer
            return None
        fields[key] = " ".join(t for t in tokens if t)
    if set(fields) != set(FIELDS) or not all(fields.values()):
        return None
    text = " ".join("".join(node.itertext()).split())
    if not all(value.casefold() in text.casefold() for value in fields.values()):
        return None  # a comma inside a field ("Cox Ave., S.W."): no answer to copy as written
    return text, {key: fields[key] for key in FIELDS}


def addresses(root: ET.Element) -> list[tuple[str, dict[str, str]]]:
    """Every kept address, in file order, each text once (case-insensitively)."""
    seen: set[str] = set()
    kept = []
    for node in root.iter("AddressString"):
        parsed = parse_address(node)
        if parsed is None or parsed[0].lower() in seen:
            continue
        seen.add(parsed[0].lower())
        kept.append(parsed)
    return kept


def row(text: str, fields: dict[str, str]) -> dict:
    return {"input": text, "variables": {"keys": KEYS}, "expected": json.dumps(fields, ensure_ascii=False)}


def build(source: Path) -> tuple[list[dict], list[dict]]:
    kept = addresses(read_source(source))
    need = TRAIN_ROWS + TEST_ROWS + EXAMPLE_ROWS
    if len(kept) < need:
        raise SystemExit(f"{source} has only {len(kept)} usable addresses, need {need}")
    rng = random.Random(SEED)
    rng.shuffle(kept)
    train = kept[:TRAIN_ROWS]
    test = kept[TRAIN_ROWS : TRAIN_ROWS + TEST_ROWS]
    extra = kept[TRAIN_ROWS + TEST_ROWS : need]
    labelled = [row(t, f) for t, f in train + test]
    examples = [
        {
            "variables": {"keys": KEYS},
            "messages": [{"role": "user", "content": t}],
            "expected": json.dumps(f, ensure_ascii=False),
        }
        for t, f in extra
    ]
    return labelled, examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="usaddress's training/labeled.xml")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the extract-bench sample folder")
    args = ap.parse_args()
    labelled, examples = build(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "labelled.jsonl", labelled)
    write_jsonl(args.out / "examples.jsonl", examples)
    print(f"wrote {len(labelled)} labelled rows and {len(examples)} examples to {args.out} (keys: {KEYS})")


if __name__ == "__main__":
    main()
