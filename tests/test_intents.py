"""Re-publication of intents: Redis loses its data, PostgreSQL's intents bring the jobs back.

Each test runs on a database of its own (re-publication reads every tenant's intents).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import asyncpg
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from imsys import outbox
from imsys.billing import payments
from imsys.billing.handlers import current_period
from imsys.billing.notify import SEND_NOTIFICATION, notification_job_id
from imsys.intents import Republisher
from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from tests.bouncer_support import addresses, bouncer_stack
from tests.sync_support import Stack, _teardown, make_stack

STREAMS = ("sync", "billing", "events", "bouncer")


def recovery_settings(settings: Settings, database_url: str, **recovery: object) -> Settings:
    return settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": SecretStr(database_url)}),
            "recovery": settings.recovery.model_copy(update={"enabled": True, **recovery}),
        }
    )


@pytest.fixture
async def own_db(isolated_database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(isolated_database, min_size=1, max_size=10)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def gateway() -> AsyncIterator[GatewaySimulator]:
    sim = GatewaySimulator()
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
async def rstack(
    settings: Settings,
    redis: Redis,
    own_db: asyncpg.Pool,
    isolated_database: str,
    prefix: str,
    gateway: GatewaySimulator,
) -> AsyncIterator[Stack]:
    """A sync + billing stack with re-publication on, SMS on the gateway simulator."""
    settings = recovery_settings(settings, isolated_database)
    settings = settings.model_copy(
        update={
            "sms": settings.sms.model_copy(
                update={"url": f"{gateway.url}/version1/messaging", "timeout": 1.0}
            ),
            "billing": settings.billing.model_copy(
                update={"send_rate_per_s": {"sms": 1000.0, "whatsapp": 1000.0, "email": 1000.0}}
            ),
        }
    )
    s, http, pool = await make_stack(settings, redis, own_db, prefix)
    yield s
    await _teardown(s, http, pool)


async def flush_prefix(redis: Redis, prefix: str) -> int:
    """What a Redis restarted empty looks like to imsys: every key of the prefix gone."""
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await redis.delete(*keys)
    return len(keys)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def jobs(redis: Redis, stack: Stack, stream: str) -> list[dict[str, str]]:
    return [f for _, f in await redis.xrange(stack.engine.keys.stream(stream))]


async def pending_work(s: Stack) -> dict[str, int]:
    """One intent per billing and sync job type, each with its job waiting in Redis."""
    sid = await s.add_subscriber("ann", phone="+254700000001")
    payment, _ = await payments.record_payment(
        s.db,
        payments.PaymentIn(subscriber_id=sid, amount=Decimal("10.00"), reference="MPESA0001"),
    )
    note = await s.db.fetchval(
        """
        INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient, template,
                                   body, dedupe_key)
        VALUES ($1, $2, 'sms', '+254700000001', 'test', 'hello ann', 'test:ann') RETURNING id
        """,
        s.tenant_id,
        sid,
    )
    async with s.db.acquire() as conn:
        await outbox.add(
            conn, SEND_NOTIFICATION, {"notification_id": note}, job_id=notification_job_id(note)
        )
    await s.relay.relay_once()
    return {"subscriber": sid, "payment": payment["id"], "notification": note}


async def test_redis_wiped_under_running_engine_republishes_and_processes_everything(
    rstack: Stack, redis: Redis, prefix: str, gateway: GatewaySimulator
) -> None:
    """Redis loses every key; the running engine recreates its groups and PostgreSQL's
    intents come back as jobs that run: the subscriber syncs, the payment applies, the
    message goes out, the period is billed."""
    s = rstack
    work = await pending_work(s)
    assert [f["type"] for f in await jobs(redis, s, "sync")] == ["sync_subscriber"]
    assert await flush_prefix(redis, prefix) > 0
    # No timer: only the re-publication can bring the work back.
    s.engine.timers.clear()
    run = asyncio.create_task(s.engine.run())
    relay = asyncio.create_task(s.relay.run(s.engine.stopping))
    try:

        async def done() -> bool:
            sub = await s.subscriber(work["subscriber"])
            applied = await s.db.fetchval(
                "SELECT applied_at IS NOT NULL FROM payments WHERE id = $1", work["payment"]
            )
            note = await s.db.fetchval(
                "SELECT status FROM notifications WHERE id = $1", work["notification"]
            )
            billed = await s.db.fetchval(
                "SELECT count(*) FROM billing_runs WHERE tenant_id = $1 AND period = $2",
                s.tenant_id,
                current_period("UTC"),
            )
            return bool(
                sub["sync_status"] == "synced" and applied and note == "sent" and billed == 1
            )

        await eventually(done)
    finally:
        s.engine.stop()
        await asyncio.wait_for(run, 30)
        await asyncio.wait_for(relay, 10)
    assert "ann" in s.secrets()
    assert [m.body for m in gateway.messages("sms")].count("hello ann") == 1


async def test_republish_puts_back_only_the_jobs_that_are_gone(rstack: Stack, redis: Redis) -> None:
    """With every job still waiting nothing is added; after one job is lost, exactly that
    one comes back (same job_id), and a second pass adds nothing."""
    s = rstack
    work = await pending_work(s)
    republisher = Republisher(s.deps)
    # The unbilled period has no job of its own yet (unless the start-up hook made one).
    for st in STREAMS:
        await republisher.republish(st)
    before = {st: len(await jobs(redis, s, st)) for st in STREAMS}
    assert before == {"sync": 1, "billing": 3, "events": 0, "bouncer": 0}
    again = [await republisher.republish(st) for st in STREAMS]
    assert [o.total for o in again] == [0, 0, 0, 0]
    assert {st: len(await jobs(redis, s, st)) for st in STREAMS} == before

    key = s.engine.keys.stream("billing")
    [lost] = [
        entry_id
        for entry_id, f in await redis.xrange(key)
        if f["job_id"] == f"payment_received:{work['payment']}"
    ]
    await redis.xdel(key, lost)
    lost_one = await republisher.republish("billing")
    assert lost_one.enqueued == {"payment_received": 1}
    assert sum(lost_one.duplicates.values()) == 2  # the message and the billing run wait
    assert (await republisher.republish("billing")).total == 0
    ids = [f["job_id"] for f in await jobs(redis, s, "billing")]
    assert sorted(ids) == sorted(
        [
            f"payment_received:{work['payment']}",
            f"send_notification:{work['notification']}",
            f"generate_bills:{s.tenant_id}:{current_period('UTC')}",
        ]
    )


async def test_sweep_takes_old_intents_once_and_respects_the_cooldown(
    rstack: Stack, redis: Redis, prefix: str
) -> None:
    """The sweep re-publishes intents older than intent_age_s with no job, leaves young
    ones to the outbox relay, and does not re-publish the same intent within the cooldown."""
    s = rstack
    old = await s.add_subscriber("old")
    young = await s.add_subscriber("young")
    await s.db.execute(
        "UPDATE subscribers SET updated_at = now() - interval '10 minutes' WHERE id = $1", old
    )
    await s.db.execute("DELETE FROM outbox")  # the relay never ran: both jobs are missing
    republisher = Republisher(s.deps)
    assert republisher.cfg.intent_age_s == 300.0
    outcome = await republisher.republish("sync", older_than_s=republisher.cfg.intent_age_s)
    assert outcome.enqueued == {"sync_subscriber": 1}
    assert [f["job_id"] for f in await jobs(redis, s, "sync")] == [f"sync_subscriber:{old}"]
    assert young not in [int(f["job_id"].split(":")[1]) for f in await jobs(redis, s, "sync")]

    # The job runs and fails for good (dead-lettered): the intent stays unsynced, but the
    # sweep leaves it in the dead letters for the cooldown instead of retrying it.
    [(entry_id, _)] = await redis.xrange(s.engine.keys.stream("sync"))
    await redis.xdel(s.engine.keys.stream("sync"), entry_id)
    await redis.delete(s.engine.keys.dedupe("sync", f"sync_subscriber:{old}"))
    swept = await republisher.sweep()
    by_stream = {o.stream: o for o in swept}
    assert by_stream["sync"].total == 0
    assert by_stream["sync"].cooling == {"sync_subscriber": 1}
    assert await jobs(redis, s, "sync") == []
    # A Redis that lost everything forgets the cooldown too: the group-created path
    # re-publishes every intent regardless of age.
    await flush_prefix(redis, prefix)
    await s.engine.consumers["sync"].ensure_group(lost=True)

    async def both() -> bool:
        return len(await jobs(redis, s, "sync")) == 2

    await eventually(both)
    assert sorted(f["job_id"] for f in await jobs(redis, s, "sync")) == sorted(
        [f"sync_subscriber:{old}", f"sync_subscriber:{young}"]
    )


async def test_group_recreated_republishes_bouncer_downloads(
    settings: Settings, redis: Redis, own_db: asyncpg.Pool, isolated_database: str, prefix: str
) -> None:
    """A completed Bouncer batch whose download job was lost with Redis is downloaded once
    its stream's group is recreated (the engine's own path after NOGROUP)."""
    cfg = recovery_settings(settings, isolated_database)
    async with bouncer_stack(cfg, redis, own_db) as bs:
        await bs.submit(addresses("rp", 5))
        await bs.create()
        bs.sim.complete_all()
        assert (await bs.check()).downloads_queued == 1
        await flush_prefix(redis, prefix)
        bouncer = bs.engine.consumers["bouncer"]
        await bouncer.ensure_group(lost=True)  # what the read loop does on NOGROUP

        async def back() -> bool:
            return bool(await redis.xlen(bs.engine.keys.stream("bouncer")))

        await eventually(back)
        assert await bs.download() == 1
        [batch] = await bs.batches()
        assert batch["status"] == "downloaded"


async def test_recovery_off_registers_no_hook_and_no_sweep(stack: Stack) -> None:
    """With [recovery] enabled = false (the shared-database tests), nothing is wired."""
    assert stack.deps.settings.recovery.enabled is False
    assert "intents_sweep" not in [t.name for t in stack.engine.timers]


async def test_recovery_on_registers_the_sweep_timer(rstack: Stack) -> None:
    """With recovery on, build_deps wires the sweep at the configured period."""
    [timer] = [t for t in rstack.engine.timers if t.name == "intents_sweep"]
    assert timer.every == rstack.deps.settings.recovery.sweep_every_s == 60.0
