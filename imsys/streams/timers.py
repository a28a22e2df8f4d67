"""Timers that fire once per slot across every process sharing the Redis.

A slot is a period of ``every`` seconds (aligned to the epoch) or a minute matched by a
cron expression. Each process wakes at the slot; the first to ``SET NX`` the slot's key
fires. A failing tick is logged and the timer goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from redis.asyncio import Redis

from imsys.logging import redact_text
from imsys.streams.backoff import REDIS_DOWN
from imsys.streams.keys import Keys

log = structlog.get_logger("imsys.timers")

# A timer function receives its slot (epoch milliseconds).
TimerFn = Callable[[int], Awaitable[None]]


class Cron:
    """A five-field cron expression (minute hour day-of-month month day-of-week), in UTC.

    Supports ``*``, lists ``a,b``, ranges ``a-b`` and steps ``*/n`` / ``a-b/n``; day of week
    0-6 with 0 = Sunday (7 accepted as Sunday too).
    """

    _RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))

    def __init__(self, expr: str) -> None:
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(f"cron expression needs 5 fields, got {len(parts)}: {expr!r}")
        self.expr = expr
        sets = [self._field(p, lo, hi) for p, (lo, hi) in zip(parts, self._RANGES, strict=True)]
        self.minutes, self.hours, self.days, self.months, dows = sets
        self.dows = {d % 7 for d in dows}
        self.any_day = parts[2] == "*"
        self.any_dow = parts[4] == "*"

    @staticmethod
    def _field(text: str, lo: int, hi: int) -> set[int]:
        out: set[int] = set()
        for item in text.split(","):
            body, _, step_text = item.partition("/")
            step = int(step_text) if step_text else 1
            if body == "*":
                start, end = lo, hi
            elif "-" in body:
                a, b = body.split("-", 1)
                start, end = int(a), int(b)
            else:
                start = int(body)
                end = hi if step_text else start
            if not (lo <= start <= end <= hi) or step < 1:
                raise ValueError(f"cron field {text!r} out of range {lo}-{hi}")
            out.update(range(start, end + 1, step))
        return out

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minutes or t.hour not in self.hours or t.month not in self.months:
            return False
        day_ok = t.day in self.days
        dow_ok = (t.isoweekday() % 7) in self.dows
        # Classic cron: when both day fields are restricted, either may match.
        if self.any_day or self.any_dow:
            return day_ok and dow_ok
        return day_ok or dow_ok

    def next_after(self, ts: float) -> float:
        t = datetime.fromtimestamp(ts, UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(366 * 24 * 60 * 4):
            if self.matches(t):
                return t.timestamp()
            t += timedelta(minutes=1)
        raise ValueError(f"cron expression {self.expr!r} never matches")


@dataclass(frozen=True)
class Timer:
    name: str
    fn: TimerFn
    every: float | None = None
    cron: Cron | None = None

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ValueError(f"timer {self.name}: give exactly one of every= or cron=")
        if self.every is not None and self.every <= 0:
            raise ValueError(f"timer {self.name}: every must be positive")

    # Slots are epoch milliseconds: sub-second periods stay exact.
    def slot_of(self, ts: float) -> int:
        """The slot that is current at ``ts`` (its start, epoch ms)."""
        ms = int(ts * 1000)
        if self.every is not None:
            step = int(self.every * 1000)
            return ms // step * step
        return ms // 60_000 * 60_000

    def first_slot(self, ts: float) -> tuple[int, float]:
        """The slot to fire first and when: the current one at once (if nobody took it)."""
        if self.every is not None:
            return self.slot_of(ts), ts
        assert self.cron is not None
        minute = datetime.fromtimestamp(ts, UTC).replace(second=0, microsecond=0)
        if self.cron.matches(minute):
            return int(minute.timestamp() * 1000), ts
        nxt = self.cron.next_after(ts)
        return int(nxt * 1000), nxt

    def next_slot(self, slot: int) -> int:
        if self.every is not None:
            return slot + int(self.every * 1000)
        assert self.cron is not None
        return int(self.cron.next_after(slot / 1000) * 1000)

    def slot_ttl_ms(self) -> int:
        span = self.every if self.every is not None else 60.0
        return int(max(span * 2, 60.0) * 1000)


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
