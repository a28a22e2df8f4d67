"""Fencing in the domains: a delivery whose claim was lost performs no side effect.

Each test runs a job whose fence raises ``FencedOut`` (what the engine's check does for a
process that stalled while another claimed its job) and shows nothing happened — no
provider call, no row changed — then runs the same job as the current delivery to show
the side effect is real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from imsys.billing import payments
from imsys.billing.handlers import current_period
from imsys.errors import Deferred, FencedOut
from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from imsys.streams.engine import Engine
from imsys.streams.job import Job
from tests.bouncer_support import addresses, bouncer_stack
from tests.events_support import PHONE, EventsStack, events_stack, otp_payload
from tests.sync_support import Stack, _teardown, make_stack


async def fenced(_job: Job[Any]) -> None:
    raise FencedOut("another process claimed this job")


def make_job(engine: Engine, stream: str, type_: str, payload: dict[str, Any]) -> Job[Any]:
    _, job = engine.registry.parse(
        stream, "1-1", {"type": type_, "payload": orjson.dumps(payload).decode(), "attempt": "1"}
    )
    return job


async def run(engine: Engine, job: Job[Any]) -> None:
    reg = engine.registry.get(job.stream, job.type)
    assert reg is not None
    await reg.handler(job)


@pytest.fixture
async def gateway() -> AsyncIterator[GatewaySimulator]:
    sim = GatewaySimulator()
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
async def bstack(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str, gateway: GatewaySimulator
) -> AsyncIterator[Stack]:
    """Billing wired as in the service, SMS on the gateway simulator."""
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
    s, http, pool = await make_stack(settings, redis, db, prefix)
    yield s
    await _teardown(s, http, pool)


async def queued_note(s: Stack, key: str) -> int:
    return int(
        await s.db.fetchval(
            """
            INSERT INTO notifications (tenant_id, channel, recipient, template, body, dedupe_key)
            VALUES ($1, 'sms', '+254700000009', 'test', $2, $2) RETURNING id
            """,
            s.tenant_id,
            key,
        )
    )


async def note_row(s: Stack, nid: int) -> dict[str, Any]:
    row = await s.db.fetchrow(
        "SELECT status, attempts, sending_by, error FROM notifications WHERE id = $1", nid
    )
    assert row is not None
    return dict(row)


async def test_stale_payment_delivery_applies_nothing(bstack: Stack) -> None:
    """A fenced payment_received neither applies the payment, nor extends or reconnects the
    subscriber, nor queues a sync or an acknowledgement; the current delivery does."""
    s = bstack
    sid = await s.add_subscriber(
        "pay",
        phone="+254700000010",
        is_suspended=True,
        expires_at=datetime.now(UTC) - timedelta(days=1),
    )
    # Suspended by expiry, as the sweep does it: a payment lifts only that kind.
    await s.db.execute("UPDATE subscribers SET suspension_reason = 'expired' WHERE id = $1", sid)
    pay, _ = await payments.record_payment(
        s.db, payments.PaymentIn(subscriber_id=sid, amount=Decimal("10.00"), reference="FENCE001")
    )
    await s.db.execute("DELETE FROM outbox")
    before = await s.db.fetchrow("SELECT * FROM subscribers WHERE id = $1", sid)
    job = make_job(s.engine, "billing", "payment_received", {"payment_id": pay["id"]})
    job.fence = fenced
    with pytest.raises(FencedOut):
        await run(s.engine, job)
    assert await s.db.fetchval("SELECT applied_at FROM payments WHERE id = $1", pay["id"]) is None
    assert await s.db.fetchrow("SELECT * FROM subscribers WHERE id = $1", sid) == before
    assert await s.db.fetchval("SELECT count(*) FROM outbox") == 0
    job.fence = None
    await run(s.engine, job)
    assert await s.db.fetchval("SELECT applied_at FROM payments WHERE id = $1", pay["id"])
    assert not await s.db.fetchval("SELECT is_suspended FROM subscribers WHERE id = $1", sid)


async def test_stale_notification_delivery_sends_nothing(
    bstack: Stack, gateway: GatewaySimulator
) -> None:
    """A fenced send_notification calls no provider and leaves the message queued and
    unclaimed; the current delivery sends it once."""
    s = bstack
    nid = await queued_note(s, "fence:send")
    job = make_job(s.engine, "billing", "send_notification", {"notification_id": nid})
    job.fence = fenced
    with pytest.raises(FencedOut):
        await run(s.engine, job)
    assert gateway.messages() == []
    assert await note_row(s, nid) == {
        "status": "queued",
        "attempts": 0,
        "sending_by": None,
        "error": None,
    }
    job.fence = None
    await run(s.engine, job)
    assert [m.body for m in gateway.messages("sms")] == ["fence:send"]
    assert (await note_row(s, nid))["status"] == "sent"


async def test_message_claimed_by_another_delivery_waits_for_it(
    bstack: Stack, gateway: GatewaySimulator
) -> None:
    """A message another delivery is sending is not sent again until that claim is released
    or its lease has run out (its claimant died mid-call)."""
    s = bstack
    nid = await queued_note(s, "fence:claimed")
    await s.db.execute(
        "UPDATE notifications SET sending_at = now(), sending_by = '9-9:1' WHERE id = $1", nid
    )
    job = make_job(s.engine, "billing", "send_notification", {"notification_id": nid})
    with pytest.raises(Deferred):
        await run(s.engine, job)
    assert gateway.messages() == []
    await s.db.execute(
        "UPDATE notifications SET sending_at = now() - interval '1 hour' WHERE id = $1", nid
    )
    await run(s.engine, job)
    assert [m.body for m in gateway.messages("sms")] == ["fence:claimed"]


async def test_stale_delivery_does_not_record_a_failed_send(
    bstack: Stack, gateway: GatewaySimulator
) -> None:
    """A delivery fenced out while its provider call failed records no failure (no attempt,
    no 'failed' status, no notification_failed event): the failure is the current one's."""
    s = bstack
    nid = await queued_note(s, "fence:fail")
    calls = 0

    async def lost_during_call(_job: Job[Any]) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise FencedOut("claimed by another process during the call")

    gateway.fail_next(1, status=400, channel="sms")
    job = make_job(s.engine, "billing", "send_notification", {"notification_id": nid})
    job.fence = lost_during_call
    with pytest.raises(FencedOut):
        await run(s.engine, job)
    assert calls == 2
    row = await note_row(s, nid)
    assert (row["status"], row["attempts"], row["error"]) == ("queued", 0, None)
    events = await s.deps.redis.xrange(s.engine.keys.backend_events)
    assert [f["type"] for _, f in events if f["type"] == "notification_failed"] == []


