"""The bandit step: learn which combination serves best from the outcomes of the calls it
routed, and keep learning as they change.

Each arm is a combination id. After a call the gateway reports its outcome to `observe()`,
which turns it into a reward in [0, 1] (see `reward`) and updates the policy. A policy trades
exploitation (the best arm so far) against exploration (the others, in case they are better now):

- EpsilonGreedy: the best mean, except a uniformly random arm with probability epsilon.
- UCB1: the best mean plus a bonus that is large for arms pulled rarely.
- ThompsonSampling: one draw from each arm's Beta posterior; the highest draw wins.

Plain statistics remember everything: an arm that was good for 1000 calls needs about as many
bad ones before it loses its lead. SlidingWindow (only the last W pulls count) and Discounted
(all statistics decay by gamma per pull) forget, so a degraded arm loses traffic fast, and an
arm left alone loses its statistics, so it is probed again later.

LinUCB is contextual: a linear reward model per arm over a feature vector of the query, so
different queries can go to different arms.

The statistics are saved as JSON, so what was learned survives restarts. With state on Redis,
replicas add up what each learned (rswitch.state.learning).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rswitch.routing.base import Decision, Query

log = logging.getLogger("rswitch.routing")

# -- reward -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditWeights:
    """How much each part of an outcome counts; only the ratios between weights matter."""

    success: float = 0.4
    quality: float = 0.4
    cost: float = 0.1
    latency: float = 0.1
    cost_scale: float = 0.01  # USD per call at which the cost credit reaches 0
    latency_scale_ms: float = 10_000.0  # latency at which the latency credit reaches 0

    def __post_init__(self) -> None:
        parts = (self.success, self.quality, self.cost, self.latency)
        if min(parts) < 0 or sum(parts) <= 0:
            raise ValueError("bandit weights must be >= 0 and not all 0")
        if self.cost_scale <= 0 or self.latency_scale_ms <= 0:
            raise ValueError("cost_scale and latency_scale_ms must be > 0")


def reward(
    success: bool,
    quality: float | None,
    cost: float,
    latency_ms: float,
    weights: BanditWeights = BanditWeights(),
) -> float:
    """A call's reward in [0, 1].

    A failed call earns 0: it earns nothing for being cheap or fast, otherwise an arm that
    fails instantly would look attractive. A successful call earns the weighted mean

        (ws + wq * q + wc * (1 - min(cost / cost_scale, 1)) + wl * (1 - min(latency_ms / latency_scale_ms, 1)))
        / (ws + wq + wc + wl)

    where q is the quality (from feedback or an evaluator) clamped to [0, 1], or 1 when there is
    no quality signal, since success is then all we know.
    """
    if not success:
        return 0.0
    w = weights
    q = 1.0 if quality is None else min(max(quality, 0.0), 1.0)
    cheap = 1.0 - min(max(cost, 0.0) / w.cost_scale, 1.0)
    fast = 1.0 - min(max(latency_ms, 0.0) / w.latency_scale_ms, 1.0)
    total = w.success + w.quality + w.cost + w.latency
    return (w.success + w.quality * q + w.cost * cheap + w.latency * fast) / total


# -- policies on per-arm statistics -------------------------------------------------------------


@dataclass
class ArmStats:
    n: float = 0.0  # pulls; fractional once discounted
    total: float = 0.0  # sum of rewards

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n > 0 else 0.0


def _count(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:.1f}"


class BanditPolicy(Protocol):
    name: str
    contextual: bool

    def select(self, arms: list[str], rng: random.Random) -> str: ...
    def update(self, arm: str, reward: float) -> None: ...
    def revise(self, arm: str, old: float, new: float, age: int) -> None: ...
    def describe(self, arm: str) -> str: ...
    def estimate(self, arm: str) -> float | None: ...
    def state(self) -> dict[str, Any]: ...
    def load(self, data: dict[str, Any], arms: Collection[str] | None = None) -> None: ...


class Policy:
    """Per-arm (pulls, total reward); subclasses say how to choose from them.

    The three policies keep the same statistics, so their saved states are interchangeable:
    switching, say, from UCB1 to Thompson sampling keeps what was learned.
    """

    name = "policy"
    contextual = False

    def __init__(self) -> None:
        self.stats: dict[str, ArmStats] = {}

    def get(self, arm: str) -> ArmStats:
        return self.stats.get(arm) or ArmStats()

    def select(self, arms: list[str], rng: random.Random) -> str:
        # an arm without data has no estimate to compare: try it before anything else
        untried = next((a for a in arms if self.get(a).n <= 0), None)
        return untried if untried is not None else self.choose(arms, rng)

    def choose(self, arms: list[str], rng: random.Random) -> str:
        raise NotImplementedError

    def update(self, arm: str, reward: float) -> None:
        s = self.stats.setdefault(arm, ArmStats())
        s.n += 1
        s.total += reward

    def revise(self, arm: str, old: float, new: float, age: int, weight: float = 1.0) -> None:
        """A reward given `age` updates ago turns out to be `new`, not `old` (feedback came)."""
        s = self.stats.get(arm)
        if s is not None:
            s.total = min(max(s.total + (new - old) * weight, 0.0), s.n)

    def describe(self, arm: str) -> str:
        s = self.get(arm)
        return f"mean {s.mean:.2f}, n={_count(s.n)}" if s.n > 0 else "untried"

    def estimate(self, arm: str) -> float | None:
        """The arm's mean reward so far (None untried): how the arms after the pick are ranked."""
        s = self.get(arm)
        return s.mean if s.n > 0 else None

    def state(self) -> dict[str, Any]:
        return {"kind": "counts", "arms": {a: {"n": s.n, "total": s.total} for a, s in self.stats.items()}}

    def load(self, data: dict[str, Any], arms: Collection[str] | None = None) -> None:
        """Replace the statistics with saved ones (only `arms`, if given); raises ValueError,
        KeyError or TypeError on a state it cannot use, leaving the policy as it was."""
        if data.get("kind") != "counts":
            raise ValueError(f"not a counts state: {data.get('kind')!r}")
        stats = {}
        for arm, s in data["arms"].items():
            n, total = float(s["n"]), float(s["total"])
            if not (n >= 0 and -1e-9 <= total <= n + 1e-9):
                raise ValueError(f"arm {arm!r}: impossible statistics n={n} total={total}")
            if arms is None or arm in arms:
                stats[arm] = ArmStats(n, total)
        self.stats = stats


