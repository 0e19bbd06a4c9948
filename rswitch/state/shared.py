"""Rate limits and upstream blocks shared across replicas through Redis (and, each second, the
circuit breakers, demotions and bandit statistics: see `learning`).

One atomic Lua script per request takes from a provider's rpm window and tpm bucket (on
Redis's clock, so replicas with skewed clocks agree), applies the token corrections earlier
calls left pending (settling an estimate against real usage costs no round trip of its own),
and honours a provider's Retry-After block set by any replica. The limit is one limit, not one
per replica.

When Redis does not answer within `timeout_ms` (an answer that came while the event loop was
stalled past the deadline counts: `within`), the limiter falls back to the process's own
buckets (each replica then allows the whole limit), `/status` and `/metrics` say degraded, the
log says so once, and a background task pings Redis every second until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from rswitch.gateway.ratelimit import MAX_UPSTREAM_BLOCK, ProviderLimiter
from rswitch.state.learning import HealthSync, syncer_for
from rswitch.state.takes import TakeChannel

log = logging.getLogger("rswitch.state")


class within:  # noqa: N801 - used as `async with within(seconds):`, like asyncio.timeout
    """asyncio.timeout(seconds), save that an answer the event loop finds together with the
    deadline is taken, not cancelled.

    asyncio.timeout counts wall time and cancels in the loop pass its timer runs. When the loop
    is held up past the deadline (a blocking call, a machine whose cores other work takes), the
    pass after the stall finds Redis's answer in the socket and the deadline passed at once; the
    answer's reader only wakes in the next pass, so asyncio.timeout has cancelled it by then,
    and a Redis that answered in a millisecond is taken for one that is not answering. Here the
    deadline's timer expires the wait one pass later (after what its own pass woke), so such an
    answer is read; with no answer there, the wait ends as asyncio.timeout's would (the body
    cancelled, TimeoutError raised), one loop pass later."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timeout = asyncio.timeout(None)  # expired by hand, from the deadline's timer
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> within:
        await self._timeout.__aenter__()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + self.seconds, self._due)
        return self

    def _due(self) -> None:
        self._timeout.reschedule(asyncio.get_running_loop().time())  # expires in the next pass

    async def __aexit__(self, *exc: Any) -> bool | None:
        if self._timer is not None:
            self._timer.cancel()
        return await self._timeout.__aexit__(*exc)


# KEYS[1]: the provider's tpm bucket (hash), KEYS[2]: its upstream block (a key with a TTL),
# KEYS[3]: when its requests of the last window were taken (a list, newest first)
# ARGV: rpm capacity (0: none), tpm capacity (0: none), tokens to take, pending tpm correction
#       (> 0 used beyond the estimate, < 0 given back), take (1) or only correct (0), rpm window (s),
#       requests wanted (> 1: a reserve), the reserve's lifetime (s), then pairs of (count, stamp):
#       slots of expired reserves given back
# Returns {wait (s, as text), requests granted, their stamp (as text)}.
#
# A reserve is taken only while the limit is far from binding: at most 1/64 of what is left, so
# near the limit every request takes its own slot. Its slots are stamped at the end of its
# lifetime, not now: a slot spent late still counts for a full window after it was spent, so a
# reserve can make the limit stricter for a moment, never looser.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm_cap = tonumber(ARGV[1])
local tpm_cap = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local delta = tonumber(ARGV[4])
for i = 9, #ARGV - 1, 2 do
  redis.call('LREM', KEYS[3], tonumber(ARGV[i]), ARGV[i + 1])
end
local h = redis.call('HMGET', KEYS[1], 't', 'at')
local at = tonumber(h[2]) or now
local tk = tonumber(h[1]) or tpm_cap
if tpm_cap > 0 then
  tk = math.min(tpm_cap, tk + math.max(0, now - at) * tpm_cap / 60)
  if delta > 0 then tk = math.max(0, tk - delta) elseif delta < 0 then tk = math.min(tpm_cap, tk - delta) end