async def test_stale_billing_run_bills_nothing(bstack: Stack) -> None:
    """A fenced generate_bills makes no invoice, no message and no billing-run record."""
    s = bstack
    await s.add_subscriber("billme", phone="+254700000011")
    period = current_period("UTC")
    job = make_job(
        s.engine, "billing", "generate_bills", {"tenant_id": s.tenant_id, "period": period}
    )
    job.fence = fenced
    with pytest.raises(FencedOut):
        await run(s.engine, job)
    counts = (
        "SELECT (SELECT count(*) FROM invoices WHERE tenant_id = $1)"
        " + (SELECT count(*) FROM notifications WHERE tenant_id = $1 AND template = 'invoice')"
        " + (SELECT count(*) FROM billing_runs WHERE tenant_id = $1)"
    )
    assert await s.db.fetchval(counts, s.tenant_id) == 0
    job.fence = None
    await run(s.engine, job)
    assert await s.db.fetchval(counts, s.tenant_id) == 3


@pytest.fixture
async def ev(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[EventsStack]:
    async with events_stack(settings, redis, db) as stack:
        yield stack


async def test_stale_otp_delivery_sends_no_code(ev: EventsStack) -> None:
    """A fenced whatsapp_otp makes no provider call, leaves no sent mark and publishes no
    otp_sent; the current delivery sends the code once."""
    job = make_job(ev.engine, "events", "whatsapp_otp", otp_payload())
    job.fence = fenced
    with pytest.raises(FencedOut):
        await run(ev.engine, job)
    assert ev.gateway.messages() == []
    assert await ev.events("otp_sent") == []
    prefix = ev.engine.keys.prefix
    assert [k async for k in ev.redis.scan_iter(match=f"{prefix}:otp:sent:*")] == []
    job.fence = None
    await run(ev.engine, job)
    assert [m.to for m in ev.gateway.messages("whatsapp")] == [PHONE]
    assert len(await ev.events("otp_sent")) == 1


async def test_stale_service_control_changes_no_channel(ev: EventsStack) -> None:
    """A fenced service_control stop leaves the channel running; the current one stops it."""
    job = make_job(ev.engine, "events", "service_control", {"action": "stop", "service": "sms"})
    job.fence = fenced
    with pytest.raises(FencedOut):
        await run(ev.engine, job)
    assert (await ev.channels.status("sms")).state == "running"
    job.fence = None
    await run(ev.engine, job)
    assert (await ev.channels.status("sms")).state == "stopped"


async def test_stale_bouncer_download_stores_nothing(
    settings: Settings, redis: Redis, db: asyncpg.Pool
) -> None:
    """A fenced download_results spends no download attempt and stores no result; the
    current delivery stores the batch."""
    async with bouncer_stack(settings, redis, db) as bs:
        await bs.submit(addresses("fence", 3))
        await bs.create()
        bs.sim.complete_all()
        await bs.check()
        [batch] = await bs.batches()
        job = make_job(
            bs.engine,
            "bouncer",
            "download_results",
            {"bouncer_batch_id": batch["bouncer_batch_id"]},
        )
        job.fence = fenced
        with pytest.raises(FencedOut):
            await run(bs.engine, job)
        [after] = await bs.batches()
        assert (after["status"], after["download_attempts"]) == ("completed", 0)
        assert await db.fetchval("SELECT count(*) FROM email_deliverable_results") == 0
        job.fence = None
        await run(bs.engine, job)
        [done] = await bs.batches()
        assert (done["status"], done["download_attempts"]) == ("downloaded", 1)