class EpsilonGreedy(Policy):
    """The seed article's policy: exploit the best mean, explore at random with probability epsilon."""

    name = "epsilon-greedy"

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0 <= epsilon <= 1:
            raise ValueError("epsilon must be in [0, 1]")
        self.epsilon = epsilon

    def choose(self, arms: list[str], rng: random.Random) -> str:
        if rng.random() < self.epsilon:
            return rng.choice(arms)
        return max(arms, key=lambda a: self.get(a).mean)


class UCB1(Policy):
    """Mean + c * sqrt(2 ln N / n): optimism about arms with little data. c=1 is the textbook
    UCB1; a smaller c explores less, which suits rewards that differ by a few hundredths."""

    name = "ucb1"

    def __init__(self, c: float = 1.0) -> None:
        super().__init__()
        self.c = c

    def choose(self, arms: list[str], rng: random.Random) -> str:
        # N is the sum over the arms' statistics, so under a window or a discount it is the
        # remembered pulls, and an arm the others have outgrown regains a large bonus
        pulls = sum(self.get(a).n for a in arms)
        log_n = math.log(max(pulls, 1.0))

        def bound(a: str) -> float:
            s = self.get(a)
            return s.mean + self.c * math.sqrt(2 * log_n / s.n)

        return max(arms, key=bound)


class ThompsonSampling(Policy):
    """Beta(1 + total, 1 + n - total) per arm: rewards in [0, 1] count as fractional
    successes and failures. Pick the arm whose posterior draw is highest."""

    name = "thompson"

    def choose(self, arms: list[str], rng: random.Random) -> str:
        def draw(a: str) -> float:
            s = self.get(a)
            return rng.betavariate(1 + s.total, 1 + max(s.n - s.total, 0.0))

        return max(arms, key=draw)


# -- forgetting: drift-aware wrappers -----------------------------------------------------------


