"""Trained semantic routes (`method: trained`): a linear classifier over a prompt's encoder
embedding and its character n-grams, with a probability threshold for out-of-scope prompts.

`rswitch route fit --method trained` learns it (scikit-learn's LogisticRegression) from the
routes' utterances and labelled examples; out-of-scope examples train a "none" class of their
own. The probability threshold is fitted like the similarity thresholds (`fit.fit`), on
probabilities the classifier gave examples it was not trained on: a calibration set, or each
fold of a k-fold split. At request time deciding is one small matrix product: the artifact
holds arrays and JSON only (an .npz read with allow_pickle=False), never a pickle, so a
hostile file cannot run code; its shapes, routes and encoder are checked when it is loaded.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rswitch.config import ConfigError, ConfigProblem
from rswitch.routing.base import normalise
from rswitch.routing.fit import OUT_OF_SCOPE, fit

FORMAT = "rswitch-trained-routes"
VERSION = 1
NGRAMS = (2, 4)  # character n-grams within words (char_wb): robust to typos and word forms
MAX_NGRAMS = 20_000  # the most frequent n-grams kept: bounds the artifact (~80 kB a route)
C = 3.0  # inverse regularisation: the best balanced objective on CLINC150's validation split of 1, 3, 10, 30
FOLDS = 5
# n-grams of a prompt's first characters only: a 100 kB prompt would otherwise cost tens of
# milliseconds on the event loop; what it is about shows in its start (the embedding sees it all)
NGRAM_CHARS = 4096
ARRAYS = {"meta", "coef", "intercept", "vocab", "idf"}


class TrainedArtifactError(ValueError):
    """A trained-routes file that cannot be used: corrupt, or made for other routes or another encoder."""


_normalise = normalise  # the semantic step's: unit vectors, zero ones kept
_TINY = np.finfo(np.float32).tiny


def _analyzer() -> Callable[[str], list[str]]:
    """scikit-learn's own char_wb analyzer (lowercased), so request-time n-grams are the trained ones."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, lowercase=True).build_analyzer()


