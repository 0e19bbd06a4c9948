"""What the replicas learn, summed on Redis: demotions and every kind of bandit step.

Each second the state watcher sends one pipeline carrying a command per syncer (`queue`) and
hands each its replies (`apply`); nothing here runs on the request path. Every syncer keeps
what this replica learned while the pipeline was out on top of the sums it reads back, and
keeps learning locally while Redis is away: the next sync after it answers again sends what
was learned meanwhile.

- Demotions (HealthSync): each replica publishes its window's (requests, successes) per
  combination under its own field, stamped with Redis's clock; the others' fields that are
  fresh (a replica that stopped syncing drops out after HEALTH_TTL seconds) are added to this
  replica's own live window when the balancer decides whether a combination is demoted.
- Stationary bandits (`drift: none`): per arm (pulls, total reward); a replica adds what it
  learned since the last sync.
- `drift: discounted`: the same sums, decayed by gamma per pull of any replica: a sync that
  carries k pulls first multiplies every sum by gamma**k, then adds those pulls' own
  (already discounted among themselves) contribution. With one replica this is exactly the
  single-process policy; with several, a pull's weight is gamma to the number of pulls the
  whole fleet made since (pulls within one second of two replicas count in sync order).
- `drift: window`: the last W pulls of all replicas, a Redis list each sync appends this
  replica's new (arm, reward) pairs to and trims to W; the window is read back whole. Feedback
  on a pull already pushed is made in the list (each entry names its replica and pull number).
- LinUCB: per arm the sums of x xT, r x and the pull count (A = I + sum x xT), added like the
  stationary sums; A^-1 is recomputed (one inversion per arm) when they changed.

A hash or list that does not exist (a first replica, or a Redis that lost its data) is seeded
with this replica's whole statistics instead of its increments, so what a replica loaded from
its saved state is counted once, not again at every restart.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np
import orjson

HEALTH_TTL = 5.0  # seconds: a replica that has not synced for this long no longer counts

# KEYS[1]: the health hash; ARGV: this replica, its counts as JSON ('' for none), seconds a
# field stays fresh. Returns the other replicas' fresh fields ("<time> <json>"), drops stale ones.
HEALTH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', now) .. ' ' .. ARGV[2])
end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then
    local at = tonumber(string.match(all[i + 1], '^(%S+)'))
    if at == nil or at < now - tonumber(ARGV[3]) then
      redis.call('HDEL', KEYS[1], all[i])
    else
      out[#out + 1] = all[i + 1]
    end
  end
end
if #all > 0 then redis.call('EXPIRE', KEYS[1], 3600) end
return out
"""

# KEYS[1]: the sums (hash); ARGV[1]: decay factor for what is there; then (field, increment,
# whole value) triples: increments added to an existing hash, whole values seed a missing one.
COUNTS = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
local factor = tonumber(ARGV[1])
if exists and factor ~= 1 then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    redis.call('HSET', KEYS[1], all[i], string.format('%.17g', tonumber(all[i + 1]) * factor))
  end
end
for i = 2, #ARGV, 3 do
  if exists then
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1]: the window (list); ARGV: its size W, the number n of new entries, the number m of
# revisions, the n new entries, m (old entry, new entry) pairs (feedback on a pull already
# pushed), then the whole local window (seeds a missing list). Returns the last W entries.
WINDOW = """
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
local first, last = 4, 3 + n
if redis.call('EXISTS', KEYS[1]) == 0 then first, last = 4 + n + 2 * m, #ARGV end
for i = first, last do redis.call('RPUSH', KEYS[1], ARGV[i]) end
for i = 4 + n, 3 + n + 2 * m, 2 do
  local at = redis.call('LPOS', KEYS[1], ARGV[i])
  if at then redis.call('LSET', KEYS[1], at, ARGV[i + 1]) end
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
return redis.call('LRANGE', KEYS[1], 0, -1)
"""

