"""A per-key concurrency limit that holds across processes ("at most 5 jobs per router").

Each holder takes a leased slot in a sorted set; the holder refreshes its lease while it
runs, so a slot held by a process that died frees itself when the lease runs out.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from imsys.errors import Deferred
from imsys.streams.keys import Keys
from imsys.streams.scripts import Scripts


class KeyLimiter:
    def __init__(
        self, redis: Redis, keys: Keys, scripts: Scripts, *, lease_s: float, wait_s: float
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.lease_ms = int(lease_s * 1000)
        self.wait_s = wait_s
        self.held: dict[str, str] = {}  # token → key

    async def try_acquire(self, key: str, limit: int, token: str) -> bool:
        got = await self.scripts.acquire(
            keys=[self.keys.limit(key)], args=[int(time.time() * 1000), self.lease_ms, limit, token]
        )
        if got:
            self.held[token] = key
        return bool(got)

    async def release(self, key: str, token: str) -> None:
        self.held.pop(token, None)
        await self.redis.zrem(self.keys.limit(key), token)

    @asynccontextmanager
    async def slot(self, key: str, limit: int, *, wait: float | None = None) -> AsyncIterator[None]:
        """Hold one of ``limit`` slots for ``key``; wait a little, then defer the job."""
        token = secrets.token_hex(8)
        deadline = time.monotonic() + (self.wait_s if wait is None else wait)
        pause = 0.01
        while not await self.try_acquire(key, limit, token):
            if time.monotonic() >= deadline:
                raise Deferred(f"concurrency limit {limit} reached for {key}", delay=1.0)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
        try:
            yield
        finally:
            await asyncio.shield(self.release(key, token))

    async def refresh(self) -> None:
        """Extend the leases this process holds (called by the engine's heartbeat)."""
        if not self.held:
            return
        expires = int(time.time() * 1000) + self.lease_ms
        pipe = self.redis.pipeline(transaction=False)
        for token, key in list(self.held.items()):
            pipe.zadd(self.keys.limit(key), {token: expires}, xx=True)
            pipe.pexpire(self.keys.limit(key), self.lease_ms)
        await pipe.execute()


class RateLimiter:
    """A steady rate per key (e.g. 10 SMS a second) shared by every process."""

    def __init__(self, keys: Keys, scripts: Scripts) -> None:
        self.keys = keys
        self.scripts = scripts

    async def reserve(self, key: str, per_second: float, *, max_wait: float) -> float:
        """Seconds to wait before going ahead (a slot is reserved), or raise Deferred
        when the next free slot is further off than ``max_wait``."""
        step_ms = max(1, int(1000 / per_second))
        wait = int(
            await self.scripts.rate(
                keys=[self.keys.limit(f"rate:{key}")],
                args=[int(time.time() * 1000), step_ms, int(max_wait * 1000)],
            )
        )
        if wait < 0:
            raise Deferred(f"send rate {per_second}/s for {key} is taken", delay=-wait / 1000)
        return wait / 1000

    async def acquire(self, key: str, per_second: float, *, max_wait: float = 2.0) -> None:
        """Wait for this caller's turn at the shared rate."""
        delay = await self.reserve(key, per_second, max_wait=max_wait)
        if delay > 0:
            await asyncio.sleep(delay)
