"""A circuit breaker per router, shared by every process through Redis.

A router that stops answering is left alone for a cool-down (doubling each time it fails
again); its jobs are deferred without spending attempts. When the cool-down ends, one job
probes; its success closes the circuit for everyone.
"""

from __future__ import annotations

import random
import time

from redis.asyncio import Redis

from imsys.errors import Deferred
from imsys.streams.keys import Keys


class RouterCircuit:
    def __init__(
        self, redis: Redis, keys: Keys, *, cooldown_s: float, max_s: float, probe_s: float
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.cooldown_s = cooldown_s
        self.max_s = max_s
        self.probe_ms = int(probe_s * 1000)

    def _key(self, router_id: int) -> str:
        return self.keys.router_circuit(router_id)

    def _probe_key(self, router_id: int) -> str:
        return self.keys.router_probe(router_id)

    async def state(self, router_id: int) -> dict[str, float]:
        raw: dict[str, str] = await self.redis.hgetall(self._key(router_id))  # type: ignore[assignment]
        return {k: float(v) for k, v in raw.items()}

    async def check(self, router_id: int) -> None:
        """Raise Deferred while the router is known down; let one probe through after."""
        state = await self.state(router_id)
        if not state:
            return
        now = time.time()
        open_until = state.get("open_until", 0.0)
        if open_until > now:
            raise Deferred(
                f"router {router_id} is not answering; waiting for it",
                delay=open_until - now + random.uniform(0, 1),
            )
        if not await self.redis.set(self._probe_key(router_id), "1", nx=True, px=self.probe_ms):
            raise Deferred(f"router {router_id} is being probed", delay=random.uniform(0.5, 2.0))

    async def failure(self, router_id: int) -> float:
        """Open (or re-open, longer) the circuit; returns the cool-down in seconds."""
        failures = int(await self.redis.hincrby(self._key(router_id), "failures", 1))
        cooldown = float(min(self.cooldown_s * 2 ** (failures - 1), self.max_s))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._key(router_id), "open_until", time.time() + cooldown)
        pipe.delete(self._probe_key(router_id))
        await pipe.execute()
        return cooldown

    async def success(self, router_id: int) -> bool:
        """Close the circuit; True when it was open (the router is back)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self._key(router_id))
        pipe.delete(self._probe_key(router_id))
        removed, _ = await pipe.execute()
        return bool(removed)