# KEYS[1]: the sums (hash of little-endian float64 vectors); ARGV: (field, increment, whole
# value) triples: the increment is added element-wise to an existing vector of the same size.
VECTORS = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
for i = 1, #ARGV, 3 do
  local value = ARGV[i + 2]
  if exists then
    value = ARGV[i + 1]
    local old = redis.call('HGET', KEYS[1], ARGV[i])
    if old and #old == #value then
      local out = {}
      for j = 1, #value, 8 do
        out[#out + 1] = struct.pack('<d', struct.unpack('<d', old, j) + struct.unpack('<d', value, j))
      end
      value = table.concat(out)
    end
  end
  redis.call('HSET', KEYS[1], ARGV[i], value)
end
return redis.call('HGETALL', KEYS[1])
"""


class HealthSync:
    """Demotions decided on every replica's window: this replica's counts out, the others' in."""

    def __init__(self, balancer: Any, prefix: str, me: str) -> None:
        self.balancer = balancer
        self.key = f"{prefix}:health"
        self.me = me
        self.ttl = HEALTH_TTL

    def queue(self, pipe: Any) -> int:
        metrics = self.balancer.metrics
        mine = {}
        for cid in metrics.combination_ids():
            w = metrics.window_stats(cid, fresh=True)
            requests, successes = w.requests, w.successes
            if requests:
                mine[cid] = [requests, successes]
        pipe.eval(HEALTH, 1, self.key, self.me, orjson.dumps(mine) if mine else "", self.ttl)
        return 1

    def apply(self, replies: list[Any]) -> None:
        elsewhere: dict[str, tuple[int, int]] = {}
        for raw in replies[0]:
            _at, _, payload = raw.partition(b" ")
            for cid, (requests, successes) in orjson.loads(payload).items():
                n, ok = elsewhere.get(cid, (0, 0))
                elsewhere[cid] = (n + int(requests), ok + int(successes))
        self.balancer.share(elsewhere)

    def lost(self) -> None:
        self.balancer.share({})  # Redis is away: each replica demotes on its own window


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    """HGETALL's reply as a script returns it: field, value, field, value..."""
    return list(zip(flat[::2], flat[1::2], strict=True))


def _num(x: float) -> str:
    return repr(float(x))


class CountsSync:
    """(pulls, total reward) per arm of a stationary or discounted policy."""

    def __init__(self, step: Any, prefix: str) -> None:
        from rswitch.routing.bandit import Discounted

        self.step = step
        self.discounted = isinstance(step.policy, Discounted)
        self.inner = step.policy.policy if self.discounted else step.policy  # holds .stats
        self.gamma = step.policy.gamma if self.discounted else 1.0
        self.key = f"{prefix}:bandit:{step.name}" + (":discounted" if self.discounted else "")
        # the sums as this replica last read them: at first, what it loaded from its saved state
        self.base = {arm: (s.n, s.total) for arm, s in self.inner.stats.items()}
        self.base_updates = self._updates()
        self.sent: dict[str, tuple[float, float]] = {}
        self.sent_updates = 0

    def _updates(self) -> int:
        return self.step.policy.updates if self.discounted else 0

    def queue(self, pipe: Any) -> int:
        self.sent = {arm: (s.n, s.total) for arm, s in self.inner.stats.items()}
        self.sent_updates = self._updates()
        factor = self.gamma ** (self.sent_updates - self.base_updates)
        args: list[str] = [_num(factor)]
        for arm in self.sent.keys() | self.base.keys():
            n, total = self.sent.get(arm, (0.0, 0.0))
            base_n, base_total = self.base.get(arm, (0.0, 0.0))
            args += [f"{arm}:n", _num(n - factor * base_n), _num(n)]
            args += [f"{arm}:t", _num(total - factor * base_total), _num(total)]
        pipe.eval(COUNTS, 1, self.key, *args)
        return 1

    def apply(self, replies: list[Any]) -> None:
        from rswitch.routing.bandit import ArmStats

        sums: dict[str, list[float]] = {}
        for field, value in _pairs(replies[0]):
            arm, _, part = field.decode().rpartition(":")
            sums.setdefault(arm, [0.0, 0.0])[0 if part == "n" else 1] = float(value)
        stats = self.inner.stats
        # what was learned while the sums were on their way stays on top of them (decayed by
        # the pulls made meanwhile, like everything else)
        factor = self.gamma ** (self._updates() - self.sent_updates)
        for arm in set(sums) | set(stats):
            if arm not in self.step.arms:
                continue
            n, total = sums.get(arm, (0.0, 0.0))
            now = stats.get(arm) or ArmStats()
            at_send = self.sent.get(arm, (0.0, 0.0))
            n = max(factor * n + now.n - factor * at_send[0], 0.0)
            total = min(max(factor * total + now.total - factor * at_send[1], 0.0), n)
            stats[arm] = ArmStats(n, total)
        self.base = {arm: (float(v[0]), float(v[1])) for arm, v in sums.items()}
        self.base_updates = self.sent_updates


class WindowSync:
    """The last W pulls of all replicas, on a Redis list of "reward|tag|arm" entries; the tag
    (this replica, the pull's number) lets feedback find a pull it already pushed."""

    def __init__(self, step: Any, prefix: str, me: str) -> None:
        self.step = step
        self.policy = step.policy
        self.key = f"{prefix}:bandit:{step.name}:window"
        self.me = me[:12]
        self.pushed = self.policy.updates  # a loaded window is only pushed to seed a missing list
        self.sent_updates = self.pushed
        self.revisions: list[tuple[str, str]] = []  # (old entry, new entry) to make in Redis
        self.policy.revise_shared = self.revise

    def revise(self, arm: str, old: float, new: float, number: int) -> bool:
        """Feedback on pull `number`: one still here is revised by the window itself (False);
        one already sent is revised in Redis with the next sync (True)."""
        if number > self.sent_updates:
            return False
        self.revisions.append((self._entry(arm, old, number), self._entry(arm, new, number)))
        del self.revisions[: -self.policy.window]  # (Redis away) older ones are out of the window
        return True

    def _entry(self, arm: str, reward: float, number: int | None) -> str:
        return f"{reward!r}|{'' if number is None else f'{self.me}.{number}'}|{arm}"

    def queue(self, pipe: Any) -> int:
        pulls = list(self.policy.pulls)
        self.sent_updates = self.policy.updates
        fresh = min(self.sent_updates - self.pushed, len(pulls))
        first = self.sent_updates - fresh + 1  # the number of the first new pull
        new = [self._entry(a, r, first + i) for i, (a, r) in enumerate(pulls[len(pulls) - fresh :])]
        revisions = [entry for pair in self.revisions for entry in pair]
        self.revisions = []
        whole = [self._entry(a, r, None) for a, r in pulls[: len(pulls) - fresh]] + new
        pipe.eval(
            WINDOW, 1, self.key, self.policy.window, len(new), len(revisions) // 2, *new, *revisions, *whole
        )
        return 1

    def apply(self, replies: list[Any]) -> None:
        since = min(self.policy.updates - self.sent_updates, len(self.policy.pulls))
        tail = list(self.policy.pulls)[len(self.policy.pulls) - since :]
        window = [p for p in map(_pull, replies[0]) if p[0] in self.step.arms]
        self.policy.pulls = deque(window + tail, maxlen=self.policy.window)
        self.policy._recount()
        self.pushed = self.sent_updates


def _pull(raw: bytes) -> tuple[str, float]:
    reward, _tag, arm = raw.decode().split("|", 2)
    return arm, float(reward)


class LinucbSync:
    """LinUCB's per-arm sums of x xT, r x and pulls."""

    def __init__(self, step: Any, prefix: str) -> None:
        self.step = step
        self.policy = step.policy
        self.key = f"{prefix}:bandit:{step.name}:linucb:{step.context_id}"
        self.base = {arm: self._vector(arm) for arm in self.policy.n}  # the loaded state
        self.sent: dict[str, np.ndarray] = {}

    def _vector(self, arm: str) -> np.ndarray:
        """[n, (A - I) flattened, b] of one arm, as this replica has it now."""
        p = self.policy
        d = int(p.dim or 0)
        return np.concatenate([[float(p.n[arm])], (p.A[arm] - np.eye(d)).ravel(), p.b[arm]])

    def queue(self, pipe: Any) -> int:
        self.sent = {arm: self._vector(arm) for arm in self.policy.n}
        args: list[bytes | str] = []
        for arm, now in self.sent.items():
            base = self.base.get(arm)
            if base is not None and base.shape == now.shape and np.array_equal(base, now):
                continue  # unchanged since the last sync: nothing to add
            delta = now - base if base is not None and base.shape == now.shape else now
            args += [arm, delta.astype("<f8").tobytes(), now.astype("<f8").tobytes()]
        pipe.eval(VECTORS, 1, self.key, *args)
        return 1

    def apply(self, replies: list[Any]) -> None:
        p = self.policy
        sums = {f.decode(): np.frombuffer(v, dtype="<f8") for f, v in _pairs(replies[0])}
        base: dict[str, np.ndarray] = {}
        for arm, total in sums.items():
            d = (math.isqrt(4 * total.size - 3) - 1) // 2  # size = 1 + d*d + d
            if arm not in self.step.arms or 1 + d * d + d != total.size or p.dim not in (None, d):
                continue  # another step's arm, or a context of another dimension
            p.dim = d
            now = self._vector(arm) if arm in p.n else None
            at_send = self.sent.get(arm, np.zeros_like(total))
            merged = total.copy()
            if now is not None and now.shape == total.shape == at_send.shape:
                merged += now - at_send  # learned while the sums were on their way
            if now is None or not np.array_equal(merged, now):
                p.n[arm] = int(round(merged[0]))
                p.A[arm] = np.eye(d) + merged[1 : 1 + d * d].reshape(d, d)
                p.b[arm] = merged[1 + d * d :].copy()
                p.A_inv[arm] = np.linalg.inv(p.A[arm])
            base[arm] = total.copy()
        # an arm this replica knows but the sums lack (Redis lost it) is sent whole next time
        self.base = base


def syncer_for(step: Any, prefix: str, me: str) -> Any:
    """The syncer for a bandit step's policy, or None for a step that does not learn."""
    from rswitch.routing.bandit import Discounted, LinUCB, Policy, SlidingWindow

    policy = getattr(step, "policy", None)
    if isinstance(policy, (Policy, Discounted)):
        return CountsSync(step, prefix)
    if isinstance(policy, SlidingWindow):
        return WindowSync(step, prefix, me)
    if isinstance(policy, LinUCB):
        return LinucbSync(step, prefix)
    return None