class SlidingWindow:
    """The wrapped policy sees only the statistics of the last `window` pulls (all arms).

    The window is over pulls of any arm, not per arm: with per-arm windows an arm that lost
    traffic would keep its last rewards forever and never be probed again. Here it drops out of
    the window, counts as untried, and is tried once more, at most every `window` pulls.
    """

    contextual = False

    def __init__(self, policy: Policy, window: int = 200) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.policy = policy
        self.window = window
        self.name = f"{policy.name}/window={window}"
        self.pulls: deque[tuple[str, float]] = deque(maxlen=window)
        self.updates = 0  # pulls seen here: which of the window's pulls a replica has not shared yet
        # set when the window is shared: takes a revision of pull number `updates - age` that has
        # left this replica (True), which then is made where the window is kept
        self.revise_shared: Callable[[str, float, float, int], bool] | None = None

    def select(self, arms: list[str], rng: random.Random) -> str:
        return self.policy.select(arms, rng)

    def update(self, arm: str, reward: float) -> None:
        self.pulls.append((arm, reward))
        self.updates += 1
        self._recount()

    def revise(self, arm: str, old: float, new: float, age: int) -> None:
        if self.revise_shared is not None and self.revise_shared(arm, old, new, self.updates - age):
            return
        if age < len(self.pulls) and self.pulls[-1 - age] == (arm, old):  # still in the window
            self.pulls[-1 - age] = (arm, new)
            self._recount()

    def _recount(self) -> None:
        # recomputed rather than adjusted on eviction: no float drift, and a window is small
        stats: dict[str, ArmStats] = {}
        for arm, r in self.pulls:
            s = stats.setdefault(arm, ArmStats())
            s.n += 1
            s.total += r
        self.policy.stats = stats

    def describe(self, arm: str) -> str:
        return self.policy.describe(arm)

    def estimate(self, arm: str) -> float | None:
        return self.policy.estimate(arm)

    def state(self) -> dict[str, Any]:
        return {"kind": "sliding-window", "pulls": [[a, r] for a, r in self.pulls]}

    def load(self, data: dict[str, Any], arms: Collection[str] | None = None) -> None:
        if data.get("kind") != "sliding-window":
            raise ValueError(f"not a sliding-window state: {data.get('kind')!r}")
        pulls = [(str(a), float(r)) for a, r in data["pulls"]]
        if any(not 0 <= r <= 1 for _, r in pulls):
            raise ValueError("reward outside [0, 1]")
        # pulls of removed arms drop out; a smaller window keeps the most recent pulls
        self.pulls = deque((p for p in pulls if arms is None or p[0] in arms), maxlen=self.window)
        self._recount()


class Discounted:
    """Before each update every arm's statistics decay by gamma, so a pull t pulls ago weighs
    gamma**t (memory about 1 / (1 - gamma) pulls). An arm left alone loses weight: UCB's bonus
    grows and Thompson's posterior widens back towards the prior until it is probed again."""

    contextual = False

    def __init__(self, policy: Policy, gamma: float = 0.99) -> None:
        if not 0 < gamma <= 1:
            raise ValueError("gamma must be in (0, 1]")
        self.policy = policy
        self.gamma = gamma
        self.name = f"{policy.name}/discount={gamma}"
        self.updates = 0  # pulls seen here: how far a replica's sums decayed since it last shared them

    def select(self, arms: list[str], rng: random.Random) -> str:
        return self.policy.select(arms, rng)

    def update(self, arm: str, reward: float) -> None:
        for s in self.policy.stats.values():
            s.n *= self.gamma
            s.total *= self.gamma
        self.policy.update(arm, reward)
        self.updates += 1

    def revise(self, arm: str, old: float, new: float, age: int) -> None:
        self.policy.revise(arm, old, new, age, weight=self.gamma**age)  # it has decayed since

    def describe(self, arm: str) -> str:
        return self.policy.describe(arm)

    def estimate(self, arm: str) -> float | None:
        return self.policy.estimate(arm)

    def state(self) -> dict[str, Any]:
        return {"kind": "discounted", "inner": self.policy.state()}

    def load(self, data: dict[str, Any], arms: Collection[str] | None = None) -> None:
        if data.get("kind") != "discounted":
            raise ValueError(f"not a discounted state: {data.get('kind')!r}")
        self.policy.load(data["inner"], arms)


# -- contextual ---------------------------------------------------------------------------------


