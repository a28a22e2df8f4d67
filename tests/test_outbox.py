"""The outbox relay: writes and their jobs commit together; NOTIFY wakes the relay."""

from __future__ import annotations

import asyncio

from imsys import outbox
from imsys.streams.keys import GROUP
from imsys.sync.jobs import SYNC_SUBSCRIBER
from tests.sync_support import Stack


async def test_notify_wakes_the_relay_without_waiting_for_the_poll(stack: Stack) -> None:
    """A committed outbox row reaches its stream on NOTIFY, long before the poll interval."""
    relay = outbox.OutboxRelay(stack.db, stack.engine.producer, poll_s=30)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.sleep(0.2)  # the relay is listening
        sid = await stack.add_subscriber("nina")
        key = stack.engine.keys.stream("sync")
        # The entry is visible a moment before the relay's transaction deletes its row.
        for _ in range(100):
            if await stack.deps.redis.xlen(key) and not await stack.db.fetchval(
                "SELECT count(*) FROM outbox"
            ):
                break
            await asyncio.sleep(0.02)
        [(_, fields)] = await stack.deps.redis.xrange(key)
        assert fields["type"] == "sync_subscriber"
        assert fields["job_id"] == f"sync_subscriber:{sid}"
        assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_rolled_back_change_publishes_nothing(stack: Stack) -> None:
    """A transaction that rolls back takes its outbox row with it."""
    async with stack.db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await outbox.add(conn, SYNC_SUBSCRIBER, {"subscriber_id": 1})
        await tx.rollback()
    assert await stack.relay.relay_once() == 0
    assert await stack.deps.redis.xlen(stack.engine.keys.stream("sync")) == 0


async def test_burst_of_changes_coalesces_into_one_sync(stack: Stack) -> None:
    """Ten quick changes to one subscriber become one waiting job, which syncs the last."""
    sid = await stack.add_subscriber("olga")
    await stack.settle()
    writes = sum(stack.sim.writes.values())
    for i in range(10):
        await stack.patch(sid, password=f"pw{i}")
    await stack.relay.relay_once()
    assert await stack.deps.redis.xlen(stack.engine.keys.stream("sync")) == 1
    await stack.settle()
    assert stack.secrets()["olga"]["password"] == "pw9"
    assert sum(stack.sim.writes.values()) - writes == 1


async def test_change_while_its_job_runs_is_published_again_later(stack: Stack) -> None:
    """A row whose job is already running stays in the outbox and goes out once it ends."""
    sid = await stack.add_subscriber("pia")
    await stack.relay.relay_once()
    consumer = stack.engine.consumers["sync"]
    entries = await consumer.read(1, 10)
    key = stack.engine.keys.stream("sync")
    assert (await stack.deps.redis.xpending(key, GROUP))["pending"] == 1  # "running"
    await stack.patch(sid, password="changed")
    assert await stack.relay.relay_once() == 0
    assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 1
    await consumer.dispatch(entries)
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    await stack.settle()
    assert stack.secrets()["pia"]["password"] == "changed"
    assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 0
