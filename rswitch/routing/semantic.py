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
from typing import Any

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
_TINY = np.finfo(np.float32).tiny
# Up to this many queries, B products of one query (gemv) cost less than one product of B (gemm, which
# packs the utterance matrix each call): 6 us against 18 for 3 queries x 200 utterances x 256 dimensions.
GEMV_ROWS = 6


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
        # the utterances as columns, route by route; see _lay_out
        self._columns = np.zeros((0, 0), dtype=np.float32)
        self._bias: np.ndarray | None = None  # -inf for padding columns
        self._table: np.ndarray | None = None  # route -> its columns, when not laid out in place
        self._width = 0  # columns a route has
        self._k = np.zeros(0, dtype=np.float32)  # rows aggregated per route: min(top_k, utterances)
        self._short = False  # some route has fewer utterances than it aggregates (padding in its top-k)
        self._lock = asyncio.Lock()
        # concurrent decisions share one encoder call and one score matmul, bounded by one timer
        # (rswitch/providers/batching.py)
        self._batch: MicroBatcher[str, Any] = MicroBatcher(self._embed_and_score, timeout=timeout)

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
            self._lay_out(_normalise(np.asarray(rows, dtype=np.float32)), owner)

    def _lay_out(self, matrix: np.ndarray, owner: list[int]) -> None:
        """Lay the utterance vectors out as columns so one product scores a batch of queries against
        all of them and each route's similarities are a slice of it: route i owns columns
        i*width .. i*width+width-1 (padded with zero columns scored -inf), so the scores reshape into
        (queries, routes, width) without a copy. When the routes' sizes differ so much that padding
        would more than double the product, the columns stay in utterance order and a table gathers
        each route's (one -inf column pads it)."""
        counts = np.bincount(np.asarray(owner), minlength=len(self.routes))
        n, width = len(matrix), int(counts.max())
        slots = np.zeros(n, dtype=np.int64)  # each utterance's place among its route's
        seen = np.zeros(len(self.routes), dtype=np.int64)
        for row, i in enumerate(owner):
            slots[row] = seen[i]
            seen[i] += 1
        owners = np.asarray(owner, dtype=np.int64)
        if len(self.routes) * width <= 2 * n:
            cols = len(self.routes) * width
            where = owners * width + slots
            table = None
        else:
            cols = n + 1
            where = np.arange(n)
            table = np.full((len(self.routes), width), n, dtype=np.int64)
            table[owners, slots] = np.arange(n)
        columns = np.zeros((matrix.shape[1], cols), dtype=np.float32)
        columns[:, where] = matrix.T
        bias = np.full(cols, -np.inf, dtype=np.float32)
        bias[where] = 0.0
        self._columns = np.ascontiguousarray(columns)
        self._bias = bias if cols > n else None
        self._table, self._width = table, width
        self._k = np.minimum(counts, self.top_k).astype(np.float32)
        self._short = bool((counts < min(self.top_k, width)).any())
        self._matrix = matrix

    # -- deciding -----------------------------------------------------------------------------

    def score_many(self, vectors: np.ndarray, chunk: int = 256) -> np.ndarray:
        """(queries, routes): each route's top-k similarity, aggregated, for each query vector."""
        assert self._matrix is not None
        q = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
        if len(q) <= chunk:
            return self._score(q)
        return np.concatenate([self._score(q[i : i + chunk]) for i in range(0, len(q), chunk)])

    def _score(self, q: np.ndarray) -> np.ndarray:
        # a handful of numpy calls a batch: at the gateway's batch sizes each call's overhead, not the
        # arithmetic, is what the step costs
        if len(q) <= GEMV_ROWS:  # one matrix-vector product per query: cheaper than one small gemm
            sims = np.matmul(q[:, None, :], self._columns)[:, 0]
        else:
            sims = q @ self._columns
        sims /= np.maximum(np.sqrt(np.einsum("ij,ij->i", q, q)), _TINY)[:, None]  # cosine (0 for a zero q)
        if self._bias is not None:
            sims += self._bias
        if self._table is None:
            per_route = sims.reshape(len(q), len(self.routes), self._width)
        else:
            per_route = sims[:, self._table]
        if self.aggregate == "max":
            return per_route.max(axis=2)
        width, k = self._width, self.top_k
        top = np.partition(per_route, width - k, axis=2)[:, :, width - k :] if width > k else per_route
        if self._short:  # a route with fewer utterances than k: its padding is not a similarity
            top = np.where(top == -np.inf, 0.0, top)
        return top.sum(axis=2) / self._k

    async def _embed_and_score(self, texts: list[str]) -> Any:
        """Each text's route probabilities (trained), or its nearest route and that route's score."""
        vectors = np.asarray(await self.embed(texts), dtype=np.float32)
        if self.trained is not None:  # each route's probability; products of microseconds: one thread
            with one_blas_thread(vectors.size * len(self.trained.coef)):
                return self.trained.probabilities_many(vectors, texts)
        assert self._matrix is not None
        with one_blas_thread(self._columns.size * (1 if len(vectors) <= GEMV_ROWS else len(vectors))):
            scores = self.score_many(vectors)
        best = scores.argmax(axis=1)  # the batch's argmax in one call, not one per request
        return list(zip(best.tolist(), scores[np.arange(len(best)), best].tolist(), strict=True))

    async def decide(self, query: Query) -> Decision | str | None:
        if not query.text.strip():
            return None
        try:
            if self._matrix is None and self.trained is None:
                # the first request embeds the utterances too: both within one timeout, not one each
                async with asyncio.timeout(self.timeout):
                    await self.warm()
                    [row] = await self._batch.submit([query.text])
            else:
                [row] = await self._batch.submit([query.text])  # the batch's own timer bounds it
        except Exception as exc:  # the encoder is down or slow: pass, don't fail the request
            log.warning("semantic step %s passes: %s: %s", self.name, type(exc).__name__, exc)
            return None
        if self.trained is not None:
            return self._decide_trained(self.trained.threshold, row)
        best, score = row
        route = self.routes[best]
        if score < route.threshold:
            return f"nearest {route.target} {score:.3f} < {route.threshold:.3f}"
        return Decision(
            self.name, route.target, route.combinations, f"nearest {route.target}", score, route.threshold
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
