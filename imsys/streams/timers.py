"""Timers that fire once per slot across every process sharing the Redis.

A slot is a period of ``every`` seconds, aligned to the epoch. Each process wakes at the
slot; the first to ``SET NX`` the slot's key fires. A failing tick is logged and the
timer goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis

from imsys.backoff import REDIS_DOWN
from imsys.logging import redact_text
from imsys.streams.keys import Keys

log = structlog.get_logger("imsys.timers")

# A timer function receives its slot (epoch milliseconds).
TimerFn = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Timer:
    name: str
    fn: TimerFn
    every: float

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ValueError(f"timer {self.name}: every must be positive")

    # Slots are epoch milliseconds: sub-second periods stay exact.
    def slot_of(self, ts: float) -> int:
        """The slot that is current at ``ts`` (its start, epoch ms)."""
        step = int(self.every * 1000)
        return int(ts * 1000) // step * step

    def first_slot(self, ts: float) -> tuple[int, float]:
        """The slot to fire first and when: the current one at once (if nobody took it)."""
        return self.slot_of(ts), ts

    def next_slot(self, slot: int) -> int:
        return slot + int(self.every * 1000)

    def slot_ttl_ms(self) -> int:
        return int(max(self.every * 2, 60.0) * 1000)


class TimerRunner:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def claim(self, timer: Timer, slot: int) -> bool:
        """True for exactly one process per (timer, slot)."""
        return bool(
            await self.redis.set(
                self.keys.timer(timer.name, slot), "1", nx=True, px=timer.slot_ttl_ms()
            )
        )

    async def tick(self, timer: Timer, slot: int) -> bool:
        """Fire ``timer`` for ``slot`` if this process wins it; never raises."""
        try:
            if not await self.claim(timer, slot):
                return False
        except REDIS_DOWN as exc:
            log.warning("timer_skipped", timer=timer.name, slot=slot, error=redact_text(str(exc)))
            return False
        started = time.perf_counter()
        try:
            await timer.fn(slot)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("timer_failed", timer=timer.name, slot=slot, error=redact_text(repr(exc)))
        else:
            log.debug(
                "timer_fired",
                timer=timer.name,
                slot=slot,
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
        return True

    async def run(self, timer: Timer, stopping: asyncio.Event) -> None:
        slot, at = timer.first_slot(time.time())
        while not stopping.is_set():
            delay = at - time.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                    return
                except TimeoutError:
                    pass
            await self.tick(timer, slot)
            slot = timer.next_slot(slot)
            # A tick that overran whole slots skips them rather than firing a burst.
            now_ms = time.time() * 1000
            while timer.next_slot(slot) <= now_ms:
                slot = timer.next_slot(slot)
            at = slot / 1000
