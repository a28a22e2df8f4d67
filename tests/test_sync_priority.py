"""Changes made through the API or by a payment go ahead of timer-driven bulk work for
the same router (issue 16): bulk rows wait in the outbox while the sync stream is full,
and inside the process a change jumps the router's queue of waiting bulk jobs. Real
Redis, PostgreSQL, engine, the RouterOS simulator."""

from __future__ import annotations

import orjson
import pytest

from imsys import outbox
from imsys.settings import Settings
from imsys.sync.jobs import SYNC_SUBSCRIBER, sync_job_id
from tests.sync_support import Stack
from tests.test_sync_faults import run_engine_until

SECRET = "/ppp/secret"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Room for many jobs in flight and batches smaller than the bulk backlog."""
    streams = dict(settings.streams)
    streams["sync"] = streams["sync"].model_copy(update={"concurrency": 400})
    return settings.model_copy(
        update={
            "streams": streams,
            "sync": settings.sync.model_copy(update={"batch_size": 40}),
        }
    )


async def drift(stack: Stack, ids: list[int], password: str) -> None:
    """A new desired password for each, as if changed behind the API's back."""
    await stack.db.execute(
        "UPDATE subscribers SET password = $2 || id, desired_version = desired_version + 1,"
        " sync_status = 'pending' WHERE id = ANY($1)",
        ids,
        password,
    )


async def test_bulk_rows_wait_while_the_stream_is_full_changes_do_not(stack: Stack) -> None:
    """With 300 reconciliation jobs in the outbox and a backlog of 50, one pass relays the
    API change and 50 bulk jobs; the rest wait in the database (nothing lost) and go as
    the stream drains."""
    ids = [await stack.add_subscriber(f"q{i:03d}") for i in range(301)]
    await stack.settle(timeout=60)
    bulk, change = ids[:300], ids[300]
    async with stack.db.acquire() as conn:
        await outbox.add_many(
            conn,
            SYNC_SUBSCRIBER,
            [({"subscriber_id": i, "cause": "reconciliation"}, sync_job_id(i)) for i in bulk],
            bulk=True,
        )
    await stack.patch(change, password="from-the-api")
    relay = outbox.OutboxRelay(stack.db, stack.engine.producer, poll_s=30, bulk_backlog=50)
    await relay.relay_once()
    key = stack.engine.keys.stream("sync")
    assert await stack.deps.redis.xlen(key) == 51
    assert relay.held is False  # room was there for 50
    entries = await stack.deps.redis.xrange(key)
    assert change in [orjson.loads(e[1]["payload"])["subscriber_id"] for e in entries]
    assert await stack.db.fetchval("SELECT count(*) FROM outbox WHERE bulk") == 250
    await relay.relay_once()
    assert relay.held is True  # the stream is full: nothing more this pass
    assert await stack.db.fetchval("SELECT count(*) FROM outbox WHERE bulk") == 250


async def test_an_api_change_jumps_the_routers_queue_of_bulk_jobs(stack: Stack) -> None:
    """300 reconciliation jobs of one router are waiting in the process when an API
    change of one subscriber arrives: its write reaches the router before most of them
    (it waits for at most the batch already running)."""
    ids = [await stack.add_subscriber(f"j{i:03d}") for i in range(301)]
    await stack.settle(timeout=60)
    bulk, change = ids[:300], ids[300]
    await drift(stack, bulk, "drifted-")
    for i in bulk:
        await stack.engine.producer.send(
            SYNC_SUBSCRIBER, {"subscriber_id": i, "cause": "reconciliation"},
            job_id=sync_job_id(i),
        )
    await stack.patch(change, password="from-the-api")
    seen = len(stack.sim.commands)

    async def all_synced() -> bool:
        n = await stack.db.fetchval(
            "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND sync_status = 'synced'",
            ids,
        )
        return bool(n == 301)

    await run_engine_until(stack, all_synced, timeout=60)
    sets = [c for c in stack.sim.commands[seen:] if c.command == f"{SECRET}/set"]
    assert len(sets) == 301
    change_id = {e["name"]: e[".id"] for e in stack.sim.items(SECRET)}["j300"]
    position = next(n for n, c in enumerate(sets) if f"=.id={change_id}" in c.words)
    # Behind at most the batch running when it arrived, and the one that was forming.
    assert position < 2 * 40, position
    assert stack.secrets()["j300"]["password"] == "from-the-api"
