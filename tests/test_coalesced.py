"""imsys.db.Coalesced: calls that arrive together run as one, each answered on its own."""

from __future__ import annotations

import asyncio

import pytest

from imsys.db import Coalesced


async def test_calls_queued_together_share_one_run() -> None:
    """Calls made while none runs yet go into one run, answered in their own order."""
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        return [i * 10 for i in items]

    c = Coalesced(run)
    assert await asyncio.gather(*(c(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert runs == [[0, 1, 2, 3, 4]]


async def test_same_key_never_shares_a_run() -> None:
    """Two items with one key go to two runs, in the order they came."""
    runs: list[list[str]] = []

    async def run(items: list[str]) -> list[str]:
        runs.append(items)
        return items

    c = Coalesced(run, key=lambda s: s[0])
    assert await asyncio.gather(c("a1"), c("b1"), c("a2")) == ["a1", "b1", "a2"]
    assert runs == [["a1", "b1"], ["a2"]]


async def test_most_caps_a_run() -> None:
    """No run takes more than ``most`` items; the rest follow in the next."""
    sizes: list[int] = []

    async def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    c = Coalesced(run, most=3, runners=1)
    assert await asyncio.gather(*(c(i) for i in range(7))) == list(range(7))
    assert sizes == [3, 3, 1]


async def test_a_failed_run_fails_its_items_only() -> None:
    """An exception from a run is every item's of that run; the next run still answers."""

    async def run(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("refused")
        return items

    c = Coalesced(run, most=2, runners=1)
    out = await asyncio.gather(c(0), c(1), c(2), return_exceptions=True)
    assert [type(o) for o in out[:2]] == [ValueError, ValueError]
    assert out[2] == 2


async def test_a_call_cancelled_while_queued_is_left_out() -> None:
    """A caller that goes away before its run starts is not in the run."""
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        return items

    c = Coalesced(run)
    gone = asyncio.create_task(c(1))
    await asyncio.sleep(0)  # queued; its run has not started
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await c(2) == 2
    assert runs == [[2]]