@dataclass
class TrainedRoutes:
    """A fitted classifier: route probabilities for a (vector, text) and the threshold to take one."""

    routes: list[str]  # route targets, in the step's order
    encoder_id: str
    threshold: float
    oos_class: bool  # a last class for out-of-scope prompts
    coef: np.ndarray  # (classes, dim + n-grams)
    intercept: np.ndarray  # (classes,)
    vocab: list[str]  # n-gram -> column (after the embedding's dim columns)
    idf: np.ndarray  # (n-grams,)
    info: dict[str, Any] = field(default_factory=dict)  # how it was trained: shown, not used

    def __post_init__(self) -> None:
        self.dim = self.coef.shape[1] - len(self.vocab)
        self._emb = np.ascontiguousarray(self.coef[:, : self.dim].T, dtype=np.float32)  # (dim, classes)
        self._ngram = np.ascontiguousarray(self.coef[:, self.dim :].T, dtype=np.float32)  # (n-grams, classes)
        self._intercept = np.asarray(self.intercept, dtype=np.float32)
        self._idf = np.asarray(self.idf, dtype=np.float32)
        self._index = {g: i for i, g in enumerate(self.vocab)}
        self._analyze = _analyzer()

    # -- deciding -----------------------------------------------------------------------------

    def _ngrams(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(columns, weights): the text's sublinear tf-idf, L2-normalised, as TfidfVectorizer does it."""
        counts = Counter(
            i for g in self._analyze(text[:NGRAM_CHARS]) if (i := self._index.get(g)) is not None
        )
        if not counts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        cols = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        w = (1.0 + np.log(tf)) * self._idf[cols]
        return cols, w / np.float32(np.linalg.norm(w))

    def probabilities(self, vector: Sequence[float] | np.ndarray, text: str) -> np.ndarray:
        """Each route's probability for one prompt (its embedding and its text)."""
        return self.probabilities_many(np.asarray(vector, dtype=np.float32).reshape(1, -1), [text])[0]

    def probabilities_many(self, vectors: np.ndarray, texts: Sequence[str], chunk: int = 64) -> np.ndarray:
        """(prompts, routes) probabilities: a micro-batch of requests, or an evaluation set. The
        embeddings are scored in one matrix product, and the n-grams in another (`chunk` prompts at
        a time, bounding the n-gram weights' matrix)."""
        q = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        if len(q) <= chunk:
            return self._probabilities(q, texts)
        return np.concatenate(
            [self._probabilities(q[i : i + chunk], texts[i : i + chunk]) for i in range(0, len(q), chunk)]
        )

    def _probabilities(self, q: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        logits = q @ self._emb
        logits /= np.maximum(np.sqrt(np.einsum("ij,ij->i", q, q)), _TINY)[:, None]  # unit vectors (0 stays 0)
        logits += self._intercept
        grams = [self._ngrams(t) for t in texts]
        if len(grams) == 1:
            cols, w = grams[0]
            if len(cols):
                logits[0] += w @ self._ngram[cols]
        elif any(len(c) for c, _ in grams):
            # the batch's n-grams side by side, each prompt's weights on its own row: one product
            cols = np.concatenate([c for c, _ in grams])
            weights = np.zeros((len(grams), len(cols)), dtype=np.float32)
            rows = np.repeat(np.arange(len(grams)), [len(c) for c, _ in grams])
            weights[rows, np.arange(len(cols))] = np.concatenate([w for _, w in grams])
            logits += weights @ self._ngram[cols]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p[:, : len(self.routes)]

    # -- the artifact -------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "encoder": self.encoder_id,
            "routes": self.routes,
            "threshold": self.threshold,
            "oos_class": self.oos_class,
            "dim": self.dim,
            "ngrams": {"analyzer": "char_wb", "range": list(NGRAMS), "lowercase": True, "sublinear_tf": True},
            "info": self.info,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(
                    fh,
                    meta=np.array(json.dumps(meta)),
                    coef=self.coef.astype(np.float32),
                    intercept=self.intercept.astype(np.float32),
                    vocab=np.array(self.vocab, dtype=str),
                    idf=self.idf.astype(np.float32),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls, path: Path, *, encoder_id: str | None = None, routes: Sequence[str] | None = None
    ) -> TrainedRoutes:
        """Read and check an artifact; with `encoder_id` / `routes`, it must have been trained for them."""

        def bad(why: str) -> TrainedArtifactError:
            return TrainedArtifactError(f"{path}: {why}")

        if not path.is_file():
            raise bad("no trained routes file; run `rswitch route fit --method trained` to create it")
        try:
            with np.load(path, allow_pickle=False) as z:
                if set(z.files) != ARRAYS:
                    raise bad(
                        f"not a trained-routes file (arrays {sorted(z.files)}, expected {sorted(ARRAYS)})"
                    )
                arrays = {k: z[k] for k in ARRAYS}
        except TrainedArtifactError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise bad(f"not a readable trained-routes file ({type(exc).__name__}: {exc})") from None
        try:
            meta = json.loads(str(arrays["meta"]))
        except ValueError:
            raise bad("its metadata is not JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise bad(f"not a trained-routes file (format is not {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise bad(
                f"version {meta.get('version')!r} is not {VERSION}; re-run `rswitch route fit --method trained`"
            )
        names = meta.get("routes")
        threshold = meta.get("threshold")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise bad("its routes are not a list of names")
        if not isinstance(meta.get("encoder"), str) or not isinstance(meta.get("oos_class"), bool):
            raise bad("its encoder or out-of-scope class is missing")
        if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise bad(f"its threshold {threshold!r} is not a probability")
        if meta.get("ngrams", {}).get("range") != list(NGRAMS):
            raise bad(f"its n-grams {meta.get('ngrams')!r} are not {list(NGRAMS)} character n-grams")
        coef, intercept, vocab, idf = arrays["coef"], arrays["intercept"], arrays["vocab"], arrays["idf"]
        classes = len(names) + int(meta["oos_class"])
        dim = meta.get("dim")
        if (
            not isinstance(dim, int)
            or dim < 1
            or vocab.ndim != 1
            or (len(vocab) and vocab.dtype.kind != "U")
            or coef.ndim != 2
            or coef.shape != (classes, dim + len(vocab))
            or intercept.shape != (classes,)
            or idf.shape != vocab.shape
            or not all(a.dtype.kind == "f" for a in (coef, intercept, idf))
        ):
            raise bad(
                f"its arrays do not fit together (coef {coef.shape}, intercept {intercept.shape}, "
                f"{len(vocab)} n-grams, {classes} classes, dim {dim!r})"
            )
        if not (np.isfinite(coef).all() and np.isfinite(intercept).all() and np.isfinite(idf).all()):
            raise bad("its weights are not all finite numbers")
        if len(set(vocab.tolist())) != len(vocab):
            raise bad("its n-gram vocabulary repeats entries")
        if encoder_id is not None and meta["encoder"] != encoder_id:
            raise bad(
                f"trained on encoder {meta['encoder']!r}, but the step's encoder is {encoder_id!r}; "
                "re-run `rswitch route fit --method trained` to retrain on this encoder"
            )
        if routes is not None and list(routes) != names:
            raise bad(
                f"trained for routes {', '.join(names)}, but the step has {', '.join(routes)}; "
                "re-run `rswitch route fit --method trained`"
            )
        return cls(
            names,
            meta["encoder"],
            float(threshold),
            meta["oos_class"],
            coef,
            intercept,
            vocab.tolist(),
            idf,
            meta.get("info") if isinstance(meta.get("info"), dict) else {},
        )


def load_for_step(step: Any, encoder_id: str, routes: list[str]) -> TrainedRoutes:
    """A `method: trained` step's classifier (config.SemanticStepConfig), checked against the step;
    a missing, corrupt or mismatched file is a config error naming it."""
    try:
        return TrainedRoutes.load(step.artifact_path(None), encoder_id=encoder_id, routes=routes)
    except TrainedArtifactError as exc:
        raise ConfigError([ConfigProblem(f"routing step '{step.name}' artifact", str(exc))]) from None


def artifact_problems(cfg: Any) -> list[ConfigProblem]:
    """`rswitch config check`: each `method: trained` step whose file is missing, corrupt or made
    for other routes (config.Config). Its encoder is checked when the gateway builds the step."""
    from rswitch.routing.chains import target_resolver

    resolve = target_resolver(cfg.routing.tiers)
    chains = {"routing.default": cfg.routing.default}
    chains.update({f"routing.templates.{t}": steps for t, steps in cfg.routing.templates.items()})
    problems = []
    for where, steps in chains.items():
        for i, s in enumerate(steps):
            if s.type != "semantic" or s.method != "trained":
                continue
            try:
                TrainedRoutes.load(s.artifact_path(None), routes=[resolve(r.route)[0] for r in s.routes])
            except TrainedArtifactError as exc:
                problems.append(ConfigProblem(f"{where}[{i}].artifact", str(exc)))
    return problems


# -- training ---------------------------------------------------------------------------------


@dataclass
class Labelled:
    """Texts, their embeddings and labels (route index, or OUT_OF_SCOPE)."""

    texts: list[str]
    vectors: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.vectors = _normalise(np.asarray(self.vectors, dtype=np.float32).reshape(len(self.texts), -1))
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def take(self, rows: np.ndarray) -> Labelled:
        return Labelled([self.texts[i] for i in rows], self.vectors[rows], self.labels[rows])

    def __add__(self, other: Labelled) -> Labelled:
        return Labelled(
            self.texts + other.texts,
            np.vstack([self.vectors, other.vectors]),
            np.concatenate([self.labels, other.labels]),
        )

    def __len__(self) -> int:
        return len(self.texts)


def _classifier(data: Labelled, routes: list[str], encoder_id: str, c: float) -> TrainedRoutes:
    """LogisticRegression on [embedding, char n-gram tf-idf]; threshold left at 0."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    oos_class = bool((data.labels == OUT_OF_SCOPE).any())
    y = np.where(data.labels == OUT_OF_SCOPE, len(routes), data.labels)
    if len(np.unique(y)) < 2:
        raise ValueError(
            "a trained step needs two classes to tell apart: two routes with utterances or "
            "examples, or out-of-scope examples"
        )
    vec = TfidfVectorizer(
        analyzer="char_wb",
        ngram_range=NGRAMS,
        lowercase=True,
        sublinear_tf=True,
        max_features=MAX_NGRAMS,
        dtype=np.float32,
    )
    grams = vec.fit_transform(data.texts)
    x = sp.hstack([sp.csr_matrix(data.vectors), grams]).tocsr()
    model = LogisticRegression(C=c, max_iter=1000).fit(x, y)
    classes = len(routes) + int(oos_class)
    # classes with no training rows never win: weights 0, a very low intercept
    coef = np.zeros((classes, x.shape[1]), dtype=np.float32)
    intercept = np.full(classes, -50.0, dtype=np.float32)
    if len(model.classes_) == 2:  # binary: one weight row, sigmoid = softmax over (0, z)
        coef[model.classes_[1]] = model.coef_[0]
        intercept[model.classes_[1]] = model.intercept_[0]
        intercept[model.classes_[0]] = 0.0
    else:
        coef[model.classes_] = model.coef_
        intercept[model.classes_] = model.intercept_
    vocab = [""] * len(vec.vocabulary_)
    for gram, col in vec.vocabulary_.items():
        vocab[col] = gram
    return TrainedRoutes(
        list(routes), encoder_id, 0.0, oos_class, coef, intercept, vocab, vec.idf_.astype(np.float32)
    )


def train(
    base: Labelled,
    examples: Labelled,
    routes: list[str],
    encoder_id: str,
    *,
    calibration: Labelled | None = None,
    objective: str = "balanced",
    folds: int = FOLDS,
    c: float = C,
    seed: int = 0,
) -> TrainedRoutes:
    """Train on `base` (the routes' utterances) + `examples`, and fit the probability threshold.

    The threshold is fitted (fit.fit, `objective`) on probabilities for examples the classifier
    did not see: `calibration` if given, else each of `folds` folds of `examples` in turn
    (shuffled with `seed`; the utterances always train). The classifier returned is trained on
    base + examples."""
    if calibration is not None:
        model = _classifier(base + examples, routes, encoder_id, c)
        held, probs = calibration, model.probabilities_many(calibration.vectors, calibration.texts)
    else:
        k = min(folds, len(examples))
        if k < 2:
            raise ValueError("fitting a threshold needs at least two examples (or a calibration set)")
        order = np.random.default_rng(seed).permutation(len(examples))
        probs = np.zeros((len(examples), len(routes)), dtype=np.float32)
        for part in np.array_split(order, k):
            rest = np.setdiff1d(order, part)
            fold_model = _classifier(base + examples.take(rest), routes, encoder_id, c)
            probs[part] = fold_model.probabilities_many(
                examples.vectors[part], [examples.texts[i] for i in part]
            )
        held = examples
        model = _classifier(base + examples, routes, encoder_id, c)
    model.threshold = float(np.clip(fit(probs, held.labels, objective=objective)[0], 0.0, 1.0))
    model.info = {
        "utterances": len(base),
        "examples": len(examples),
        "out_of_scope_examples": int((examples.labels == OUT_OF_SCOPE).sum()),
        "threshold_on": "calibration set" if calibration is not None else f"{min(folds, len(examples))}-fold",
        "objective": objective,
        "C": c,
    }
    return model


def split_held_out(labels: np.ndarray, share: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): `share` of each label's rows held out (at least one of a label
    with two or more rows), shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    train_rows, held_rows = [], []
    for lab in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == lab))
        n = math.floor(len(rows) * share + 0.5) if len(rows) > 1 else 0
        n = max(n, 1) if len(rows) > 1 else 0
        held_rows.extend(rows[:n])
        train_rows.extend(rows[n:])
    return np.sort(np.asarray(train_rows, dtype=np.int64)), np.sort(np.asarray(held_rows, dtype=np.int64))
