"""The semantic step: embed the prompt, compare it with each route's example utterances by
cosine similarity (top-k, aggregated), and pick the best route above its threshold
(`method: similarity`); or, with `method: trained`, ask the classifier `rswitch route fit
--method trained` wrote (rswitch.routing.trained) for each route's probability, and take the
most probable route if it reaches the fitted probability threshold.

Utterance embeddings are computed once per encoder and kept in a cache file keyed by the
encoder's id, so they are recomputed only when the encoder changes. A failing or slow
encoder makes the step pass (the next step or the balancer decides), never fail the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rswitch.providers.batching import MicroBatcher
from rswitch.providers.blas import one_blas_thread
from rswitch.routing.base import Decision, Query, normalise
from rswitch.routing.trained import TrainedRoutes

log = logging.getLogger("rswitch.routing")
Embedder = Callable[[list[str]], Awaitable[list[list[float]]]]


@dataclass
class SemanticRoute:
    target: str
    combinations: tuple[str, ...]
    threshold: float
    utterances: list[str]


_normalise = normalise


class SemanticStep:
    def __init__(
        self,
        name: str,
        routes: list[SemanticRoute],
        embed: Embedder,
        encoder_id: str,
        *,
        top_k: int = 3,
        aggregate: str = "mean",
        timeout: float = 2.0,
        cache_dir: Path | None = None,
        trained: TrainedRoutes | None = None,
    ) -> None:
        self.name = name
        self.trained = trained  # method: trained; None = similarity
        self.routes = routes
        self.embed = embed
        self.encoder_id = encoder_id
        self.top_k = top_k
        self.aggregate = aggregate
        self.timeout = timeout
        self.cache_dir = cache_dir
        self._matrix: np.ndarray | None = None  # all utterances, normalised, one row each
        self._table = np.zeros((0, 0), dtype=np.int64)  # route -> its rows (padded)
        self._k = np.zeros(0, dtype=np.int64)  # rows aggregated per route: min(top_k, utterances)
        self._lock = asyncio.Lock()
        # concurrent decisions share one encoder call and one score matmul, bounded by one timer
        # (rswitch/providers/batching.py)
        self._batch: MicroBatcher[str, np.ndarray] = MicroBatcher(self._embed_and_score, timeout=timeout)

    # -- utterance vectors, cached per encoder ------------------------------------------------

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(self.encoder_id.encode()).hexdigest()[:16]
        return self.cache_dir / f"utterances-{key}.json"

    def _load_cache(self) -> dict[str, list[float]]:
        path = self._cache_path()
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            return data["vectors"] if data.get("encoder") == self.encoder_id else {}
        except (ValueError, KeyError, OSError):
            return {}

    def _save_cache(self, vectors: dict[str, list[float]]) -> None:
        path = self._cache_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump({"encoder": self.encoder_id, "vectors": vectors}, fh)
        os.replace(tmp, path)

    async def warm(self) -> None:
        """Embed every utterance (those not in the cache) once. A trained step needs none."""
        if self.trained is not None:
            return
        async with self._lock:
            if self._matrix is not None:
                return
            cached = self._load_cache()
            texts = sorted({u for r in self.routes for u in r.utterances})
            missing = [t for t in texts if t not in cached]
            if missing:
                for start in range(0, len(missing), 64):
                    batch = missing[start : start + 64]
                    vectors = await self.embed(batch)
                    cached.update(zip(batch, np.asarray(vectors, dtype=float).tolist(), strict=True))
                self._save_cache({t: cached[t] for t in texts})
            rows, owner = [], []
            for i, r in enumerate(self.routes):
                for u in r.utterances:
                    rows.append(cached[u])
                    owner.append(i)
            self._matrix = _normalise(np.asarray(rows, dtype=np.float32))
            # route i's rows as row i of a padded index table, so one sort ranks every route
            counts = np.bincount(np.asarray(owner), minlength=len(self.routes))
            table = np.full((len(self.routes), int(counts.max())), len(rows), dtype=np.int64)
            fill = np.zeros(len(self.routes), dtype=np.int64)
            for row, i in enumerate(owner):
                table[i, fill[i]] = row
                fill[i] += 1
            self._table = table
            self._k = np.minimum(counts, self.top_k)

    # -- deciding -----------------------------------------------------------------------------

    def score_many(self, vectors: np.ndarray, chunk: int = 256) -> np.ndarray:
        """(queries, routes): each route's top-k similarity, aggregated, for each query vector."""
        assert self._matrix is not None
        q = _normalise(np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1))
        out = np.empty((len(q), len(self.routes)), dtype=np.float32)
        pad = np.full((1, 1), -np.inf, dtype=np.float32)
        for i in range(0, len(q), chunk):
            part = q[i : i + chunk]
            sims = np.hstack([part @ self._matrix.T, np.repeat(pad, len(part), axis=0)])  # pad -> -inf
            ranked = -np.sort(-sims[:, self._table], axis=2)[:, :, : self.top_k]  # best first per route
            if self.aggregate == "max":
                out[i : i + chunk] = ranked[:, :, 0]
            else:
                keep = np.arange(ranked.shape[2]) < self._k[:, None]
                out[i : i + chunk] = np.where(keep, ranked, 0.0).sum(axis=2) / self._k
        return out

    async def _embed_and_score(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(await self.embed(texts), dtype=np.float32)
        if self.trained is not None:  # each route's probability
            with one_blas_thread():  # products of microseconds: spreading them over cores costs more
                return self.trained.probabilities_many(vectors, texts)
        assert self._matrix is not None
        with one_blas_thread(vectors.size * len(self._matrix)):
            return self.score_many(vectors)

    async def decide(self, query: Query) -> Decision | str | None:
        if not query.text.strip():
            return None
        try:
            if self._matrix is None and self.trained is None:
                async with asyncio.timeout(self.timeout):
                    await self.warm()
            [row] = await self._batch.submit([query.text])  # within self.timeout too
        except Exception as exc:  # the encoder is down or slow: pass, don't fail the request
            log.warning("semantic step %s passes: %s: %s", self.name, type(exc).__name__, exc)
            return None
        if self.trained is not None:
            return self._decide_trained(self.trained.threshold, row)
        scores = row.tolist()
        best = max(range(len(scores)), key=scores.__getitem__)
        route = self.routes[best]
        if scores[best] < route.threshold:
            return f"nearest {route.target} {scores[best]:.3f} < {route.threshold:.3f}"
        return Decision(
            self.name,
            route.target,
            route.combinations,
            f"nearest {route.target}",
            scores[best],
            route.threshold,
        )

    def _decide_trained(self, threshold: float, probs: np.ndarray) -> Decision | str:
        best = int(probs.argmax())
        route = self.routes[best]
        runner = ""
        if len(probs) > 1:
            second = int(np.argpartition(probs, -2)[-2])
            runner = f", runner-up {self.routes[second].target} p={probs[second]:.3f}"
        if probs[best] < threshold:
            return f"trained {route.target} p={probs[best]:.3f} < {threshold:.3f}{runner}"
        return Decision(
            self.name,
            route.target,
            route.combinations,
            f"trained ({runner[2:]})" if runner else "trained",
            float(probs[best]),
            threshold,
        )
