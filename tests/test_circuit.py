"""The routers' outage cadence (seed 000: "retry after 10s, then 1m, then 5m, until the
router comes back online"): the circuit's state in real Redis, walked with a test clock
instead of real minutes, and the real sync session against a RouterOS simulator."""

from __future__ import annotations

import dataclasses

import pytest
from redis.asyncio import Redis

from imsys.errors import ConfigError, Deferred
from imsys.network import service
from imsys.settings import Settings, load_settings
from imsys.streams.keys import Keys
from imsys.sync.circuit import RouterCircuit
from imsys.sync.handlers import router_session
from imsys.sync.repo import load_router
from tests.sync_support import Stack

SEED_SCHEDULE = [10.0, 60.0, 300.0]


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_default_schedule_is_the_seeds() -> None:
    """Out of the box the outage schedule is 10 s, 1 min, 5 min, capped at 5 min."""
    sync = Settings().sync
    assert sync.circuit_schedule_s == SEED_SCHEDULE
    assert sync.circuit_max_s == 300.0


def test_schedule_is_configurable_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    """IMSYS_SYNC__CIRCUIT_SCHEDULE_S sets the schedule; an empty or non-positive one is refused."""
    monkeypatch.setenv("IMSYS_SYNC__CIRCUIT_SCHEDULE_S", "[5, 30]")
    assert load_settings(None).sync.circuit_schedule_s == [5.0, 30.0]
    for bad in ("[]", "[10, 0]"):
        monkeypatch.setenv("IMSYS_SYNC__CIRCUIT_SCHEDULE_S", bad)
        with pytest.raises(ConfigError, match="circuit_schedule_s"):
            load_settings(None)


async def test_failed_probes_walk_the_schedule_then_repeat_its_last_step(
    redis: Redis, prefix: str
) -> None:
    """Each failed probe opens the circuit for the next pause (10, 60, 300, then 300 again);
    the pause is recorded in Redis and a success starts the schedule over."""
    clock = Clock()
    circuit = RouterCircuit(
        redis, Keys(prefix), schedule=SEED_SCHEDULE, max_s=300.0, probe_s=30.0, clock=clock
    )
    seen = []
    for _ in range(5):
        await circuit.check(7)  # closed, or its pause is over: this job is the probe
        pause = await circuit.failure(7)
        state = await circuit.state(7)
        assert state["cooldown"] == pause
        assert state["open_until"] == clock.now + pause
        seen.append(pause)
        clock.now += pause
    assert seen == [10.0, 60.0, 300.0, 300.0, 300.0]
    assert await circuit.success(7) is True
    assert await circuit.state(7) == {}
    assert await circuit.failure(7) == 10.0


async def test_failures_during_an_open_circuit_do_not_advance_it(redis: Redis, prefix: str) -> None:
    """Jobs that fail together when a router drops (or the facts timer failing while the
    circuit is open) are one outage: the schedule moves only on a failed probe, and jobs
    are deferred until the pause ends."""
    clock = Clock()
    circuit = RouterCircuit(
        redis, Keys(prefix), schedule=SEED_SCHEDULE, max_s=300.0, probe_s=30.0, clock=clock
    )
    assert await circuit.failure(3) == 10.0
    clock.now += 4
    assert await circuit.failure(3) == pytest.approx(6.0)  # what is left of the pause
    assert (await circuit.state(3))["failures"] == 1
    with pytest.raises(Deferred) as deferred:
        await circuit.check(3)
    assert 6.0 <= deferred.value.delay <= 7.0
    clock.now += 6
    await circuit.check(3)  # the probe goes through
    with pytest.raises(Deferred, match="being probed"):
        await circuit.check(3)  # ...and only one
    assert await circuit.failure(3) == 60.0


async def test_max_caps_every_step(redis: Redis, prefix: str) -> None:
    """circuit_max_s caps each pause of the schedule (the demo's quick healing)."""
    clock = Clock()
    circuit = RouterCircuit(
        redis, Keys(prefix), schedule=SEED_SCHEDULE, max_s=30.0, probe_s=30.0, clock=clock
    )
    seen = []
    for _ in range(3):
        seen.append(await circuit.failure(1))
        clock.now += seen[-1]
    assert seen == [10.0, 30.0, 30.0]


async def test_down_router_is_retried_at_the_seed_cadence_until_it_is_back(stack: Stack) -> None:
    """A router refusing connections defers its jobs 10 s, then 1 min, then 5 min, then
    every 5 min (the real session through librouteros against the simulator), is left
    alone between probes, and is online with a closed circuit once it answers again."""
    clock = Clock()
    ctx = dataclasses.replace(
        stack.sync,
        circuit=RouterCircuit(
            stack.deps.redis,
            stack.engine.keys,
            schedule=Settings().sync.circuit_schedule_s,
            max_s=Settings().sync.circuit_max_s,
            probe_s=30.0,
            clock=clock,
        ),
    )
    await stack.sim.refuse_connections(True)
    delays = []
    for _ in range(5):
        router = await load_router(stack.db, stack.router_id)
        with pytest.raises(Deferred) as deferred:
            async with router_session(ctx, router) as ros:
                await ros.resource()
        delays.append(deferred.value.delay)
        assert (await ctx.circuit.state(stack.router_id))["cooldown"] == delays[-1]
        # Before the pause ends, jobs wait without touching the router.
        clock.now += delays[-1] - 1
        with pytest.raises(Deferred, match="waiting for it"):
            async with router_session(ctx, router) as ros:
                await ros.resource()
        clock.now += 1
    assert delays == [10.0, 60.0, 300.0, 300.0, 300.0]
    assert (await service.get_router(stack.db, stack.router_id))["online"] is False
    await stack.sim.refuse_connections(False)
    router = await load_router(stack.db, stack.router_id)
    async with router_session(ctx, router) as ros:
        assert await ros.resource()
    assert await ctx.circuit.state(stack.router_id) == {}
    assert (await service.get_router(stack.db, stack.router_id))["online"] is True