end
local wait = 0
local granted = 0
local stamp = now
if ARGV[5] == '1' then
  local blocked = redis.call('PTTL', KEYS[2])
  if blocked > 0 then wait = blocked / 1000 end
  local window = tonumber(ARGV[6])
  local used = 0
  if rpm_cap > 0 then
    local oldest = redis.call('LINDEX', KEYS[3], -1)
    while oldest and tonumber(oldest) <= now - window do
      redis.call('RPOP', KEYS[3])
      oldest = redis.call('LINDEX', KEYS[3], -1)
    end
    used = redis.call('LLEN', KEYS[3])
    if used >= rpm_cap then
      local leaving = tonumber(redis.call('LINDEX', KEYS[3], rpm_cap - 1))
      wait = math.max(wait, leaving + window - now)
    end
  end
  local amount = math.min(want, tpm_cap)
  if tpm_cap > 0 and tk < amount then wait = math.max(wait, (amount - tk) * 60 / tpm_cap) end
  if wait <= 0 then
    wait = 0
    granted = 1
    local n = tonumber(ARGV[7])
    if n > 1 then
      granted = n
      if rpm_cap > 0 then granted = math.min(granted, math.floor((rpm_cap - used) / 64)) end
      if tpm_cap > 0 and amount > 0 then granted = math.min(granted, math.floor(tk / amount / 64)) end
      if granted > 1 then stamp = now + tonumber(ARGV[8]) else granted = 1 end
    end
    if rpm_cap > 0 then
      local slots = {}
      for i = 1, granted do slots[i] = tostring(stamp) end
      redis.call('LPUSH', KEYS[3], unpack(slots))
      redis.call('EXPIRE', KEYS[3], math.ceil(window + stamp - now) + 1)
    end
    if tpm_cap > 0 then tk = tk - amount * granted end
  end
