"""``job_id`` bookkeeping: one job per id while it waits or runs.

A producer's ``job_id`` is an idempotency key. For each live one, Redis holds a mark
``<prefix>:dedupe:<stream>:<job_id>`` whose value says where the job is:

- an entry id: the job waits in the stream or runs (``ENQUEUE`` and ``PROMOTE`` set it,
  ``CLAIM_JOB_IDS`` sets it for entries a producer added with a raw XADD, ``RELEASE``
  moves it to the fresh copy);
- ``delayed:<due ms>``: the job waits in the delayed store (``ENQUEUE`` with a delay,
  ``RETRY``);
- gone: the job finished (``ACK``) or was dead-lettered (``DEAD``) — each clears the mark
  only if it still points at its own entry, so a newer job's mark survives.

A mark is live while its entry still exists, or, for a delayed one, until
``DEDUPE_STALE_MS`` past its due time (a delayed job that never came back is gone). The
Lua below is the one test of liveness every script shares.
"""

from __future__ import annotations

from typing import Final

# A delayed mark older than its due time by this much belongs to a job that is gone.
DEDUPE_STALE_MS: Final = 3_600_000

# Is the job a mark points at still waiting or running?
MARK_LIVE_LUA: Final = """
local function mark_live(stream, v, now, stale_ms)
  if string.sub(v, 1, 8) == 'delayed:' then
    return tonumber(string.sub(v, 9)) + stale_ms > now
  end
  return #redis.call('XRANGE', stream, v, v) > 0
end
"""
