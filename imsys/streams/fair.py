"""A send rate shared fairly between tenants, with urgent items (OTPs) ahead of bulk.

A stream is first in, first out: one tenant's 10,000 reminders queued before another
tenant's 40 would all go first, and an OTP would wait behind them. `FairShare` orders
the sends of one key (a channel on one provider account) by virtual time instead:

- each tenant's items are numbered 0, 1, 2... from the key's virtual time when the
  tenant joins (start-time fair queueing), so with two tenants sending their items
  alternate, whatever order the stream held them in;
- a priority item is numbered ahead of every bulk one (first in, first out among them);
- an item goes when it is at the head of that order (within ``slack``) and the key's
  steady rate (GCRA, as `RateLimiter`) has a slot free within ``slack``.

An item not due within ``hold_s`` (or two turns) raises `Deferred` for about its wait, keeping
its place: the consumer slot it held reads further down the stream, so later tenants'
items join the order instead of waiting behind the first tenant's run. An item still
away when its turn comes steps aside (the next one goes) and takes its place back at
the head when it returns; one whose holder never asks again (its process died, its job
was dropped) is forgotten ``lease_s`` after its turn.
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from imsys.errors import Deferred
from imsys.streams.keys import Keys

__all__ = ["FairShare"]

# KEYS: 1 order (zset item → virtual time), 2 leases (zset item → µs it must ask by),
#       3 marks (hash: tenant → its next virtual time, '_v' → virtual time of the last
#         bulk item sent, '_p' → priority items numbered), 4 rate (GCRA: next free µs),
#       5 away (zset: item deferred → µs of its turn), 6 parked (hash: item away past its
#         turn → its virtual time, to take back when it returns).
# ARGV: now µs, item, tenant, step µs, priority (0|1), slack µs, lease µs, keep ms,
#       hold µs.
# Returns {1, µs to wait before sending} (the slot is taken) or {0, µs until due}.
# Times in µs pass 14 digits: written with %d, as Lua's own number-to-text rounds them.
_TURN = """
local now, item, step = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[4])
local slack, lease, hold = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[9])
for _, g in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 100)) do
  if g ~= item then
    redis.call('ZREM', KEYS[1], g)
    redis.call('ZREM', KEYS[2], g)
    redis.call('ZREM', KEYS[5], g)
    redis.call('HDEL', KEYS[6], g)
  end
end
for _, g in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[1], 'LIMIT', 0, 100)) do
  local v = redis.call('ZSCORE', KEYS[1], g)
  if v and g ~= item then
    redis.call('HSET', KEYS[6], g, v)
    redis.call('ZREM', KEYS[1], g)
  end
  redis.call('ZREM', KEYS[5], g)
end
redis.call('ZREM', KEYS[5], item)
local vt = redis.call('ZSCORE', KEYS[1], item)
if not vt then
  vt = redis.call('HGET', KEYS[6], item)
  if vt then
    redis.call('HDEL', KEYS[6], item)
  elseif ARGV[5] == '1' then
    vt = -1e12 + redis.call('HINCRBY', KEYS[3], '_p', 1)
  else
    local v = tonumber(redis.call('HGET', KEYS[3], '_v') or '0')
    local t = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
    vt = math.max(v, t)
    redis.call('HSET', KEYS[3], ARGV[3], vt + 1)
  end
  redis.call('ZADD', KEYS[1], vt, item)
end
vt = tonumber(vt)
local rank = redis.call('ZRANK', KEYS[1], item)
-- Turns missed while nobody was ready (an item back late) are made up, two at most.
local tat = tonumber(redis.call('GET', KEYS[4]) or now)
if tat < now - 2 * step then tat = now - 2 * step end
local eta = math.max(tat - now, 0) + rank * step
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6]}) do
  redis.call('PEXPIRE', k, ARGV[8])
end
if eta <= slack then
  redis.call('SET', KEYS[4], string.format('%d', tat + step), 'PX',
             math.ceil(math.max(tat + step - now, 0) / 1000) + 1000)
  redis.call('ZREM', KEYS[1], item)
  redis.call('ZREM', KEYS[2], item)
  if vt >= 0 and vt > tonumber(redis.call('HGET', KEYS[3], '_v') or '0') then
    redis.call('HSET', KEYS[3], '_v', vt)
  end
  return {1, math.max(tat - now, 0)}
end
if eta > hold and ARGV[5] ~= '1' then
  redis.call('ZADD', KEYS[5], string.format('%d', now + eta), item)
end
redis.call('ZADD', KEYS[2], string.format('%d', now + eta + lease), item)
return {0, eta}
"""

# Marks outlive any queue: a key idle this long starts again from zero.
_KEEP_MS = 24 * 3600 * 1000


class FairShare:
    """Turns at one key's rate, fair between tenants, priority items first; every
    process that shares the Redis shares the order."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        hold_s: float = 0.1,
        slack_s: float = 0.02,
        lease_s: float = 10.0,
    ) -> None:
        self.keys = keys
        self.hold_s = hold_s
        self.slack_us = int(slack_s * 1e6)
        self.lease_us = int(lease_s * 1e6)
        self._turn = redis.register_script(_TURN)

    def _keys(self, key: str) -> list[str]:
        base = self.keys.limit(f"fair:{key}")
        return [f"{base}:order", f"{base}:leases", f"{base}:marks",
                self.keys.limit(f"rate:{key}"), f"{base}:away", f"{base}:parked"]

    async def turn(
        self, key: str, item: str, tenant: str, per_second: float, *, priority: bool = False
    ) -> None:
        """Wait for ``item``'s turn at ``key``'s rate; raise `Deferred` (its place kept)
        when a bulk item's turn is further off than ``hold_s``. ``item`` names one send and must be
        the same on every delivery of its job; ``tenant`` is whose share it takes."""
        step_us = max(1, int(1e6 / per_second))
        # Sleep through the next two turns at most: a job further back gives its
        # consumer slot up, so the stream is read on to the other tenants' messages.
        hold = max(self.hold_s, 2 * step_us / 1e6)
        keys = self._keys(key)
        while True:
            go, wait_us = await self._turn(
                keys=keys,
                args=[int(time.time() * 1e6), item, tenant, step_us, int(priority),
                      self.slack_us, self.lease_us, _KEEP_MS, int(hold * 1e6)],
            )
            wait = int(wait_us) / 1e6
            if int(go):
                if wait > 0:
                    await asyncio.sleep(wait)
                return
            # A priority item waits here: it is at the head, its wait is short.
            if wait > hold and not priority:
                # Back a little before the turn, to wait the rest here.
                raise Deferred(f"turn at {key} in {wait:.1f}s", delay=wait - hold / 2)
            await asyncio.sleep(max(wait - self.slack_us / 1e6, 0.002))
