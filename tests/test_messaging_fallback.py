"""A WhatsApp message accepted but never delivered in its kind's window goes once by SMS,
through the ``notification_fallback`` timer, against the gateway simulator (a phone that
is off) with real Redis and PostgreSQL. The timer's clock is its slot: the test fires it
at chosen instants instead of waiting for the window to pass."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from imsys.billing import ledger
from imsys.billing.context import BillingContext
from imsys.billing.domain import queue_overdue_fallbacks
from imsys.billing.notify import SEND_NOTIFICATION
from imsys.settings import Settings, WhatsAppTemplate
from imsys.sim.gateway import GatewaySimulator
from imsys.streams.timers import Timer, TimerRunner
from tests.events_support import backend_events
from tests.messaging_support import MessagingStack, open_stack
from tests.sync_support import _teardown

# Kinds of this file's own, so that other tests' messages in the shared database (under
# "*", far off) are never overdue here: one falls back after a minute, one after an hour.
SHORT, LONG = "fb_short", "fb_long"
WINDOWS = {SHORT: 60.0, LONG: 3600.0, "*": 1e9}


@pytest.fixture
async def messaging(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> AsyncIterator[MessagingStack]:
    templates = {**settings.messaging.whatsapp_templates,
                 SHORT: WhatsAppTemplate(name="renewal_reminder", params=["name"]),
                 LONG: WhatsAppTemplate(name="invoice_notice", params=["name"])}
    settings = settings.model_copy(update={"messaging": settings.messaging.model_copy(
        update={"fallback_after_s": WINDOWS, "whatsapp_templates": templates})})
    gateway = GatewaySimulator()
    await gateway.start()
    m, http, pool, runner = await open_stack(settings, redis, db, prefix, gateway)
    yield m
    await gateway.stop()
    await runner.cleanup()
    await _teardown(m.stack, http, pool)


def _timer(m: MessagingStack) -> Timer:
    return next(t for t in m.stack.engine.timers if t.name == "notification_fallback")


async def _sent_at(m: MessagingStack, ids: list[int]) -> tuple[float, float]:
    """Epoch seconds of the first and the last ``sent_at`` among ``ids``."""
    row = await m.stack.db.fetchrow(
        "SELECT extract(epoch FROM min(sent_at))::float8 AS first,"
        " extract(epoch FROM max(sent_at))::float8 AS last"
        " FROM notifications WHERE id = ANY($1::bigint[])",
        ids,
    )
    return row["first"], row["last"]


async def test_not_delivered_in_time_goes_once_by_sms(
    messaging: MessagingStack, database_url: str
) -> None:
    """Two messages of a one-minute kind to phones that are off stay ``sent``: before
    the window closes the timer queues nothing; after it, each goes once by SMS, however
    many times the timer fires (two slots, two processes at once on one slot, two calls
    at once on another pool). One delivered in time and one of a one-hour kind still
    inside its window get no SMS; a delivered message chosen just before its receipt
    landed gets none either. Past the hour, the other one goes too."""
    m = messaging
    g = m.gateway
    g.receipts.offline |= {"+254791000001", "+254791000002", "+254792000001"}
    off = await m.notify(2, channel="whatsapp", start=91_000_001, template=SHORT)
    [reached] = await m.notify(1, channel="whatsapp", start=91_000_003, template=SHORT)
    [invoice] = await m.notify(1, channel="whatsapp", start=92_000_001, template=LONG)
    await m.quiet()
    rows = await m.ledger([*off, reached, invoice])
    assert [rows[i]["status"] for i in off] == ["sent", "sent"]
    assert rows[invoice]["status"] == "sent"
    assert rows[reached]["status"] in {"delivered", "read"}
    first, last = await _sent_at(m, [*off, reached, invoice])
    timer = _timer(m)
    ctx = BillingContext.from_deps(m.stack.deps)

    # Inside the window: nothing.
    assert await queue_overdue_fallbacks(ctx, now=first + 30) == 0
    await timer.fn(int((first + 30) * 1000))
    assert not await m.stack.db.fetchval(
        "SELECT count(*) FROM notifications WHERE fallback_of = ANY($1::bigint[])",
        [*off, reached, invoice],
    )

    # Past it: two processes race for one slot (one wins it), and a second process with
    # its own connections runs the same decision at the same moment.
    slot = int((last + 61) * 1000)
    runners = [TimerRunner(m.stack.deps.redis, m.stack.engine.keys) for _ in range(2)]
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        other = dataclasses.replace(ctx, db=pool)
        fired = await asyncio.gather(
            runners[0].tick(timer, slot), runners[1].tick(timer, slot),
            queue_overdue_fallbacks(other, now=slot / 1000),
        )
    finally:
        await pool.close()
    assert sorted(fired[:2]) == [False, True]
    # A later slot finds them overdue still (never delivered) and queues nothing more.
    await timer.fn(slot + 60_000)
    assert await queue_overdue_fallbacks(ctx, now=last + 120) == 0
    # Chosen as overdue just before its receipt was written: the re-read stops it.
    assert await ledger.queue_fallback(m.stack.db, [reached], SEND_NOTIFICATION) == []

    await m.quiet()
    assert sorted(x.to for x in g.messages("sms")) == ["+254791000001", "+254791000002"]
    rows = await m.ledger([*off, reached, invoice])
    fallbacks = await m.ledger([rows[i]["fallback_id"] for i in off])
    assert sorted(r["fallback_of"] for r in fallbacks.values()) == off
    assert all(r["channel"] == "sms" and r["status"] == "delivered" for r in fallbacks.values())
    assert rows[reached]["fallback_id"] is None
    assert rows[invoice]["fallback_id"] is None
    events = await backend_events(m.stack.deps.redis, m.stack.engine.keys.backend_events,
                                  "notification_fallback")
    assert sorted(e["payload"]["notification_id"] for e in events) == off
    assert all("not delivered within 60 s" in e["payload"]["error"] for e in events)
    # The one-hour kind's window closes later: then it goes too.
    assert await queue_overdue_fallbacks(ctx, now=last + 3601) == 1
    await m.quiet()
    assert sorted(x.to for x in g.messages("sms")) == [
        "+254791000001", "+254791000002", "+254792000001"]
    assert not await m.dead()


async def test_tenant_without_fallback_gets_no_sms(messaging: MessagingStack) -> None:
    """A tenant that turned SMS fallback off: its undelivered WhatsApp message stays
    ``sent`` past the window and no SMS is queued; another tenant's, in the same timer
    run, goes by SMS."""
    m = messaging
    m.gateway.receipts.offline |= {"+254793000001", "+254793000002"}
    quiet = await m.stack.db.fetchval(
        "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"nf-{secrets.token_hex(3)}"
    )
    await m.stack.db.execute(
        "INSERT INTO tenant_messaging (tenant_id, sms_fallback) VALUES ($1, false)", quiet
    )
    [theirs] = await m.notify(1, channel="whatsapp", start=93_000_001, tenant_id=quiet,
                              template=SHORT)
    [ours] = await m.notify(1, channel="whatsapp", start=93_000_002, template=SHORT)
    await m.quiet()
    _, last = await _sent_at(m, [theirs, ours])
    await _timer(m).fn(int((last + 61) * 1000))
    await m.quiet()
    assert [x.to for x in m.gateway.messages("sms")] == ["+254793000002"]
    rows = await m.ledger([theirs, ours])
    assert rows[theirs]["status"] == "sent"
    assert rows[theirs]["fallback_id"] is None
    assert rows[ours]["fallback_id"] is not None
