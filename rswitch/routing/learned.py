"""The learned quality router (`type: learned`): from a template's own recorded rows with labels or
feedback scores, learn per prompt how well each arm (combination) answers, then send each prompt to
the cheapest arm predicted to be good enough.

Arms are listed cheapest first. For each arm a ridge regression (scikit-learn) predicts the quality
of its answer to a prompt from the prompt's encoder embedding and/or hashed character or word
n-grams (TF-IDF weighted), blended, when cross-validation prefers it, with the mean quality the
arm got on the k most similar labelled prompts (the same embeddings the explanation's neighbours
come from). Which features, ridge strength, k and blend weight: the candidate whose predicted gains
rank held-out prompts best (cross-validated APGR on the labelled prompts). The predicted *gain* of
a prompt is the best predicted quality among the dearer arms minus the cheapest arm's. One knob,
`strong_share`, says which share of traffic may leave the cheapest arm (RouteLLM's threshold): the
gain threshold is that quantile of the gains on the labelled prompts, so `strong_share: 0.3` sends
the 30% of prompts with the largest predicted gains (as they were distributed in the labelled
traffic) past the cheapest arm. A prompt above the threshold goes to the cheapest dearer arm whose
gain clears it. The decision ranks every arm (chosen first, then by predicted quality), so a
failed call moves down that ranking.

A row's quality: its `label_score` (feedback, 0..1), or, with an `expected` label and no score,
1 when the answer equals it (whitespace and case aside) and 0 when not. Rows without either teach
nothing. The fitted model is an .npz file (no pickle) validated on load: arrays, shapes, the arms
and the encoder must match the step's, or the step passes and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np

from rswitch.providers.batching import MicroBatcher
from rswitch.providers.blas import one_blas_thread
from rswitch.routing.base import Decision, Query, normalise
from rswitch.routing.semantic import Embedder

log = logging.getLogger("rswitch.routing")

FORMAT = "rswitch-learned-router/2"  # /2 adds the neighbour blend (knn_k, blend) and count_at_fit
FORMATS = ("rswitch-learned-router/1", FORMAT)  # a /1 file is a /2 one without the blend
HASH_FEATURES = 2**18  # buckets for character 2..5-grams (hashed: no vocabulary to store)
CHAR_NGRAMS = (2, 5)
WORD_NGRAMS = (1, 2)
# the feature sets cross-validation chooses from: on RouteLLM's data the embedding won on MT Bench,
# word n-grams on MMLU and GSM8K (benchmarks/routing/routellm.py)
FEATURES = ("embedding", "chars", "words", "embedding+chars")
ALPHAS = (1.0, 10.0, 100.0)
# the ridge's predictions are blended with the mean observed quality of the k nearest labelled
# prompts (embedding cosine): blend 0 is the ridge alone, 1 the neighbours alone
KNN_KS = (20, 50, 100, 200)
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)
CV_FOLDS = 4
# repeats of the k-fold split: the choice is noisy on a few hundred prompts and cheap to repeat
# there; one split on larger sets (a fit on 7,000 MMLU prompts takes ~1 min of CPU per repeat)
CV_REPEATS = 3
CV_REPEAT_BELOW = 2000  # prompts
MIN_PAIRED_PER_FOLD = 5  # prompts answered by the cheapest arm and a dearer one


class NotEnoughLabels(ValueError):
    """Too few labelled rows to fit (the step passes until there are enough)."""


class ArtifactError(ValueError):
    """A fitted-model file that cannot be used: missing, malformed, or fitted for other arms/encoder."""


# -- labelled rows ------------------------------------------------------------------------------


def quality_of(row: dict[str, Any]) -> float | None:
    """A recorded row's quality in [0, 1]: its feedback score, else whether it matched `expected`."""
    score = row.get("label_score")
    if score is not None:
        return min(max(float(score), 0.0), 1.0)
    expected = row.get("label_expected")
    if expected is not None:
        said = " ".join(str(row.get("output") or "").split()).lower()
        return 1.0 if said == " ".join(str(expected).split()).lower() else 0.0
    return None


@dataclass
class Labelled:
    """Labelled rows, their prompts de-duplicated: rows -> (text, arm, quality)."""

    texts: list[str]  # distinct prompt texts
    text_of: np.ndarray  # per row: index into texts
    arm_of: np.ndarray  # per row: index into the arms
    quality: np.ndarray  # per row
    row_ids: np.ndarray  # per row: the dataset row id

    def __len__(self) -> int:
        return len(self.quality)

    def counts(self, n_arms: int) -> list[int]:
        return np.bincount(self.arm_of, minlength=n_arms).tolist()


