"""A channel's send rate shared fairly between tenants, OTPs ahead of bulk messages,
judged by the order the gateway simulator received the messages in (never by time),
with real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from tests.events_support import otp_payload
from tests.messaging_support import MessagingStack, open_stack, point_at
from tests.sync_support import _teardown

RATE = 20.0  # messages a second on every channel: a run of 80 takes seconds, not ms


@pytest.fixture
async def slow(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> AsyncIterator[MessagingStack]:
    """A stack whose channels send RATE messages a second and whose billing consumer
    runs 10 jobs at a time: fewer than one tenant's run, so the stream's order (one
    tenant's messages all ahead of the other's) is what fairness has to overcome."""
    gateway = GatewaySimulator()
    await gateway.start()
    s = point_at(settings, gateway)
    s = s.model_copy(update={
        "billing": s.billing.model_copy(update={
            "send_rate_per_s": {"sms": RATE, "whatsapp": RATE, "email": RATE}}),
        "streams": {**s.streams, "billing": s.streams["billing"].model_copy(
            update={"concurrency": 10})},
    })
    m, http, pool, runner = await open_stack(s, redis, db, prefix, gateway, repoint=False)
    yield m
    await gateway.stop()
    await runner.cleanup()
    await _teardown(m.stack, http, pool)


async def test_two_tenants_share_the_rate_in_turn(slow: MessagingStack) -> None:
    """Tenant A queues 40 SMS, then tenant B 40 on the same account: the provider
    receives them interleaved (each tenant at least 8 of the first 20, and of every
    later 20 while both have messages left), not A's whole run first; every message
    goes once."""
    m = slow
    b = await m.stack.db.fetchval(
        "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"fair-{secrets.token_hex(3)}"
    )
    await m.notify(40, channel="sms", start=94_000_001)
    await m.notify(40, channel="sms", start=95_000_001, tenant_id=b)
    await m.quiet()
    order = ["A" if x.to.startswith("+25479400") else "B" for x in m.gateway.messages("sms")]
    assert len(order) == 80
    assert order.count("A") == order.count("B") == 40
    assert len({x.to for x in m.gateway.messages("sms")}) == 80
    for start in (0, 20, 40):
        window = order[start:start + 20]
        assert min(window.count("A"), window.count("B")) >= 8, (start, "".join(order))
    assert not await m.dead()


async def test_otps_overtake_a_bulk_run(slow: MessagingStack) -> None:
    """Eight OTPs enqueued after the first 10 of 60 bulk WhatsApp messages reached the
    provider reach it one after the other (at most 2 bulk messages among them, where a
    share as one more tenant would alternate them with bulk), and well before the bulk
    run ends (at least 30 bulk messages after the last)."""
    m = slow
    s = m.stack
    await m.notify(60, channel="whatsapp", start=96_000_001)
    otps = {f"+2547999900{i:02d}" for i in range(8)}
    queued = False

    async def step() -> None:
        await s.relay.relay_once()
        await s.engine.promote_once()
        await asyncio.gather(
            s.engine.consumers["billing"].process_once(block_ms=5),
            s.engine.consumers["events"].process_once(block_ms=5),
        )

    async with asyncio.timeout(120):
        while len(m.gateway.messages("whatsapp")) < 68:
            if not queued and len(m.gateway.messages("whatsapp")) >= 10:
                for to in sorted(otps):
                    await s.engine.producer.enqueue(
                        "events", "whatsapp_otp", otp_payload(recipient=to)
                    )
                queued = True
            await step()
    sent = [x.to for x in m.gateway.messages("whatsapp")]
    at = [i for i, to in enumerate(sent) if to in otps]
    assert len(at) == 8
    assert at[0] >= 10
    assert at[-1] - at[0] + 1 - 8 <= 2, "".join("o" if to in otps else "." for to in sent)
    assert len(sent) - 1 - at[-1] >= 30, at
    assert not await m.dead()