end
redis.call('HSET', KEYS[1], 't', tostring(tk), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return {tostring(wait), granted, tostring(stamp)}
"""

# KEYS[1]: the provider's block; ARGV[1]: milliseconds. Never shortens a longer block.
BLOCK = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 1
"""


# KEYS[1]: the role's lock; ARGV: this replica's id, milliseconds to hold it. 1 when it is ours.
LEAD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS[1]: the role's lock; ARGV[1]: this replica's id. Let go only of a lock that is ours.
RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

LEAD_TTL_MS = 10_000  # a leader that stops renewing (killed, cut off) is replaced after this


class SharedState:
    """The Redis connection every shared limiter uses, and whether it is answering."""

    def __init__(self, url: str, *, prefix: str = "rswitch", timeout_ms: float = 250.0) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout_ms / 1000
        # background writes and the per-second sync: never stricter than a request's own timeout
        self.background_timeout = max(1.0, self.timeout)
        self.client: Any = None
        self.degraded = False  # Redis did not answer: local state serves meanwhile
        self.degraded_since: float | None = None
        self.last_error: str | None = None
        self.outages = 0
        self._take: Any = None
        self._channel: TakeChannel | None = None  # the takes' own connection (None: the pipeline)
        self._block: Any = None
        self._watch: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # background sends: the loop keeps only weak references
        self.limiters: list[SharedLimiter] = []
        # takes made while one pipeline is out go in the next: one round trip carries them all
        self._queued: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._sending = False
        self.breakers: Any = None  # the gateway's circuit breakers, when shared (attach_breakers)
        self.breaker_sync: BreakerSync | None = None
        self.bandits: list[Any] = []  # bandit steps' syncers (rswitch.state.learning)
        self.health: HealthSync | None = None  # demotions, decided on every replica's window
        self._failed_syncs: list[Any] = []  # syncers whose failure was logged
        self.me = uuid.uuid4().hex  # this replica, as leader locks name it
        self.leading: set[str] = set()  # roles this replica holds (renewed every second)

    async def start(self) -> None:
        import redis.asyncio as aioredis

        # redis-py's own timeouts only back up `within`'s: they cancel as asyncio.timeout does
        backstop = max(self.timeout * 4, 5.0)
        self.client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=backstop, socket_timeout=backstop
        )
        self._take = self.client.register_script(TAKE)
        if TakeChannel.usable(self.client):
            self._channel = TakeChannel(self.client, self._take.sha, n_fixed=2)  # the two limits
        self._block = self.client.register_script(BLOCK)
        self._lead = self.client.register_script(LEAD)
        self._resign = self.client.register_script(RESIGN)
        try:
            async with within(2.0):
                await self.client.ping()
        except Exception as exc:  # start anyway, on local state, and keep trying
            self.down(exc)
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    # -- circuit breakers: openings and closings published, the others' applied each second --

    def attach_bandit(self, step: Any) -> bool:
        """Share this bandit step's statistics across replicas (every policy, see `learning`);
        False for a step that is not a bandit."""
        syncer = syncer_for(step, self.prefix, self.me)
        if syncer is None:
            return False
        self.bandits.append(syncer)
        return True

    def attach_balancer(self, balancer: Any) -> None:
        """Decide demotions on the sum of every replica's window."""
        self.health = HealthSync(balancer, self.prefix, self.me)

    def attach_breakers(self, breakers: Any) -> None:
        self.breakers = breakers
        breakers.on_change = self._breaker_changed
        self.breaker_sync = BreakerSync(breakers, self)

    def _breaker_changed(self, combo_id: str, opened: bool, cooldown: float) -> None:
        if self.degraded or self.client is None:
            return
        key = f"{self.prefix}:breakers"
        if opened:
            command = self.client.hset(key, combo_id, repr(time.time() + cooldown))
        else:
            command = self.client.hdel(key, combo_id)
        self.spawn(self._quietly(command))

    def spawn(self, coro: Any) -> None:
        """Run `coro` in the background, held until it ends (a task nobody holds may be collected
        mid-run, and the takes waiting on `_send` with it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, command: Any) -> None:
        try:
            async with within(self.background_timeout):
                await command
        except Exception as exc:
            self.down(exc)

    async def lead(self, role: str) -> bool:
        """Whether this replica holds `role` (taking it when free). While Redis is away nobody
        leads: work that must run once is better skipped than run by every replica."""
        held = await self.call(self._lead, [f"{self.prefix}:leader:{role}"], [self.me, LEAD_TTL_MS])
        if held == 1:
            self.leading.add(role)
            return True
        self.leading.discard(role)
        return False

    async def close(self) -> None:
        for role in list(self.leading):  # the next replica need not wait out the lock
            await self.call(self._resign, [f"{self.prefix}:leader:{role}"], [self.me])
        if self.health is not None and not self.degraded:  # its window stops counting now
            await self._quietly(self.client.hdel(self.health.key, self.me))
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except BaseException:
                pass
        if self._channel is not None:
            self._channel.close()
        if self.client is not None:
            await self.client.aclose()

    def down(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
        if self.health is not None:
            self.health.lost()
        if not self.degraded:
            self.degraded = True
            self.degraded_since = time.time()
            self.outages += 1
            log.warning(
                "shared state: Redis is not answering (%s); limits, demotions and bandits are this process's own until it does",
                self.last_error,
            )

    def up(self) -> None:
        if self.degraded:
            if self._channel is not None:
                self._channel.close()  # opened again, to the Redis that answers now, by the next take
            self.degraded = False
            self.degraded_since = None
            log.warning("shared state: Redis answers again; limits, demotions and bandits are shared again")

    async def call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script within the timeout; None (and degraded) when Redis does not answer."""
        if self.degraded:
            return None
        try:
            async with within(self.timeout):
                return await script(keys=keys, args=args)
        except Exception as exc:
            self.down(exc)
            return None

    async def take(self, keys: list[str], args: list[Any]) -> Any:
        """The TAKE script for one request, sent with every other take made meanwhile; None (and
        degraded) when Redis does not answer within the timeout. The timeout is the batch's: a
        take queued behind a batch in flight waits for that one too (at most twice the timeout)."""
        if self.degraded:
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, future))
        if not self._sending:
            self._sending = True
            self.spawn(self._send())
        try:
            return await future
        except Exception as exc:
            self.down(exc)
            return None

    async def _send(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    if self.degraded:  # gone while these waited: each goes local at once
                        raise ConnectionError(self.last_error or "Redis is not answering")
                    async with within(self.timeout):
                        results = await self._run_batch(batch)
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._sending = False

    async def _run_batch(self, batch: list[tuple[list[str], list[Any], Any]]) -> list[Any]:
        """Run each take of the batch in one round trip: on the takes' own connection, else in a
        pipeline (or alone). A Redis that lost its scripts (restarted) gets them loaded once and the
        batch again."""
        from redis.exceptions import NoScriptError

        async def send() -> list[Any]:
            if self._channel is not None:
                return await self._channel.run(packed)
            if len(batch) == 1:  # alone: no pipeline to build
                keys, args, _future = batch[0]
                try:
                    return [await self.client.evalsha(self._take.sha, len(keys), *keys, *args)]
                except NoScriptError as exc:
                    return [exc]
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, args, _future in batch:
                    pipe.evalsha(self._take.sha, len(keys), *keys, *args)
                return await pipe.execute(raise_on_error=False)

        def lost(r: Any) -> bool:  # redis-py's error, or hiredis's reply as Redis worded it
            return isinstance(r, NoScriptError) or (
                isinstance(r, Exception) and str(r).startswith("NOSCRIPT")
            )

        packed = [self._channel.pack(keys, args) for keys, args, _f in batch] if self._channel else []
        for _ in range(2):
            results = await send()
            if not any(lost(r) for r in results):
                for r in results:
                    if isinstance(r, Exception):
                        raise r
                return results
            await self.client.script_load(TAKE)
        raise RuntimeError("Redis did not keep the rate-limit script")

    async def _watch_loop(self) -> None:
        """Ping Redis every second while it is away; push pending corrections while it is not."""
        while True:
            await asyncio.sleep(1.0)
            if self.degraded:
                try:
                    async with within(self.background_timeout):
                        await self.client.ping()
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                    continue
                self.up()
            # every idle provider's corrections and given-back slots: takes, so one round trip
            await asyncio.gather(*(limiter.flush() for limiter in self.limiters))
            await self.sync()
            for role in list(self.leading):
                await self.lead(role)  # renew

    async def sync(self) -> None:
        """Breaker openings, demotions and bandit statistics: one pipelined round trip for all."""
        syncers = [
            *([self.breaker_sync] if self.breaker_sync is not None else []),
            *([self.health] if self.health is not None else []),
            *self.bandits,
        ]
        if not syncers or self.degraded:
            return
        try:
            async with within(self.background_timeout):
                async with self.client.pipeline(transaction=False) as pipe:
                    queued = []
                    for syncer in syncers:  # each adds its command last: one that fails adds none
                        try:
                            queued.append((syncer, syncer.queue(pipe)))
                        except Exception as exc:
                            self._sync_failed(syncer, exc)
                    replies = await pipe.execute()
        except Exception as exc:
            self.down(exc)
            return
        at = 0
        for syncer, n in queued:
            try:
                syncer.apply(replies[at : at + n])
            except Exception as exc:  # odd data in Redis: this step stays local, the watcher goes on
                self._sync_failed(syncer, exc)
            at += n

    def _sync_failed(self, syncer: Any, exc: Exception) -> None:
        if syncer not in self._failed_syncs:  # once, not every second
            self._failed_syncs.append(syncer)
            log.warning("shared state: could not share %s: %s: %s", syncer.key, type(exc).__name__, exc)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "status": "degraded" if self.degraded else "ok",
            "degraded_since": self.degraded_since,
            "last_error": self.last_error,
            "outages": self.outages,
            "leading": sorted(self.leading),
            "shared": [
                "rate_limits",
                "upstream_blocks",
                "circuit_breakers",
                *(["demotions"] if self.health is not None else []),
                *(["bandits"] if self.bandits else []),
                "leader",
            ],
            "shared_bandits": [b.step.name for b in self.bandits],
        }