def labelled_rows(rows: list[dict[str, Any]], arms: list[str]) -> Labelled:
    """The rows (datasets.examples) of these arms that carry a quality, with a user prompt."""
    index: dict[str, int] = {}
    text_of, arm_of, quality, ids = [], [], [], []
    where = {a: i for i, a in enumerate(arms)}
    for r in rows:
        arm = where.get(r.get("combination_id"))
        q = quality_of(r) if arm is not None else None
        if q is None:
            continue
        text = Query(r.get("messages") or []).text
        if not text.strip():
            continue
        text_of.append(index.setdefault(text, len(index)))
        arm_of.append(arm)
        quality.append(q)
        ids.append(int(r.get("id") or 0))
    return Labelled(
        list(index),
        np.asarray(text_of, dtype=np.int64),
        np.asarray(arm_of, dtype=np.int64),
        np.asarray(quality, dtype=np.float64),
        np.asarray(ids, dtype=np.int64),
    )


def check_enough(data: Labelled, arms: list[str], min_labels: int) -> None:
    if len(data) < min_labels:
        raise NotEnoughLabels(f"{len(data)} labelled rows of its arms, fewer than min_labels {min_labels}")
    counts = data.counts(len(arms))
    thin = [f"{a} ({n})" for a, n in zip(arms, counts, strict=True) if n < 2]
    if thin:
        raise NotEnoughLabels(f"arms with fewer than 2 labelled rows: {', '.join(thin)}")


# -- features -----------------------------------------------------------------------------------


_normalise = normalise  # the semantic step's: unit rows, zero rows kept


def _hashed_family(feat: str) -> str | None:
    """The hashed n-gram family of a feature set ("chars" or "words"), if it has one."""
    return next((p for p in feat.split("+") if p in ("chars", "words")), None)


def _hashed_counts(texts: list[str], family: str) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(
        analyzer="char_wb" if family == "chars" else "word",
        ngram_range=CHAR_NGRAMS if family == "chars" else WORD_NGRAMS,
        n_features=HASH_FEATURES,
        alternate_sign=False,
        norm=None,
        lowercase=True,
    )
    x = vec.transform(texts).tocsr()
    x.data = 1.0 + np.log(x.data)  # sublinear term frequency
    return x


def fit_idf(texts: list[str], family: str = "chars") -> np.ndarray:
    counts = _hashed_counts(texts, family)
    df = np.bincount(counts.indices, minlength=HASH_FEATURES)
    return (np.log((1 + len(texts)) / (1 + df)) + 1.0).astype(np.float32)


def features(vectors: np.ndarray, texts: list[str], feat: str, idf: np.ndarray | None) -> Any:
    """The design matrix of a feature set: normalised embeddings, and/or the TF-IDF (weights `idf`)
    of hashed character or word n-grams, each block of unit length."""
    family = _hashed_family(feat)
    dense = _normalise(np.asarray(vectors, dtype=np.float64)) if "embedding" in feat.split("+") else None
    if family is None:
        assert dense is not None
        return dense
    from scipy.sparse import csr_matrix, hstack
    from sklearn.preprocessing import normalize

    assert idf is not None
    grams = normalize(_hashed_counts(texts, family).multiply(idf[None, :]).tocsr())
    return grams if dense is None else hstack([grams, csr_matrix(dense)]).tocsr()


def _ridge(x: Any, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import Ridge

    if len(y) == 0:
        return np.zeros(x.shape[1]), 0.0
    if not hasattr(x, "indices"):
        m = Ridge(alpha=alpha).fit(x, y)
        return np.asarray(m.coef_, dtype=np.float64).ravel(), float(m.intercept_)
    # hashed n-grams: only the columns these rows use. A column of zeros gets coefficient 0 (its
    # mean is 0 too), so the solution is the same, on a few thousand columns instead of 2^18
    used = np.unique(x.indices)
    m = Ridge(alpha=alpha).fit(x[:, used], y)
    coef = np.zeros(x.shape[1])
    coef[used] = np.asarray(m.coef_, dtype=np.float64).ravel()
    return coef, float(m.intercept_)


def gain_of(pred: np.ndarray) -> np.ndarray:
    """Per prompt: the best dearer arm's predicted quality minus the cheapest arm's."""
    return pred[:, 1:].max(axis=1) - pred[:, 0]


def apgr(scores: np.ndarray, gain: np.ndarray) -> float:
    """RouteLLM's average performance gap recovered: prompts sent past the cheapest arm in score
    order, ties averaged, the recovered share of the total gain integrated over c = 0..1."""
    total = float(gain.sum())
    n = len(gain)
    if n == 0 or abs(total) < 1e-12:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, d = scores[order], gain[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    sizes = np.diff(np.r_[starts, n])
    curve = np.r_[0.0, np.cumsum(np.repeat(np.add.reduceat(d, starts) / sizes, sizes))] / total
    grid = np.linspace(0, 1, 101)
    y = np.interp(grid * n, np.arange(n + 1), curve)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(grid)) / 2)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i::k]) for i in range(k)]


# -- the model ----------------------------------------------------------------------------------