class LinUCB:
    """Per arm a ridge regression of reward on the context x (A = I + sum x x^T, b = sum r x);
    pick the arm maximising theta.x + alpha * sqrt(x^T A^-1 x), theta = A^-1 b.

    A^-1 is kept up to date by Sherman-Morrison (O(d^2) a pull, no inversion per request), so
    contexts of a few hundred dimensions (prompt embeddings) cost well under a millisecond.
    `dim=None` takes the dimension from the first context."""

    name = "linucb"
    contextual = True

    def __init__(self, alpha: float = 1.0, dim: int | None = 5) -> None:
        self.alpha = alpha
        self.dim = dim
        self.A: dict[str, np.ndarray] = {}
        self.A_inv: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray] = {}
        self.n: dict[str, int] = {}

    def _vector(self, context: Any) -> np.ndarray:
        x = np.asarray(context, dtype=float).reshape(-1)
        if self.dim is None:
            self.dim = x.size
        if x.shape != (self.dim,):
            raise ValueError(f"context has {x.size} features, expected {self.dim}")
        return x

    def _estimate(self, arm: str, x: np.ndarray) -> tuple[float, float]:
        """(predicted reward, confidence width) of `arm` at x."""
        a_inv = self.A_inv.get(arm)
        if a_inv is None:  # untouched arm: A = I, b = 0
            return 0.0, float(np.sqrt(x @ x))
        ax = a_inv @ x
        return float(self.b[arm] @ ax), float(np.sqrt(max(x @ ax, 0.0)))

    def select(self, arms: list[str], rng: random.Random, context: Any) -> str:
        x = self._vector(context)
        untried = next((a for a in arms if self.n.get(a, 0) == 0), None)
        if untried is not None:
            return untried

        def bound(a: str) -> float:
            mean, width = self._estimate(a, x)
            return mean + self.alpha * width

        return max(arms, key=bound)

    def update(self, arm: str, reward: float, context: Any) -> None:
        x = self._vector(context)
        d = self.dim or x.size
        a_inv = self.A_inv.get(arm, np.eye(d))
        ax = a_inv @ x
        self.A_inv[arm] = a_inv - np.outer(ax, ax) / (1.0 + x @ ax)
        self.A[arm] = self.A.get(arm, np.eye(d)) + np.outer(x, x)
        self.b[arm] = self.b.get(arm, np.zeros(d)) + reward * x
        self.n[arm] = self.n.get(arm, 0) + 1

    def revise(self, arm: str, old: float, new: float, age: int, context: Any) -> None:
        if arm in self.b:
            self.b[arm] = self.b[arm] + (new - old) * self._vector(context)

    def estimate(self, arm: str, context: Any) -> float | None:
        """The predicted reward of `arm` at this context, without the exploration bonus."""
        if self.n.get(arm, 0) == 0:
            return None
        return self._estimate(arm, self._vector(context))[0]

    def describe(self, arm: str, context: Any) -> str:
        if self.n.get(arm, 0) == 0:
            return "untried"
        mean, _ = self._estimate(arm, self._vector(context))
        return f"estimate {mean:.2f}, n={self.n[arm]}"

    def state(self) -> dict[str, Any]:
        return _plain(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        arms = {a: {"A": self.A[a].copy(), "b": self.b[a].copy(), "n": self.n[a]} for a in self.n}
        return {"kind": "linucb", "dim": self.dim, "arms": arms}

    def load(self, data: dict[str, Any], arms: Collection[str] | None = None) -> None:
        if data.get("kind") != "linucb" or (self.dim is not None and data.get("dim") != self.dim):
            raise ValueError(f"not a linucb state of dimension {self.dim}")
        dim = int(data["dim"])
        A, b, n = {}, {}, {}
        for arm, s in data["arms"].items():
            a_m, b_v = np.asarray(s["A"], dtype=float), np.asarray(s["b"], dtype=float)
            if a_m.shape != (dim, dim) or b_v.shape != (dim,):
                raise ValueError(f"arm {arm!r}: wrong shapes")
            if arms is None or arm in arms:
                A[arm], b[arm], n[arm] = a_m, b_v, int(s["n"])
        self.A, self.b, self.n, self.dim = A, b, n, dim
        self.A_inv = {arm: np.linalg.inv(m) for arm, m in A.items()}


def _plain(value: Any) -> Any:
    """numpy arrays inside a snapshot, as JSON lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def query_features(query: Query) -> np.ndarray:
    """A default 5-feature context for LinUCB: bias, size (log tokens), tools, images, turns."""
    return np.array(
        [
            1.0,
            min(math.log1p(query.tokens) / math.log1p(8000), 1.0),
            float(query.has_tools),
            float(query.has_images),
            min(len(query.messages) / 10, 1.0),
        ]
    )


# -- the step -----------------------------------------------------------------------------------


class BanditStep:
    """Always decides: one arm, chosen by the policy, with the other arms ranked behind it (by
    estimated reward) for the gateway to try when it fails. `observe()` feeds back each routed call's
    outcome; the statistics are saved to `state_path` every `save_every` updates and on close()."""

    def __init__(
        self,
        name: str,
        arms: list[str],
        policy: BanditPolicy | LinUCB,
        weights: BanditWeights = BanditWeights(),
        state_path: Path | None = None,
        *,
        rng: random.Random | None = None,
        save_every: int = 20,
        features: Callable[[Query], np.ndarray] = query_features,
        embed: Callable[[list[str]], Awaitable[Any]] | None = None,
        context_id: str = "features",
        embed_timeout: float = 2.0,
    ) -> None:
        if not arms or len(set(arms)) != len(arms):
            raise ValueError("a bandit step needs distinct arms")
        self.name = name
        self.arms = list(arms)
        self.policy = policy
        self.weights = weights
        self.state_path = state_path
        self.rng = rng or random.Random()
        self.save_every = save_every
        self.features = features  # the context, for a contextual policy only
        self.embed = embed  # when set, the context is [1, the prompt's embedding] instead
        self.context_id = context_id  # what the context is (an encoder id): state of another is dropped
        self.embed_timeout = embed_timeout
        self._unsaved = 0
        self._updates = 0  # observe() calls so far: how old a reward is, when feedback revises it
        self.feedback_memory = 10_000  # calls remembered for feedback, oldest forgotten first
        self._awaiting: OrderedDict[str, tuple[str, float, float, Any, float, int]] = OrderedDict()
        self._seq = self._written_seq = 0
        self._write_lock = threading.Lock()
        self.pending: Any = None  # the last background write, for whoever must wait for it
        self._load()

    def _load(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text())
            if self.policy.contextual and data.get("context", "features") != self.context_id:
                raise ValueError(f"it was learned on context {data.get('context', 'features')!r}")
            self.policy.load(data["policy"], arms=set(self.arms))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "bandit step %s: ignoring state %s (%s: %s); starting fresh",
                self.name,
                self.state_path,
                type(exc).__name__,
                exc,
            )

    async def context(self, query: Query) -> np.ndarray:
        """The query's context for a contextual policy, computed once per query and kept on it
        (the outcome is learned against the very vector the pick used)."""
        x = query.contexts.get(self.name)
        if x is None:
            if self.embed is None:
                x = self.features(query)
            else:
                if not query.text.strip():
                    raise ValueError("no user text to embed")
                async with asyncio.timeout(self.embed_timeout):
                    [v] = await self.embed([query.text])
                v = np.asarray(v, dtype=float)
                norm = float(np.linalg.norm(v))
                if not np.isfinite(norm) or norm == 0:  # never let NaN into the statistics
                    raise ValueError("the encoder returned no usable vector")
                x = np.concatenate([[1.0], v / norm])
            query.contexts[self.name] = x
        return x

    def context_for(self, query: Query) -> np.ndarray | None:
        """The context `decide` used for this query (None if it never got one)."""
        x = query.contexts.get(self.name)
        if x is None and self.embed is None:
            x = self.features(query)
        return x

    async def decide(self, query: Query) -> Decision | str:
        if self.policy.contextual:
            try:
                context = await self.context(query)
                arm = self.policy.select(self.arms, self.rng, context)
            except Exception as exc:  # the encoder is down, slow or changed: pass, don't fail the request
                log.warning("bandit step %s passes: %s: %s", self.name, type(exc).__name__, exc)
                return f"no context: {type(exc).__name__}"
            why = self.policy.describe(arm, context)
            ranked = self.rank(arm, lambda a: self.policy.estimate(a, context))
        else:
            arm = self.policy.select(self.arms, self.rng)
            why = self.policy.describe(arm)
            ranked = self.rank(arm, self.policy.estimate)
        then = f"; then {', '.join(ranked[1:])}" if len(ranked) > 1 else ""
        return Decision(
            self.name, f"combination:{arm}", ranked, f"{self.policy.name} pick {arm} ({why}){then}"
        )

    def rank(self, pick: str, estimate: Callable[[str], float | None]) -> tuple[str, ...]:
        """The pick first, then the other arms by their estimated reward, best first (untried
        ones last, in config order): the order the gateway tries them in when one fails."""
        rest = [a for a in self.arms if a != pick]
        values = {a: estimate(a) for a in rest}
        rest.sort(key=lambda a: (values[a] is None, -(values[a] or 0.0)))
        return (pick, *rest)

    def observe(
        self,
        arm: str,
        success: bool,
        quality: float | None = None,
        cost: float = 0.0,
        latency_ms: float = 0.0,
        *,
        context: Any = None,
        request_id: str | None = None,
    ) -> float | None:
        """Learn from one call to `arm`; returns its reward, or None for an arm not in this step
        (a fallback outside it, say). A contextual policy needs the context the pick used.
        With a `request_id`, feedback on that call may later `revise` the reward with its quality."""
        if arm not in self.arms:
            return None
        r = reward(success, quality, cost, latency_ms, self.weights)
        if self.policy.contextual:
            if context is None:
                raise ValueError(f"bandit step {self.name}: {self.policy.name} needs the query's context")
            self.policy.update(arm, r, context)
        else:
            self.policy.update(arm, r)
        if request_id is not None and success and quality is None:
            self._awaiting[request_id] = (arm, cost, latency_ms, context, r, self._updates)
            # an embedding context is a few KB: remember fewer calls then (~4 MB at 257 dims)
            limit = self.feedback_memory if context is None or np.size(context) <= 64 else 2_000
            while len(self._awaiting) > limit:
                self._awaiting.popitem(last=False)
        self._updates += 1
        self._unsaved += 1
        if self._unsaved >= self.save_every:
            self._save_soon()
        return r

    def revise(self, request_id: str, quality: float) -> float | None:
        """Feedback on a call this step routed: its reward is recomputed with `quality` in place
        of the assumed 1, and the policy's statistics corrected as if it had been known then
        (no extra pull). Returns the new reward, or None for a call it does not remember."""
        entry = self._awaiting.pop(request_id, None)
        if entry is None:
            return None
        arm, cost, latency_ms, context, old, at = entry
        new = reward(True, quality, cost, latency_ms, self.weights)
        age = self._updates - at - 1
        if self.policy.contextual:
            self.policy.revise(arm, old, new, age, context)
        else:
            self.policy.revise(arm, old, new, age)
        self._unsaved += 1
        return new

    def _save_soon(self) -> None:
        """Snapshot now (on the caller's thread), write off the event loop: no file I/O on the request path."""
        self._unsaved = 0
        self._seq += 1
        snapshot, seq = self._snapshot(), self._seq
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(snapshot, seq)
            return
        self.pending = loop.run_in_executor(None, self._write, snapshot, seq)

    def _snapshot(self) -> Any:
        """A copy of the policy's state that later updates cannot touch. LinUCB's matrices are
        copied as arrays (cheap) and turned into JSON in the writer, off the event loop."""
        snap = getattr(self.policy, "snapshot", None)
        if snap is not None:
            return snap()
        return json.loads(json.dumps(self.policy.state()))

    def save(self) -> None:
        """Write the policy state now."""
        self._unsaved = 0
        self._seq += 1
        self._write(self.policy.state(), self._seq)

    def _write(self, state: Any, seq: int) -> None:
        """Atomically (temp file + rename): a crash leaves the old file. Writes from the executor
        and from close() may overlap; the lock and the sequence number keep the newest."""
        if self.state_path is None:
            return
        with self._write_lock:
            if seq <= self._written_seq:
                return
            self._written_seq = seq
            self._write_file(state)

    def _write_file(self, state: Any) -> None:
        assert self.state_path is not None
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(
                        {
                            "version": 1,
                            "step": self.name,
                            "context": self.context_id,
                            "policy": _plain(state),
                        },
                        fh,
                    )
                os.replace(tmp, self.state_path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:  # a full disk must not fail requests; learning just isn't kept
            log.warning("bandit step %s: could not save state to %s: %s", self.name, self.state_path, exc)

    def close(self) -> None:
        if self._unsaved:
            self.save()
