"""Timer slot arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imsys.streams.timers import Timer


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


def test_a_timer_needs_a_positive_period() -> None:
    """A timer with no positive period is refused when it is declared."""
    with pytest.raises(ValueError, match="every must be positive"):
        Timer("t", _noop, every=0)