@dataclass
class LearnedModel:
    arms: list[str]
    encoder_id: str
    features: str  # one of FEATURES
    alpha: float
    coef: np.ndarray  # (arms, dim)
    intercept: np.ndarray  # (arms,)
    idf: np.ndarray | None  # (HASH_FEATURES,) with hashed n-grams
    gains: np.ndarray  # sorted predicted gains of the labelled prompts: the knob's quantiles
    vectors: np.ndarray  # (prompts, d) normalised embeddings of the labelled prompts (neighbours)
    observed: np.ndarray  # (prompts, arms) mean observed quality, NaN where an arm never answered
    row_ids: np.ndarray  # (prompts,) a dataset row id of each prompt
    n_labels: int
    fitted_at: float
    cv: dict[str, float] = field(default_factory=dict)
    objective: str = ""
    knn_k: int = 0  # neighbours averaged for the blend (0: none)
    blend: float = 0.0  # the neighbours' weight in the predicted qualities
    count_at_fit: int | None = None  # the template's labelled rows when fitted (background refits)

    def __post_init__(self) -> None:
        # (dim, arms), contiguous: a product with coef.T would copy the whole matrix every call
        self._coef_t = np.ascontiguousarray(self.coef.T)

    def similarities(self, vectors: np.ndarray) -> np.ndarray:
        """(prompts, labelled prompts): cosine similarity to each labelled prompt."""
        return _normalise(np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)) @ self.vectors.T

    def predict(self, vectors: np.ndarray, texts: list[str], sims: np.ndarray | None = None) -> np.ndarray:
        """Each arm's predicted quality for each prompt: the ridge's, blended with the neighbours'
        mean observed quality when the fit chose a blend (`sims`: `similarities(vectors)`)."""
        pred = self.predict_linear(vectors, texts)
        if self.blend <= 0:
            return pred
        if sims is None:
            sims = self.similarities(vectors)
        near = neighbour_quality(sims, self.observed, self.knn_k)
        return (1 - self.blend) * pred + self.blend * near

    def predict_linear(self, vectors: np.ndarray, texts: list[str]) -> np.ndarray:
        """The ridge's part: `features(...) @ coef.T + intercept`, computed from the hashed
        n-grams' own columns (no sparse-matrix building per request)."""
        family = _hashed_family(self.features)
        out = np.tile(self.intercept, (len(texts), 1))
        dense_at = 0
        if family is not None:
            assert self.idf is not None
            counts = _hashed_counts(texts, family)
            for i in range(len(texts)):
                cols = counts.indices[counts.indptr[i] : counts.indptr[i + 1]]
                vals = counts.data[counts.indptr[i] : counts.indptr[i + 1]] * self.idf[cols]
                norm = float(np.sqrt(vals @ vals)) or 1.0
                out[i] += (vals / norm) @ self._coef_t[cols]
            dense_at = HASH_FEATURES
        if "embedding" in self.features.split("+"):
            out += _normalise(np.asarray(vectors, dtype=np.float64)) @ self._coef_t[dense_at:]
        return out

    def threshold(self, strong_share: float) -> float:
        """The gain a prompt must exceed to leave the cheapest arm: the (1 - share) quantile of the gains."""
        if strong_share <= 0:
            return float("inf")
        if strong_share >= 1:
            return float("-inf")
        return float(np.quantile(self.gains, 1 - strong_share))

    def neighbours(self, sims: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k labelled prompts most similar to one prompt (`sims`: its row of similarities)."""
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(int(i), float(sims[i])) for i in top]

    # -- file -----------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "arms": self.arms,
            "encoder": self.encoder_id,
            "features": self.features,
            "alpha": self.alpha,
            "n_labels": self.n_labels,
            "fitted_at": self.fitted_at,
            "cv": self.cv,
            "objective": self.objective,
            "knn_k": self.knn_k,
            "blend": self.blend,
            "count_at_fit": self.count_at_fit,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "meta": np.frombuffer(json.dumps(self.meta()).encode(), dtype=np.uint8),
            "coef": self.coef.astype(np.float32),
            "intercept": self.intercept.astype(np.float64),
            "gains": self.gains.astype(np.float64),
            "vectors": self.vectors.astype(np.float32),
            "observed": self.observed.astype(np.float64),
            "row_ids": self.row_ids.astype(np.int64),
        }
        if self.idf is not None:
            arrays["idf"] = self.idf.astype(np.float32)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, arms: list[str] | None = None, encoder_id: str | None = None) -> LearnedModel:
        """Read and check a fitted model; ArtifactError names what is wrong."""
        if not path.is_file():
            raise ArtifactError(f"no fitted model at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:  # not a zip, truncated, or an object array
            raise ArtifactError(
                f"{path} is not a learned-router model ({type(exc).__name__}: {exc})"
            ) from None
        try:
            meta = json.loads(bytes(data["meta"].astype(np.uint8)).decode())
        except (KeyError, ValueError, UnicodeDecodeError):
            raise ArtifactError(f"{path}: no readable 'meta' record") from None
        if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
            raise ArtifactError(
                f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                f"expected one of {', '.join(FORMATS)}: refit it (rswitch route fit --step NAME)"
            )
        missing = [
            k for k in ("coef", "intercept", "gains", "vectors", "observed", "row_ids") if k not in data
        ]
        if missing:
            raise ArtifactError(f"{path}: missing arrays {', '.join(missing)}")
        model_arms = meta.get("arms")
        if (
            not isinstance(model_arms, list)
            or not all(isinstance(a, str) for a in model_arms)
            or len(model_arms) < 2
        ):
            raise ArtifactError(f"{path}: 'arms' must list at least two combination ids")
        if arms is not None and model_arms != arms:
            raise ArtifactError(f"{path} was fitted for arms {model_arms}, the step has {arms}: refit it")
        if encoder_id is not None and meta.get("encoder") != encoder_id:
            raise ArtifactError(
                f"{path} was fitted with encoder {meta.get('encoder')!r}, the step uses {encoder_id!r}: refit it"
            )
        if meta.get("features") not in FEATURES:
            raise ArtifactError(f"{path}: unknown features {meta.get('features')!r}")
        idf = data.get("idf")
        hashed = _hashed_family(meta["features"]) is not None
        dense = "embedding" in meta["features"].split("+")
        if hashed != (idf is not None) or (idf is not None and idf.shape != (HASH_FEATURES,)):
            raise ArtifactError(f"{path}: the n-gram weights do not match its features")
        n_arms, vectors = len(model_arms), data["vectors"]
        dim = vectors.shape[1] if vectors.ndim == 2 else -1
        want_dim = (dim if dense else 0) + (HASH_FEATURES if hashed else 0)
        n = vectors.shape[0] if vectors.ndim == 2 else -1
        shapes = {
            "coef": (data["coef"].shape, (n_arms, want_dim)),
            "intercept": (data["intercept"].shape, (n_arms,)),
            "observed": (data["observed"].shape, (n, n_arms)),
            "row_ids": (data["row_ids"].shape, (n,)),
        }
        bad = [f"{k} {got} (expected {want})" for k, (got, want) in shapes.items() if got != want]
        if dim <= 0 or n <= 0 or data["gains"].ndim != 1 or len(data["gains"]) == 0 or bad:
            raise ArtifactError(f"{path}: inconsistent arrays: {'; '.join(bad) or 'empty vectors or gains'}")
        finite = ("coef", "intercept", "gains", "vectors")
        if not all(np.isfinite(data[k]).all() for k in finite) or (
            idf is not None and not np.isfinite(idf).all()
        ):
            raise ArtifactError(f"{path}: non-finite numbers in the model")
        knn_k, blend, count = meta.get("knn_k", 0), meta.get("blend", 0.0), meta.get("count_at_fit")
        if (
            not isinstance(knn_k, int)
            or isinstance(blend, bool)
            or not isinstance(blend, int | float)
            or not 0 <= blend <= 1
            or (blend > 0 and not 1 <= knn_k <= n)
        ):
            raise ArtifactError(
                f"{path}: neighbour blend {blend!r} with knn_k {knn_k!r}: the weight must be in 0..1 "
                f"and k in 1..{n} (its labelled prompts)"
            )
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ArtifactError(f"{path}: count_at_fit {count!r} is not a row count")
        return cls(
            arms=model_arms,
            encoder_id=str(meta.get("encoder")),
            features=meta["features"],
            alpha=float(meta.get("alpha", 0.0)),
            coef=data["coef"].astype(np.float64),
            intercept=data["intercept"].astype(np.float64),
            idf=idf,
            gains=np.sort(data["gains"].astype(np.float64)),
            vectors=vectors.astype(np.float32),
            observed=data["observed"].astype(np.float64),
            row_ids=data["row_ids"].astype(np.int64),
            n_labels=int(meta.get("n_labels", 0)),
            fitted_at=float(meta.get("fitted_at", 0.0)),
            cv={str(k): float(v) for k, v in (meta.get("cv") or {}).items()},
            objective=str(meta.get("objective", "")),
            knn_k=knn_k,
            blend=float(blend),
            count_at_fit=count,
        )


def _fit_arms(
    x: Any, data: Labelled, rows: np.ndarray, n_arms: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    coef, icpt = [], []
    for a in range(n_arms):
        mine = rows[data.arm_of[rows] == a]
        c, b = _ridge(x[data.text_of[mine]], data.quality[mine], alpha)
        coef.append(c)
        icpt.append(b if len(mine) else float(data.quality.mean()))
    return np.vstack(coef), np.asarray(icpt)


def _observed(data: Labelled, n_arms: int) -> np.ndarray:
    total = np.zeros((len(data.texts), n_arms))
    count = np.zeros((len(data.texts), n_arms))
    np.add.at(total, (data.text_of, data.arm_of), data.quality)
    np.add.at(count, (data.text_of, data.arm_of), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def neighbour_quality(sims: np.ndarray, observed: np.ndarray, k: int) -> np.ndarray:
    """(prompts, arms): each arm's mean observed quality over the k most similar labelled prompts
    that arm answered (the arm's overall mean where none of them did)."""
    k = min(k, sims.shape[1])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else None
    seen = observed[top] if top is not None else np.broadcast_to(observed, (len(sims), *observed.shape))
    answered = ~np.isnan(seen)
    total = np.where(answered, seen, 0.0).sum(axis=1)
    count = answered.sum(axis=1)
    overall = np.nanmean(np.where(np.isnan(observed).all(axis=0), 0.0, observed), axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), overall[None, :])


def _candidates(
    features_alphas: tuple[tuple[str, float], ...], ks: tuple[int, ...], blends: tuple[float, ...]
) -> list[tuple[str, float, int, float]]:
    """(features, alpha, k, blend): the ridge alone, the ridge blended with k neighbours, and the
    neighbours alone (once per k, whatever the ridge)."""
    out = []
    for f, a in features_alphas:
        for w in blends:
            if w <= 0:
                out.append((f, a, 0, 0.0))
            elif w < 1:
                out.extend((f, a, k, w) for k in ks)
    if any(w >= 1 for w in blends):
        f, a = features_alphas[0]
        out.extend((f, a, k, 1.0) for k in ks)
    return out


def candidate_name(feat: str, alpha: float, k: int, blend: float) -> str:
    if blend >= 1:
        return f"knn k={k}"
    ridge = f"{feat},alpha={alpha:g}"
    return ridge if blend <= 0 else f"{ridge}+knn k={k} w={blend:g}"


def fit_model(
    data: Labelled,
    vectors: np.ndarray,
    arms: list[str],
    encoder_id: str,
    *,
    candidates: tuple[tuple[str, float], ...] | None = None,
    knn_ks: tuple[int, ...] = KNN_KS,
    blends: tuple[float, ...] = BLENDS,
    seed: int = 0,
    folds: int = CV_FOLDS,
    repeats: int | None = None,
    count_at_fit: int | None = None,
) -> LearnedModel:
    """Choose the model by cross-validation over the prompts, then fit it on all of them.

    The candidates: a ridge regression per arm on each feature set and ridge strength
    (`candidates`), each blended with weight w in `blends` with the k-nearest-neighbour mean of
    the observed qualities (k in `knn_ks`). The objective: with prompts answered both by the
    cheapest arm and a dearer one, the APGR of the predicted gain against the observed one on the
    held-out prompts (how well the gain ranks prompts, which is what routing needs); without
    enough such prompts, the mean squared error of the predicted qualities."""
    n_arms = len(arms)
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape[0] != len(data.texts):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(data.texts)} prompts")
    n_texts = len(data.texts)
    unit = _normalise(vectors)
    grid = _candidates(candidates or tuple((f, a) for f in FEATURES for a in ALPHAS), knn_ks, blends)
    if repeats is None:
        repeats = CV_REPEATS if n_texts < CV_REPEAT_BELOW else 1
    observed = _observed(data, n_arms)
    paired = ~np.isnan(observed[:, 0]) & (~np.isnan(observed[:, 1:])).any(axis=1)
    # ranking by APGR needs a few paired prompts in each held-out fold; below that, squared error
    use_apgr = int(paired.sum()) >= MIN_PAIRED_PER_FOLD * folds
    objective = "cv_apgr" if use_apgr else "cv_mse"
    scores: dict[tuple[str, float, int, float], list[float]] = {}
    if len(grid) > 1 and n_texts >= 2 * folds:
        for val in [v for r in range(repeats) for v in _folds(n_texts, folds, seed + r)]:
            in_val = np.zeros(n_texts, dtype=bool)
            in_val[val] = True
            fit_rows = np.flatnonzero(~in_val[data.text_of])
            val_rows = np.flatnonzero(in_val[data.text_of])
            fit_texts = np.flatnonzero(~in_val)
            fit_observed = _observed_of(data, fit_rows, n_arms)[fit_texts]
            sims = unit[val] @ unit[fit_texts].T
            near = {k: neighbour_quality(sims, fit_observed, k) for k in {k for _, _, k, w in grid if w > 0}}
            ridge: dict[tuple[str, float], np.ndarray] = {}
            for feat in dict.fromkeys(f for f, _, _, w in grid if w < 1):
                family = _hashed_family(feat)
                idf = fit_idf([data.texts[i] for i in fit_texts], family) if family else None
                x = features(vectors, data.texts, feat, idf)
                for alpha in dict.fromkeys(a for f, a, _, w in grid if f == feat and w < 1):
                    coef, icpt = _fit_arms(x, data, fit_rows, n_arms, alpha)
                    ridge[(feat, alpha)] = np.asarray(x[val] @ coef.T) + icpt[None, :]
            for key in grid:
                feat, alpha, k, w = key
                pred = near[k] if w >= 1 else ridge[(feat, alpha)]
                if 0 < w < 1:
                    pred = (1 - w) * pred + w * near[k]
                value = _cv_value(pred, val, val_rows, data, observed, paired, use_apgr)
                if value == value:
                    scores.setdefault(key, []).append(value)
    means = {key: float(np.mean(v)) for key, v in scores.items()}
    # ties: the plainer model (no neighbours, then the stronger ridge)
    best = max(means, key=lambda c: (means[c], -c[3], c[1])) if means else grid[0]
    feat, alpha, knn_k, blend = best
    family = _hashed_family(feat)
    idf = fit_idf(data.texts, family) if family else None
    x = features(vectors, data.texts, feat, idf)
    coef, icpt = _fit_arms(x, data, np.arange(len(data)), n_arms, alpha)
    pred = np.asarray(x @ coef.T) + icpt[None, :]
    if blend > 0:
        # each labelled prompt's neighbours without itself, as a new prompt would see them
        near = np.empty_like(pred)
        for start in range(0, n_texts, 1024):
            sims = unit[start : start + 1024] @ unit.T
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
            near[start : start + 1024] = neighbour_quality(sims, observed, knn_k)
        pred = (1 - blend) * pred + blend * near
    first_row = np.zeros(n_texts, dtype=np.int64)
    first_row[data.text_of[::-1]] = data.row_ids[::-1]
    return LearnedModel(
        arms=list(arms),
        encoder_id=encoder_id,
        features=feat,
        alpha=alpha,
        coef=coef,
        intercept=icpt,
        idf=idf,
        gains=np.sort(gain_of(pred)),
        vectors=unit.astype(np.float32),
        observed=observed,
        row_ids=first_row,
        n_labels=len(data),
        fitted_at=time.time(),
        cv={candidate_name(*c): v for c, v in means.items()},
        objective=objective,
        knn_k=min(knn_k, n_texts) if blend > 0 else 0,
        blend=blend,
        count_at_fit=count_at_fit,
    )


