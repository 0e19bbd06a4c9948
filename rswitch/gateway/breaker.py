"""A circuit breaker per combination: after `failures` consecutive failed attempts it opens, and
requests skip that combination (straight to the fallbacks, without paying a failed attempt
each) for `cooldown` seconds. Then the first request to ask gets it as a probe (half-open) while
every other request still skips it; the probe's success closes the breaker, its failure opens it
for another cooldown, and a probe that ends with no verdict (the client left, the client's own
error, a rate limit before the call) hands the probe to the next request.

Only combinations that have failed have an entry, so asking about a healthy one (`allow`,
`success`, `release` on every request) is one dictionary miss and allocates nothing. Every call
runs on the gateway's event loop: no locks.

The breaker cannot tell which request holds the probe: any failure while half-open reopens it,
and any `release` frees the probe slot. At worst that costs one extra probe, never a request
sent to a combination that is open and cooling down."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

PROBE_LEASE = 120.0  # a probe that gives no verdict in this long lets another request probe
PROBE_HINT = 1.0  # seconds a client is told to wait while a probe is out (it usually ends sooner)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class _Entry:
    __slots__ = ("failures", "opened_at", "probe_since", "remote")

    def __init__(self) -> None:
        self.remote = False  # opened because another replica's breaker opened (shared state)
        self.failures = 0  # consecutive failed attempts
        self.opened_at: float | None = None  # clock() when it last opened; None while closed
        self.probe_since: float | None = None  # clock() when the probe went out; None if none is out


class Breakers:
    """The circuit breakers of every combination, by combination id."""

    def __init__(
        self,
        failures: int,
        cooldown: float,
        *,
        enabled: bool = True,
        event: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_lease: float = PROBE_LEASE,
    ) -> None:
        if failures < 1:
            raise ValueError(f"a circuit breaker needs failures >= 1, got {failures!r}")
        if not cooldown > 0:
            raise ValueError(f"a circuit breaker needs cooldown > 0 seconds, got {cooldown!r}")
        self.failures = failures
        self.cooldown = float(cooldown)
        self.enabled = enabled
        self.probe_lease = probe_lease
        self._event = event
        self.clock = clock
        self._entries: dict[str, _Entry] = {}  # only combinations with a failure since their last success
        # told of every opening and closing (shared state publishes them to the other replicas)
        self.on_change: Callable[[str, bool, float], None] | None = None

    def _say(self, combo_id: str, text: str) -> None:
        if self._event is not None:
            self._event("breaker", f"{combo_id}: {text}")

    def _changed(self, combo_id: str, opened: bool) -> None:
        if self.on_change is not None:
            self.on_change(combo_id, opened, self.cooldown)

    # -- from other replicas (shared state) -------------------------------------------------

    def opened_elsewhere(self, combo_id: str, remaining: float) -> None:
        """Another replica's breaker for this combination opened: skip it here too until its
        cooldown is over (then this replica may probe it as well)."""
        if not self.enabled:
            return
        e = self._entries.get(combo_id)
        if e is not None and e.opened_at is not None:
            return  # already open here
        if e is None:
            e = self._entries[combo_id] = _Entry()
        e.remote = True
        e.opened_at = self.clock() - max(0.0, self.cooldown - remaining)
        self._say(combo_id, f"opened on another replica; cooling down {remaining:.0f}s")

    def closed_elsewhere(self, combo_id: str) -> None:
        """The replica that opened it saw it answer again: close it here if it was opened for that."""
        e = self._entries.get(combo_id)
        if e is not None and e.remote and e.probe_since is None:
            del self._entries[combo_id]
            self._say(combo_id, "closed on another replica")

    def remote_ids(self) -> list[str]:
        return [cid for cid, e in self._entries.items() if e.remote]

    # -- on the attempt path -------------------------------------------------------------------

    def allow(self, combo_id: str) -> bool:
        """May a request make an attempt at this combination now? Closed: yes. Open and cooling
        down: no. Cooldown over: the first caller gets the probe (half-open), the others no
        while it is out."""
        e = self._entries.get(combo_id)
        if e is None or e.opened_at is None or not self.enabled:
            return True
        now = self.clock()
        if e.probe_since is not None:
            if now - e.probe_since < self.probe_lease:
                return False
            e.probe_since = now
            self._say(combo_id, "half-open: probing again (the last probe gave no verdict)")
            return True
        if now - e.opened_at < self.cooldown:
            return False
        e.probe_since = now
        self._say(combo_id, "half-open: probing")
        return True

    def success(self, combo_id: str) -> None:
        """An attempt answered: the breaker closes and its count starts again."""
        if not self._entries:
            return
        e = self._entries.pop(combo_id, None)
        if e is None or e.opened_at is None:
            return
        if e.probe_since is not None:
            self._say(combo_id, "closed after a successful probe")
        else:  # a call let through before it opened answered after all
            self._say(combo_id, "closed after a successful call")
        self._changed(combo_id, False)

    def failure(self, combo_id: str) -> None:
        """An attempt failed for upstream reasons: one more consecutive failure. The `failures`th
        opens the breaker; a failed probe opens it for another cooldown."""
        if not self.enabled:
            return
        e = self._entries.get(combo_id)
        if e is None:
            e = self._entries[combo_id] = _Entry()
        e.failures += 1
        if e.probe_since is not None:
            e.opened_at, e.probe_since, e.remote = self.clock(), None, False
            self._say(combo_id, f"reopened: probe failed; cooling down {self.cooldown:g}s")
            self._changed(combo_id, True)
        elif e.opened_at is None and e.failures >= self.failures:
            e.opened_at = self.clock()
            self._say(
                combo_id,
                f"opened after {e.failures} consecutive failures; cooling down {self.cooldown:g}s",
            )
            self._changed(combo_id, True)
        # already open (a call let through before it opened failed too): counted, cooldown unchanged

    def release(self, combo_id: str) -> None:
        """An attempt ended with no verdict on the upstream (the client left, the client's own
        error, rate limited before the call): a probe it held goes to the next request."""
        if not self._entries:
            return
        e = self._entries.get(combo_id)
        if e is not None and e.probe_since is not None:
            e.probe_since = None  # open with its cooldown over: the next allow() probes

    # -- for the operator and for Retry-After --------------------------------------------------

    def state(self, combo_id: str) -> dict[str, Any]:
        """{"state": closed | open | half_open, "failures": consecutive failures,
        "retry_in": seconds until an open one admits a probe, else None}."""
        e = self._entries.get(combo_id) if self.enabled else None
        if e is None:
            return {"state": CLOSED, "failures": 0, "retry_in": None}
        if e.opened_at is None:
            return {"state": CLOSED, "failures": e.failures, "retry_in": None}
        if e.probe_since is not None:
            return {"state": HALF_OPEN, "failures": e.failures, "retry_in": None}
        left = max(0.0, e.opened_at + self.cooldown - self.clock())
        return {"state": OPEN, "failures": e.failures, "retry_in": round(left, 3)}

    def retry_in(self, combo_ids: Iterable[str]) -> float | None:
        """Seconds until the soonest of these combinations admits a request (0 for a closed one;
        for one whose probe is out, a short hint, since the probe usually ends sooner than its
        lease); None when there are none or breakers are off. For a 503's Retry-After when
        every candidate is open."""
        if not self.enabled:
            return None
        now = self.clock()
        soonest: float | None = None
        for cid in combo_ids:
            e = self._entries.get(cid)
            if e is None or e.opened_at is None:
                return 0.0
            if e.probe_since is not None:
                wait = min(PROBE_HINT, max(0.0, e.probe_since + self.probe_lease - now))
            else:
                wait = max(0.0, e.opened_at + self.cooldown - now)
            soonest = wait if soonest is None else min(soonest, wait)
        return soonest

    def open_ids(self) -> list[str]:
        """The combinations whose breaker is open or half-open now."""
        if not self.enabled:
            return []
        return [cid for cid, e in self._entries.items() if e.opened_at is not None]
