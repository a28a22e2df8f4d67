"""A circuit breaker per router, shared by every process through Redis.

A router that stops answering is left alone for a pause taken from the outage schedule
(the seed's "retry after 10 s, then 1 min, then 5 min, until the router comes back
online": ``sync.circuit_schedule_s``, whose last step repeats); its jobs are deferred
without spending attempts. When the pause ends, one job probes; its success closes the
circuit for everyone, its failure opens it for the next step of the schedule.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from imsys.errors import Deferred
from imsys.streams.keys import Keys

# One step of the schedule per failed probe. A failure reported while the circuit is
# still open (jobs that were already talking to the router when it went down, the facts
# timer) is the same outage, not a failed probe: it does not move the schedule on, so
# five jobs failing together still pause the router 10 s, not 5 steps' worth.
_FAIL = """
local now = tonumber(ARGV[1])
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until > now then
  return {redis.call('HGET', KEYS[1], 'failures') or '0', tostring(open_until - now)}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local n = #ARGV - 2
local step = tonumber(ARGV[2 + math.min(failures, n)])
local pause = math.min(step, tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'open_until', tostring(now + pause), 'cooldown', tostring(pause))
redis.call('DEL', KEYS[2])
return {tostring(failures), tostring(pause)}
"""


class RouterCircuit:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        schedule: Sequence[float],
        max_s: float,
        probe_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not schedule:
            raise ValueError("the outage schedule needs at least one pause")
        self.redis = redis
        self.keys = keys
        self.schedule = [float(s) for s in schedule]
        self.max_s = max_s
        self.probe_ms = int(probe_s * 1000)
        # Wall clock by default (the open-until instant is shared by every host); a test
        # passes its own to walk an outage through the schedule without waiting.
        self.clock = clock

    def _key(self, router_id: int) -> str:
        return self.keys.router_circuit(router_id)

    def _probe_key(self, router_id: int) -> str:
        return self.keys.router_probe(router_id)

    async def state(self, router_id: int) -> dict[str, float]:
        """``failures`` (failed probes in a row), ``open_until`` (epoch s) and
        ``cooldown`` (the pause the last failure chose); empty while closed."""
        raw: dict[str, str] = await self.redis.hgetall(self._key(router_id))  # type: ignore[assignment]
        return {k: float(v) for k, v in raw.items()}

    async def check(self, router_id: int) -> None:
        """Raise Deferred while the router is known down; let one probe through after."""
        state = await self.state(router_id)
        if not state:
            return
        now = self.clock()
        open_until = state.get("open_until", 0.0)
        if open_until > now:
            raise Deferred(
                f"router {router_id} is not answering; waiting for it",
                delay=open_until - now + random.uniform(0, 1),
            )
        if not await self.redis.set(self._probe_key(router_id), "1", nx=True, px=self.probe_ms):
            raise Deferred(f"router {router_id} is being probed", delay=random.uniform(0.5, 2.0))

    async def failure(self, router_id: int) -> float:
        """Open (or re-open, at the schedule's next step) the circuit; returns the pause
        in seconds until the next probe."""
        args = [repr(self.clock()), repr(self.max_s), *(repr(s) for s in self.schedule)]
        _, pause = await self.redis.eval(
            _FAIL, 2, self._key(router_id), self._probe_key(router_id), *args
        )
        return float(pause)

    async def success(self, router_id: int) -> bool:
        """Close the circuit; True when it was open (the router is back)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self._key(router_id))
        pipe.delete(self._probe_key(router_id))
        removed, _ = await pipe.execute()
        return bool(removed)