def _observed_of(data: Labelled, rows: np.ndarray, n_arms: int) -> np.ndarray:
    sub = Labelled(data.texts, data.text_of[rows], data.arm_of[rows], data.quality[rows], data.row_ids[rows])
    return _observed(sub, n_arms)


def _cv_value(
    pred: np.ndarray,
    val: np.ndarray,
    val_rows: np.ndarray,
    data: Labelled,
    observed: np.ndarray,
    paired: np.ndarray,
    use_apgr: bool,
) -> float:
    """One held-out fold's score of a candidate's predictions `pred` (val prompts x arms)."""
    if use_apgr:
        mine = paired[val]
        obs = observed[val][mine]
        got = np.nanmax(obs[:, 1:], axis=1) - obs[:, 0]
        return apgr(gain_of(pred[mine]), got)
    at = np.searchsorted(val, data.text_of[val_rows])
    err = pred[at, data.arm_of[val_rows]] - data.quality[val_rows]
    return -float(np.mean(err**2)) if len(err) else float("nan")


# -- the step -----------------------------------------------------------------------------------


@dataclass
class FitReport:
    rows: int  # labelled rows used
    prompts: int
    per_arm: dict[str, int]
    features: str
    alpha: float
    knn_k: int
    blend: float
    objective: str
    cv: dict[str, float]
    threshold: float
    share_past_cheapest: float  # on the labelled prompts, at the step's strong_share
    path: str