class BreakerSync:
    """The other replicas' circuit-breaker openings, read each second with the rest of the
    watcher's pipeline (a replica writes its own openings and closings as they happen)."""

    def __init__(self, breakers: Any, state: SharedState) -> None:
        self.breakers = breakers
        self.state = state
        self.key = f"{state.prefix}:breakers"

    def queue(self, pipe: Any) -> int:
        pipe.hgetall(self.key)
        return 1

    def apply(self, replies: list[Any]) -> None:
        now, open_now, stale = time.time(), set(), []
        for raw_id, raw_until in replies[0].items():
            combo_id, until = raw_id.decode(), float(raw_until)
            if until > now:
                open_now.add(combo_id)
                self.breakers.opened_elsewhere(combo_id, until - now)
            elif until < now - 60:
                stale.append(raw_id)
        for combo_id in self.breakers.remote_ids():
            if combo_id not in open_now:
                self.breakers.closed_elsewhere(combo_id)
        if stale:
            command = self.state.client.hdel(self.key, *stale)
            self.state.spawn(self.state._quietly(command))


RESERVE_MAX = 256  # requests one reserve may hold


class SharedLimiter(ProviderLimiter):
    """A provider's limits kept in Redis; its own buckets serve while Redis is away.

    While a limit is far from binding, a busy replica takes a small *reserve* in one round trip
    (several requests' slots and their tokens, spent within `lease` seconds) instead of asking
    for each request: the reserve doubles while it runs out early and shrinks to what was used
    when it lapses; what it did not spend goes back with the next take. Near the limit every
    request asks for itself (see TAKE)."""

    def __init__(
        self, provider: str, rpm: float | None, tpm: float | None, state: SharedState, *, lease: float = 0.0
    ) -> None:
        super().__init__(rpm, tpm)
        self.state = state
        self.keys = [f"{state.prefix}:limits:{provider}", f"{state.prefix}:blocked:{provider}"]
        self.keys.append(f"{state.prefix}:window:{provider}")
        self._caps = [self.rpm.capacity if self.rpm else 0, float(tpm or 0)]
        self._window = self.rpm.window if self.rpm else 60.0
        self.pending = 0.0  # tpm corrections not yet sent: they ride on the next take
        self.lease = lease  # a reserve's lifetime, seconds (0: every request asks Redis)
        self._slots = 0  # the reserve: requests this replica may still send without asking
        self._tokens = 0.0  # and their tokens
        self._until = 0.0  # when the reserve lapses (monotonic)
        self._stamp = ""  # how Redis stamped its slots
        self._granted = 0
        self._want = 1  # requests the next reserve asks for
        self._renewing: asyncio.Future[None] | None = None
        self._asked = -1.0  # when a request last asked Redis (monotonic)
        self._reserving = False  # whether the last renewal got a reserve
        self._back: list[Any] = []  # (count, stamp) pairs of lapsed reserves' unspent slots
        state.limiters.append(self)

    def _spend(self, tokens: int) -> bool:
        """Take one request from the reserve, if it still holds one with enough tokens."""
        now = time.monotonic()
        if now >= self._until or self._tokens < tokens or now < self.upstream_blocked_until:
            return False
        self._slots -= 1
        self._tokens -= tokens
        return True

    def _retire(self) -> None:
        """End the reserve: its unspent slots and tokens go back with the next take, and the
        next reserve is sized on how fast this one went."""
        if not self._granted:
            return
        if self._slots:
            self._back.extend((self._slots, self._stamp))
            self.pending -= self._tokens  # a negative correction gives tokens back
            self._want = max(1, self._granted - self._slots)
        elif time.monotonic() < self._until:  # spent before it lapsed: ask for more
            self._want = min(RESERVE_MAX, 2 * self._granted)
        self._slots, self._tokens, self._granted = 0, 0.0, 0

    async def acquire(self, tokens: int) -> float:
        tokens = max(tokens, 0)
        if self._slots and self._spend(tokens):
            return 0.0
        if not self.lease or self.state.degraded:
            return await self._take(tokens, 1)
        while self._renewing is not None:  # one reserve at a time: wait for it
            try:  # shielded: a waiter cancelled (its client gone) cancels only itself
                await asyncio.wait_for(asyncio.shield(self._renewing), 2 * self.state.timeout)
            except TimeoutError:  # the renewal is stuck (its batch is bounded by one timeout): ask alone
                return await self._take(tokens, 1)
            if self._slots and self._spend(tokens):
                return 0.0
            if not self._reserving:  # it got no reserve (the limit is near): ask alone
                return await self._take(tokens, 1)
            # spent already by the others who waited: the next one asks for a bigger reserve
        now, asked = time.monotonic(), self._asked
        self._asked = now
        if now - asked >= self.lease and not self._granted:  # not busy: no reserve to waste
            return await self._take(tokens, 1)
        self._renewing = renewing = asyncio.get_running_loop().create_future()
        try:
            self._retire()
            return await self._take(tokens, max(self._want, 2))
        finally:
            self._renewing = None
            if not renewing.done():
                renewing.set_result(None)

    async def _take(self, tokens: int, wanted: int) -> float:
        sent, back = self.pending, self._back
        self._back = []
        started = time.monotonic()
        reply = await self.state.take(
            self.keys, [*self._caps, tokens, sent, "1", self._window, wanted, self.lease, *back]
        )
        if reply is None:
            self._back[:0] = back  # Redis may still hold them: given back once it answers
            return self.try_acquire(tokens)  # local buckets meanwhile
        self.pending -= sent  # corrections made while it was out go with the next one
        wait, granted = float(reply[0]), int(reply[1])
        if wanted > 1:
            self._reserving = granted > 1
        if wait > 0 or granted < 2:
            return wait
        self._slots, self._granted = granted - 1, granted
        self._tokens = min(tokens, self._caps[1]) * (granted - 1)
        self._until = started + self.lease  # before Redis stamped them: spent in time
        stamp = reply[2]
        self._stamp = stamp.decode() if isinstance(stamp, bytes) else str(stamp)
        return 0.0

    def settle(self, estimated: int, actual: int) -> None:
        super().settle(estimated, actual)  # the local buckets stay close, for an outage
        if self.tpm is not None:
            taken = min(max(estimated, 0), self.tpm.capacity)
            self.pending += actual - taken

    def block_for(self, seconds: float) -> None:
        super().block_for(seconds)
        seconds = min(max(seconds, 0.0), MAX_UPSTREAM_BLOCK)
        if seconds > 0 and not self.state.degraded:
            ms = int(seconds * 1000)
            self.state.spawn(self.state.call(self.state._block, self.keys[1:2], [ms]))

    async def flush(self) -> None:
        """Send pending corrections, and what a lapsed reserve did not spend, of an idle provider
        (a busy one sends them with its takes)."""
        if self._granted and self._renewing is None and time.monotonic() >= self._until:
            self._retire()
        if self.state.degraded or not (self._back or (self.pending and self.tpm is not None)):
            return
        sent, back = self.pending, self._back
        self._back = []
        args = [*self._caps, 0, sent, "0", self._window, 1, self.lease, *back]
        if await self.state.take(self.keys, args) is None:
            self._back[:0] = back
        else:
            self.pending -= sent
