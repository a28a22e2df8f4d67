"""Timer slot arithmetic and the cron-like schedule."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imsys.streams.timers import Cron, Timer


async def _noop(slot: int) -> None:
    return None


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_every_slots_are_aligned_epoch_milliseconds() -> None:
    """An `every` timer's slots start on multiples of its period, in epoch ms."""
    t = Timer("t", _noop, every=15 * 60)
    slot = t.slot_of(ts("2026-11-22T10:07:30"))
    assert slot == int(ts("2026-11-22T10:00:00") * 1000)
    assert t.next_slot(slot) == int(ts("2026-11-22T10:15:00") * 1000)


def test_first_every_slot_fires_at_once() -> None:
    """A starting process fires the current slot at once (the slot key keeps it single)."""
    t = Timer("t", _noop, every=60)
    now = ts("2026-11-22T10:07:30")
    slot, at = t.first_slot(now)
    assert at == now
    assert slot == int(ts("2026-11-22T10:07:00") * 1000)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("*/15 * * * *", "2026-11-22T10:07:30", "2026-11-22T10:15:00"),
        ("0 2 * * *", "2026-11-22T10:07:30", "2026-11-23T02:00:00"),
        ("30 8 1 * *", "2026-11-22T10:07:30", "2026-12-01T08:30:00"),
        ("0 9 * * 1-5", "2026-11-21T10:00:00", "2026-11-23T09:00:00"),  # Saturday → Monday
        ("0 0 1 1 *", "2026-11-22T10:07:30", "2027-01-01T00:00:00"),
        ("5,35 * * * *", "2026-11-22T10:07:30", "2026-11-22T10:35:00"),
        ("0 12 * * 0", "2026-11-22T12:00:00", "2026-11-29T12:00:00"),  # Sunday, strictly after
        ("0 12 * * 7", "2026-11-23T00:00:00", "2026-11-29T12:00:00"),  # 7 is Sunday too
    ],
)
def test_cron_next_after(expr: str, after: str, expected: str) -> None:
    """Cron expressions find the next matching minute, in UTC."""
    assert Cron(expr).next_after(ts(after)) == ts(expected)


def test_cron_day_fields_are_either_or_when_both_restricted() -> None:
    """With both day-of-month and day-of-week restricted, either one matches (classic cron)."""
    cron = Cron("0 0 13 * 5")
    assert cron.matches(datetime(2026, 11, 13, tzinfo=UTC))  # the 13th (a Friday anyway)
    assert cron.matches(datetime(2026, 11, 20, tzinfo=UTC))  # a Friday
    assert cron.matches(datetime(2026, 12, 13, tzinfo=UTC))  # the 13th, a Sunday
    assert not cron.matches(datetime(2026, 12, 14, tzinfo=UTC))


@pytest.mark.parametrize(
    "expr", ["* * * *", "61 * * * *", "*/0 * * * *", "5-1 * * * *", "a * * * *"]
)
def test_cron_rejects_bad_expressions(expr: str) -> None:
    """A malformed cron expression fails at registration, not at 2 a.m."""
    with pytest.raises(ValueError):
        Cron(expr)


def test_cron_timer_slots_follow_the_schedule() -> None:
    """A cron timer's first slot is the next match; its slots step through matches."""
    t = Timer("t", _noop, cron=Cron("*/10 * * * *"))
    slot, at = t.first_slot(ts("2026-11-22T10:07:30"))
    assert at == ts("2026-11-22T10:10:00")
    assert t.next_slot(slot) == int(ts("2026-11-22T10:20:00") * 1000)


def test_timer_needs_exactly_one_schedule() -> None:
    """Giving both or neither of every/cron is a configuration error."""
    with pytest.raises(ValueError, match="exactly one"):
        Timer("t", _noop)
    with pytest.raises(ValueError, match="exactly one"):
        Timer("t", _noop, every=1, cron=Cron("* * * * *"))