class LearnedStep:
    def __init__(
        self,
        name: str,
        arms: list[str],
        embed: Embedder,
        encoder_id: str,
        path: Path,
        *,
        template: str,
        strong_share: float = 0.5,
        min_labels: int = 50,
        refit_every: int = 0,
        check_seconds: float = 60.0,
        neighbours: int = 3,
        timeout: float = 2.0,
    ) -> None:
        self.name = name
        self.arms = arms
        self.embed = embed
        self.encoder_id = encoder_id
        self.path = path
        self.template = template
        self.strong_share = strong_share
        self.min_labels = min_labels
        self.refit_every = refit_every
        self.check_seconds = check_seconds
        self.k = neighbours
        self.timeout = timeout
        # as the semantic step: concurrent decisions share one encoder call and one product
        self._batch: MicroBatcher[str, Any] = MicroBatcher(self._embed_and_predict, timeout=timeout)
        self.model: LearnedModel | None = None
        self.threshold = float("inf")
        self.why_not = "not fitted yet"
        self.source: Callable[[], list[dict[str, Any]]] | None = None  # the template's recorded rows
        self.counter: Callable[[], int] | None = None  # the template's labelled-row count
        self._fit_lock = asyncio.Lock()
        self.loaded = False
        self._seen: int | None = None  # the model file's mtime when last read or written
        self.count_at_fit: int | None = None  # the template's labelled rows when last fitted

    def use(self, model: LearnedModel) -> None:
        self.model = model
        self.threshold = model.threshold(self.strong_share)
        self.why_not = ""
        if model.count_at_fit is not None:  # fitted here or by another process: counted from there
            self.count_at_fit = model.count_at_fit

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _stamp(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def load(self) -> None:
        """Load the fitted model from its file, if there is one. A bad file is logged and the step
        keeps the model it had (none at start: it passes, saying why)."""
        self.loaded = True
        stamp = self._stamp()
        self._seen = stamp
        if stamp is None:
            if self.model is None:
                self.why_not = f"not fitted yet (rswitch route fit --step {self.name})"
            return
        try:
            model = LearnedModel.load(self.path, self.arms, self.encoder_id)
            family = _hashed_family(model.features)
            if family is not None:  # import scikit-learn's vectorizer now, not on a request
                _hashed_counts(["warm up"], family)
            self.use(model)
        except ArtifactError as exc:
            log.warning("learned step %s: %s", self.name, exc)
            if self.model is None:
                self.why_not = str(exc)

    def reload_if_changed(self) -> bool:
        """Load the file again when another process (`rswitch route fit`, a worker) rewrote it."""
        if self._stamp() == self._seen:
            return False
        self.load()
        return True

    async def warm(self) -> None:
        if not self.loaded:
            await asyncio.to_thread(self.load)

    async def _embed_all(self, texts: list[str]) -> np.ndarray:
        out: list[np.ndarray] = []
        for start in range(0, len(texts), 64):
            out.append(np.asarray(await self.embed(texts[start : start + 64]), dtype=np.float32))
        return np.vstack(out) if out else np.zeros((0, 0), dtype=np.float32)

    async def fit(
        self, rows: list[dict[str, Any]] | None = None, count_at_fit: int | None = None
    ) -> FitReport:
        """Fit on the template's labelled rows (from `source` unless given), save, and start using it.

        NotEnoughLabels when there are too few; the step keeps what it had."""
        async with self._fit_lock:
            if rows is None:
                if self.source is None:
                    raise RuntimeError(f"learned step {self.name} has no dataset to read")
                rows = await asyncio.to_thread(self.source)
            data = labelled_rows(rows, self.arms)
            check_enough(data, self.arms, self.min_labels)
            vectors = await self._embed_all(data.texts)
            model = await asyncio.to_thread(
                partial(fit_model, count_at_fit=count_at_fit), data, vectors, self.arms, self.encoder_id
            )
            await asyncio.to_thread(model.save, self.path)
            self._seen = self._stamp()
            self.use(model)
            gains = model.gains
            return FitReport(
                rows=len(data),
                prompts=len(data.texts),
                per_arm=dict(zip(self.arms, data.counts(len(self.arms)), strict=True)),
                features=model.features,
                alpha=model.alpha,
                knn_k=model.knn_k,
                blend=model.blend,
                objective=model.objective,
                cv=model.cv,
                threshold=self.threshold,
                share_past_cheapest=float(np.mean(gains > self.threshold)) if len(gains) else 0.0,
                path=str(self.path),
            )

    def _due(self, count: int) -> bool:
        base = self.count_at_fit
        if base is None and self.model is not None:
            base = self.model.n_labels
        return count >= self.min_labels and (base is None or count - base >= self.refit_every)

    async def maybe_refit(self) -> FitReport | None:
        """The background check: refit when `refit_every` labelled rows arrived since the last fit
        (or, not fitted yet, once there are min_labels).

        One process refits a model file at a time: every process of `serve --workers N` (and a
        replica on the same disk) checks, but only the one that takes the lock file beside the
        model refits; a process that finds it taken leaves the refit to its holder, and one that
        takes it after another's refit loads that file instead of fitting again (the file says at
        which labelled-row count it was fitted)."""
        if self.refit_every <= 0 or self.counter is None or self._fit_lock.locked():
            return None
        count = await asyncio.to_thread(self.counter)
        if not self._due(count):
            return None
        held = await asyncio.to_thread(_try_lock, self.lock_path)
        if held is None:  # another process is refitting: its file is loaded when it changes
            return None
        try:
            await asyncio.to_thread(self.reload_if_changed)
            if not self._due(count):
                return None
            try:
                report = await self.fit(count_at_fit=count)
            except NotEnoughLabels as exc:  # labelled rows, but not enough of these arms: wait for more
                self.count_at_fit = count
                if self.model is None:
                    self.why_not = f"not fitted yet: {exc}"
                return None
        finally:
            held.close()
        self.count_at_fit = count
        log.info("learned step %s refitted on %d labelled rows", self.name, report.rows)
        return report

    def explain(self, pred: np.ndarray, near: list[tuple[int, float]]) -> str:
        model = self.model
        assert model is not None
        scores = " ".join(f"{a}={q:.2f}" for a, q in zip(self.arms, pred, strict=True))
        shown = []
        for i, sim in near:
            seen = ",".join(
                f"{a}={q:.1f}" for a, q in zip(self.arms, model.observed[i], strict=True) if q == q
            )
            shown.append(f"#{model.row_ids[i]} {sim:.2f} ({seen})")
        return f"predicted {scores}; nearest " + " ".join(shown)

    async def _embed_and_predict(self, texts: list[str]) -> list[Any]:
        """(model, similarities, predicted qualities) of each text: a batch's in one encoder call and
        one product (the similarities serve the neighbour blend and the explanation)."""
        model = self.model  # one model for the whole batch, even if a refit swaps it meanwhile
        assert model is not None
        vectors = np.asarray(await self.embed(texts), dtype=np.float32).reshape(len(texts), -1)
        with one_blas_thread(vectors.size * len(model.vectors)):
            sims = model.similarities(vectors)
            pred = model.predict(vectors, texts, sims)
        return [(model, s, p) for s, p in zip(sims, pred, strict=True)]

    async def decide(self, query: Query) -> Decision | str | None:
        if not self.loaded:  # `rswitch route explain` does not warm the steps up
            await self.warm()
        model = self.model
        if model is None:
            return self.why_not
        if not query.text.strip():
            return None
        try:
            [(model, sims, pred)] = await self._batch.submit([query.text])  # within self.timeout
        except Exception as exc:  # the encoder is down or slow: pass, don't fail the request
            log.warning("learned step %s passes: %s: %s", self.name, type(exc).__name__, exc)
            return f"encoder failed: {type(exc).__name__}"
        gains = pred[1:] - pred[0]
        best_gain = float(gains.max())
        if best_gain > self.threshold:
            # the cheapest dearer arm that clears the threshold
            chosen = 1 + int(np.flatnonzero(gains > self.threshold)[0])
        else:
            chosen = 0
        rest = sorted((i for i in range(len(self.arms)) if i != chosen), key=lambda i: -pred[i])
        ranked = tuple(self.arms[i] for i in [chosen, *rest])
        why = self.explain(pred, model.neighbours(sims, self.k))
        return Decision(
            self.name,
            f"combination:{ranked[0]}",
            ranked,
            f"{why}; gain",
            best_gain,
            self.threshold,
        )


def _try_lock(path: Path) -> IO[bytes] | None:
    """An exclusive lock on `path` (held until the returned file is closed), or None if another
    open file holds it: another process, or another step of this one on the same model file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a+b")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def learned_path(state_dir: Path, template: str, name: str) -> Path:
    """Where a learned step's fitted model lives: beside the other routing state."""
    return state_dir / f"learned-{template}-{name}.npz"


class LearnedRefitter:
    """Connects learned steps to the recorded rows and refits them in the background: every
    step's `check_seconds`, each step whose `refit.every_labels` new labelled rows arrived."""

    def __init__(
        self, steps: list[LearnedStep], datasets: Any, event: Callable[[str, str], None] | None = None
    ) -> None:
        self.steps = steps
        self.event = event or (lambda kind, text: None)  # the operator console's event log
        self._soon: set[asyncio.Task[Any]] = set()
        for step in steps:
            step.source = partial(datasets.examples, step.template)
            step.counter = partial(_labelled_count, datasets, step.template)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.steps:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="learned-refit")

    async def _run(self) -> None:
        due = {id(s): time.monotonic() + s.check_seconds for s in self.steps}
        while True:
            now = time.monotonic()
            for step in self.steps:
                if due[id(step)] > now:
                    continue
                due[id(step)] = now + step.check_seconds
                try:
                    await asyncio.to_thread(step.reload_if_changed)
                    await step.maybe_refit()
                except Exception as exc:  # a failed refit keeps the model it had; next check retries
                    log.warning(
                        "learned step %s: background refit failed: %s: %s", step.name, type(exc).__name__, exc
                    )
            await asyncio.sleep(max(0.05, min(due.values()) - time.monotonic()))

    async def refit(self, template: str | None = None, name: str | None = None) -> list[tuple[str, Any]]:
        """Refit now (the admin action): [(step name, FitReport or the reason it did not fit)]."""
        out: list[tuple[str, Any]] = []
        for step in self.steps:
            if (template is None or step.template == template) and (name is None or step.name == name):
                try:
                    out.append((step.name, await step.fit()))
                except NotEnoughLabels as exc:
                    out.append((step.name, str(exc)))
        return out

    def refit_soon(self, template: str) -> list[str]:
        """Refit this template's learned steps in the background (the console's optimize key, the
        admin API's optimize): the names of the steps, each reported in the event log when done."""
        names = []
        for step in self.steps:
            if step.template == template:
                task = asyncio.get_running_loop().create_task(self._refit_one(step))
                self._soon.add(task)
                task.add_done_callback(self._soon.discard)
                names.append(step.name)
        return names

    async def _refit_one(self, step: LearnedStep) -> None:
        where = f"learned step '{step.name}' of '{step.template}'"
        try:
            report = await step.fit()
        except NotEnoughLabels as exc:
            self.event("routing", f"{where} not refitted: {exc}")
        except Exception as exc:
            log.warning("%s: refit failed: %s: %s", where, type(exc).__name__, exc)
            self.event("routing", f"{where} not refitted: {type(exc).__name__}: {exc}")
        else:
            self.event(
                "routing",
                f"{where} refitted on {report.rows} labelled rows ({report.features}, "
                f"{report.share_past_cheapest:.0%} past {step.arms[0]})",
            )

    async def stop(self) -> None:
        for soon in list(self._soon):
            soon.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _labelled_count(datasets: Any, template: str) -> int:
    return int(datasets.counts(template).get("labelled", 0))


def learned_steps(chains: list[Any]) -> list[LearnedStep]:
    """The learned steps of these router chains (None entries: no chain)."""
    return [
        step for chain in chains if chain is not None for step in chain.steps if isinstance(step, LearnedStep)
    ]
