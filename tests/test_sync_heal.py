"""Heal at once: a router that restarted or came back from offline is reconciled now,
not at the 15-minute timer, and its drifted subscribers stop showing 'synced'."""

from __future__ import annotations

import pytest

from imsys.sync.desired import restarted, uptime_seconds
from imsys.sync.reconcile import router_facts
from imsys.sync.repo import load_router
from tests.sync_support import Stack

SECRET = "/ppp/secret"


def wipe(stack: Stack) -> None:
    """What a reset (or a replacement router) leaves: none of the configuration."""
    for entry in stack.sim.items(SECRET):
        stack.sim.state.execute(SECRET, "remove", {".id": entry[".id"]}, [])


async def facts(stack: Stack) -> None:
    """One tick of the router facts timer, for this test's router."""
    await router_facts(stack.sync, await load_router(stack.db, stack.router_id))


async def statuses(stack: Stack, ids: list[int]) -> set[str]:
    rows = await stack.db.fetch("SELECT sync_status FROM subscribers WHERE id = ANY($1)", ids)
    return {r["sync_status"] for r in rows}


async def queued_reconciliations(stack: Stack) -> list[str]:
    rows = await stack.db.fetch("SELECT job_id FROM outbox WHERE type = 'sync_router'")
    return [r["job_id"] for r in rows]


async def test_router_reset_while_online_is_healed_without_the_timer(stack: Stack) -> None:
    """Uptime going back (a reset keeps the router online) queues its reconciliation: the
    missing subscribers turn pending, then synced and back on the router."""
    ids = [await stack.add_subscriber(f"reset{i}") for i in range(5)]
    await stack.settle()
    stack.sim.set_resource(uptime="1w2d3h4m5s")
    await facts(stack)
    assert await queued_reconciliations(stack) == []

    wipe(stack)
    stack.sim.set_resource(uptime="12s")
    await facts(stack)
    assert await queued_reconciliations(stack) == [f"sync_router:{stack.router_id}"]
    assert await statuses(stack, ids) == {"synced"}  # nothing known yet: no false state

    await stack.relay.relay_once()
    assert await stack.engine.consumers["sync"].process_once(block_ms=10)  # runs sync_router
    assert await statuses(stack, ids) == {"pending"}
    await stack.settle()
    assert await statuses(stack, ids) == {"synced"}
    assert sorted(stack.secrets()) == [f"reset{i}" for i in range(5)]


async def test_router_back_from_offline_empty_is_healed(stack: Stack) -> None:
    """A router that comes back from offline (replaced, restored empty) is reconciled at
    once: every subscriber is back on it and synced."""
    ids = [await stack.add_subscriber(f"back{i}") for i in range(4)]
    await stack.settle()
    await stack.sim.go_down()
    await facts(stack)
    assert (await load_router(stack.db, stack.router_id))["online"] is False  # type: ignore[index]
    wipe(stack)
    await stack.sim.come_up()
    await facts(stack)
    assert await queued_reconciliations(stack) == [f"sync_router:{stack.router_id}"]
    await stack.settle()
    assert await statuses(stack, ids) == {"synced"}
    assert sorted(stack.secrets()) == [f"back{i}" for i in range(4)]


async def test_router_that_stays_up_queues_no_reconciliation(stack: Stack) -> None:
    """Facts from a router whose uptime only grows queue nothing."""
    stack.sim.set_resource(uptime="3d")
    await facts(stack)
    stack.sim.set_resource(uptime="3d1m")
    await facts(stack)
    assert await queued_reconciliations(stack) == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1w2d3h4m5s", 7 * 86400 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("3d", 3 * 86400),
        ("45s", 45),
        ("4m5s120ms", 245.12),
        ("1d02:03:04", 86400 + 2 * 3600 + 3 * 60 + 4),
        ("00:00:07", 7),
        ("", None),
        (None, None),
        ("soon", None),
        ("5s garbage", None),
    ],
)
def test_uptime_is_read_as_routeros_prints_it(text: str | None, seconds: float | None) -> None:
    """RouterOS uptimes (`1w2d3h4m5s`, old `1d02:03:04`) become seconds; anything else None."""
    assert uptime_seconds(text) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("before", "after", "elapsed", "expected"),
    [
        ("1w2d3h4m5s", "12s", 5.0, True),  # uptime went backwards
        ("3d", "3d5s", 5.0, False),  # grew as time passed
        ("3d", "3d", 0.0, False),  # the same reading twice
        ("3d", "3d10m", 3600.0, True),  # back up an hour ago, before this reading
        ("3d", "3d10m", None, False),  # no time reference: only backwards counts
        ("3d", "3d59m30s", 3600.0, False),  # within the slack: measurement noise
        (None, "5s", 5.0, False),  # first reading
        ("3d", "unknown", 5.0, False),  # unreadable: no decision on a guess
    ],
)
def test_restart_is_uptime_going_back(
    before: str | None, after: str, elapsed: float | None, expected: bool
) -> None:
    """A restart is an uptime lower than before, or one that grew far less than the time
    that passed; a growing uptime or an unreadable one is not."""
    assert restarted(before, after, elapsed) is expected
