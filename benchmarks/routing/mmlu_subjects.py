#!/usr/bin/env python3
"""How much of MMLU's routing signal is the subject? A reference for the RouteLLM replay.

RouteLLM's MMLU data comes as one file per subject (57). The strong model's gain over the weak
one differs a lot between subjects, so a router that knew each question's subject could route
on the subject's average gain alone. No router here is told the subject: this script measures
what knowing it would be worth, on the same five 50/50 splits as `routellm.py`, beside the
learned step's figures read from `results/routellm.json` (static encoder) and
`results/routellm-minilm.json` (MiniLM):

- subject prior (told the subject): score = the subject's mean gain (strong − weak
  correctness) on the train half.
- subject prior + text (told the subject): plus a ridge regression of each train question's
  gain beyond its subject's mean, on the learned step's features (static embedding + TF-IDF of
  word n-grams), so the within-subject signal the text carries is added.
- subject from text: a logistic regression trained on the train half's subjects predicts each
  test question's subject from the same features; score = the expected subject gain. It is
  taught with labels a gateway's traffic does not have, but decides from the text alone.

Usage: python benchmarks/routing/mmlu_subjects.py [--seeds 5] [--json out.json] [--markdown out.md]
(about 17 minutes on 2 cores that other jobs shared; most of it the subject classifier).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import routellm as rl  # noqa: E402

ALPHA = 10.0  # ridge penalty of the residual model (the learned step's usual choice on MMLU)
LOGISTIC_C = 10.0


def subject_gain(topics: np.ndarray, gain: np.ndarray) -> dict[str, float]:
    """Each subject's mean gain over its rows."""
    return {t: float(gain[topics == t].mean()) for t in np.unique(topics)}


def subject_scores(
    topics_tr: np.ndarray, gain_tr: np.ndarray, topics_te: np.ndarray, x_tr: Any = None, x_te: Any = None
) -> np.ndarray:
    """The subject prior for each test row (the overall mean for a subject unseen in training);
    with features, plus a ridge fit of the train rows' gain beyond their subject's mean."""
    prior = subject_gain(topics_tr, gain_tr)
    overall = float(gain_tr.mean())
    score = np.array([prior.get(t, overall) for t in topics_te])
    if x_tr is None:
        return score
    from sklearn.linear_model import Ridge

    residual = gain_tr - np.array([prior[t] for t in topics_tr])
    return score + Ridge(alpha=ALPHA).fit(x_tr, residual).predict(x_te)


def subject_from_text(topics_tr: np.ndarray, gain_tr: np.ndarray, x_tr: Any, x_te: Any) -> np.ndarray:
    """Expected subject gain under a text classifier's subject probabilities."""
    from sklearn.linear_model import LogisticRegression

    prior = subject_gain(topics_tr, gain_tr)
    clf = LogisticRegression(C=LOGISTIC_C, max_iter=300).fit(x_tr, topics_tr)
    return clf.predict_proba(x_te) @ np.array([prior[t] for t in clf.classes_])


def run(seeds: int = 5, data: rl.RoutingData | None = None, emb: np.ndarray | None = None) -> dict[str, Any]:
    from rswitch.routing import learned

    data = data or rl.load_mmlu()
    assert data.topics is not None, "the data has no subjects"
    emb = rl.embed(data.prompts) if emb is None else emb
    idf = learned.fit_idf(data.prompts, "words")
    x = learned.features(emb, data.prompts, "embedding+words", idf)
    gain = data.strong - data.weak
    per: dict[str, list[dict[str, Any]]] = {"subject": [], "subject_text": [], "subject_from_text": []}
    for seed in range(seeds):
        tr, te = rl.split(data.groups, seed)
        s_te, w_te, t_tr, t_te = data.strong[te], data.weak[te], data.topics[tr], data.topics[te]
        scores = {
            "subject": subject_scores(t_tr, gain[tr], t_te),
            "subject_text": subject_scores(t_tr, gain[tr], t_te, x[tr], x[te]),
            "subject_from_text": subject_from_text(t_tr, gain[tr], x[tr], x[te]),
        }
        for name, sc in scores.items():
            per[name].append(rl._scored(sc, s_te, w_te))
        print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1]['apgr']:.3f}" for k, v in per.items()), flush=True)
    return {
        "n_prompts": len(data),
        "subjects": int(len(np.unique(data.topics))),
        "seeds": seeds,
        "routers": {name: rl._aggregate(runs) for name, runs in per.items()},
    }


NAMES = {
    "subject": "subject prior (told the subject)",
    "subject_text": "subject prior + text residual (told the subject)",
    "subject_from_text": "subject from text (classifier taught the train half's subjects)",
}


def learned_rows(results_dir: Path = HERE / "results") -> list[tuple[str, dict[str, Any]]]:
    """The learned step's MMLU rows from the replay's own result files, where they exist."""
    rows = []
    for name, label in (("routellm.json", "static encoder"), ("routellm-minilm.json", "MiniLM")):
        path = results_dir / name
        if path.exists():
            r = json.loads(path.read_text())["datasets"].get("mmlu")
            if r and r["routers"].get("learned"):
                rows.append((f"learned step ({label}; {name})", r["routers"]["learned"]))
    return rows


def markdown(result: dict[str, Any], results_dir: Path = HERE / "results") -> str:
    lines = [
        "# MMLU: how much of the routing signal is the subject",
        "",
        f"`python benchmarks/routing/mmlu_subjects.py --seeds {result['seeds']}`: {result['n_prompts']} "
        f"prompts, {result['subjects']} subjects; the test half of the same {result['seeds']} seeded "
        "50/50 splits as `routellm.py` (mean ± std over splits). The first two rows are told each "
        "question's subject, which no router is; they show what the subject is worth.",
        "",
        "| router | APGR | CPT(50%) | CPT(80%) | win-AUC |",
        "|---|---|---|---|---|",
    ]
    for name, row in [*((NAMES[k], v) for k, v in result["routers"].items()), *learned_rows(results_dir)]:
        lines.append(
            f"| {name} | {rl._pm(row['apgr'])} | {rl._pm(row['cpt50'], True)} | "
            f"{rl._pm(row['cpt80'], True)} | {rl._pm(row.get('win_auc'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "mmlu-subjects.json")
    ap.add_argument("--markdown", type=Path, default=HERE / "results" / "mmlu-subjects.md")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    started = time.perf_counter()
    result = run(args.seeds)
    result["seconds"] = time.perf_counter() - started
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
