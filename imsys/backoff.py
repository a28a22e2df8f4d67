"""Reconnect backoff for every loop that rides out an outage (not the job retry policy)."""

from __future__ import annotations

import asyncio
import random

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What "Redis is away" looks like from redis-py; anything else is a bug or a bad command.
# READONLY and MASTERDOWN come from a node that is (or just became) a replica during a
# failover: not the command's fault, so wait and reconnect (through Sentinel, to the new
# primary) as for a lost connection.
REDIS_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    MasterDownError,
    ConnectionError,
    OSError,
)


class Backoff:
    """Exponential delay with full jitter, reset on success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def reset(self) -> bool:
        """Forget past failures; True when there were any (a recovery worth logging)."""
        had = self.failures > 0
        self.failures = 0
        return had

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.cap, self.first * 2 ** min(self.failures, 16))
        return random.uniform(ceiling / 2, ceiling)

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())
