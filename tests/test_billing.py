"""Billing and notifications: bills, payments, reminders, delivery, send rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from imsys.billing.context import BillingContext
from imsys.billing.domain import queue_reminders
from imsys.billing.handlers import current_period
from imsys.http import api_billing, api_network
from imsys.http.server import build_app
from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from tests.sync_support import Stack, _teardown, make_stack

TOKEN = {"Authorization": "Bearer test-token"}


class BillingStack:
    def __init__(self, stack: Stack, gateway: GatewaySimulator) -> None:
        self.stack = stack
        self.gateway = gateway

    async def settle(self, timeout: float = 20.0) -> None:
        """Relay, promote and run billing and sync jobs until nothing is left."""
        s = self.stack
        deadline = time.monotonic() + timeout
        while True:
            moved = await s.relay.relay_once()
            promoted = await s.engine.promote_once()
            ran = 0
            for stream in ("billing", "sync"):
                ran += await s.engine.consumers[stream].process_once(block_ms=5)
            if not (moved or promoted or ran):
                delayed = 0
                for stream in ("billing", "sync"):
                    delayed += await s.deps.redis.zcard(s.engine.keys.delayed(stream))
                outbox = await s.db.fetchval("SELECT count(*) FROM outbox")
                if not delayed and not outbox:
                    return
                await asyncio.sleep(0.02)
            if time.monotonic() > deadline:
                raise AssertionError("billing work did not settle in time")


@pytest.fixture
async def billing(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> AsyncIterator[BillingStack]:
    gateway = GatewaySimulator()
    await gateway.start()
    settings = settings.model_copy(
        update={
            "sms": settings.sms.model_copy(
                update={"url": f"{gateway.url}/version1/messaging", "timeout": 1.0}
            ),
            "billing": settings.billing.model_copy(
                update={"send_rate_per_s": {"sms": 1000.0, "whatsapp": 1000.0, "email": 1000.0}}
            ),
            "streams": {
                **settings.streams,
                "billing": settings.streams["billing"].model_copy(update={"backoff_base": 0.05}),
            },
        }
    )
    stack, http, pool = await make_stack(settings, redis, db, prefix)
    yield BillingStack(stack, gateway)
    await _teardown(stack, http, pool)
    await gateway.stop()


async def customers(b: BillingStack, n: int, **kw: object) -> list[int]:
    return [
        await b.stack.add_subscriber(f"c{i:03d}", phone=f"+2547000{i:05d}", **kw)  # type: ignore[arg-type]
        for i in range(n)
    ]


async def expiry_sweep(b: BillingStack) -> None:
    """What the expiry timer does, for this test's tenant: suspends the expired ones."""
    await b.stack.engine.producer.enqueue("sync", "expire_tenant", {"tenant_id": b.stack.tenant_id})
    await b.settle()


async def pay(b: BillingStack, sid: int, reference: str) -> None:
    """A payment through the API, then its job run to the end (sync included)."""
    s = b.stack
    app = build_app(s.engine, s.deps.redis, s.db, "test-token")
    api_billing.add_routes(app, s.deps)
    body = {"subscriber_id": sid, "amount": "10.00", "reference": reference}
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.post("/api/payments", json=body, headers=TOKEN)
        assert resp.status == 201, await resp.text()
    await b.settle()


async def test_payment_lifts_an_expired_suspension(billing: BillingStack) -> None:
    """A subscriber the sweep suspended (reason 'expired') is reconnected by a payment."""
    [sid] = await customers(billing, 1, expires_at=datetime.now(UTC) - timedelta(days=1))
    await expiry_sweep(billing)
    s = billing.stack
    row = await s.db.fetchrow(
        "SELECT is_suspended, suspension_reason FROM subscribers WHERE id = $1", sid
    )
    assert (row["is_suspended"], row["suspension_reason"]) == (True, "expired")
    assert s.secrets()["c000"]["disabled"] == "true"
    await pay(billing, sid, "EXP0000001")
    row = await s.db.fetchrow(
        "SELECT is_suspended, suspension_reason FROM subscribers WHERE id = $1", sid
    )
    assert (row["is_suspended"], row["suspension_reason"]) == (False, None)
    assert s.secrets()["c000"]["disabled"] == "false"


async def test_payment_leaves_an_admin_suspension(billing: BillingStack) -> None:
    """A subscriber an admin suspended through the API stays suspended (and disabled on
    the router) after a payment, which still extends the paid-up time."""
    [sid] = await customers(billing, 1, expires_at=datetime.now(UTC) + timedelta(days=1))
    s = billing.stack
    app = build_app(s.engine, s.deps.redis, s.db, "test-token")
    api_network.add_routes(app, s.deps)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.patch(
            f"/api/subscribers/{sid}", json={"is_suspended": True}, headers=TOKEN
        )
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["suspension_reason"] == "admin"
    await billing.settle()
    assert s.secrets()["c000"]["disabled"] == "true"
    before = await s.db.fetchval("SELECT expires_at FROM subscribers WHERE id = $1", sid)
    await pay(billing, sid, "ADM0000001")
    row = await s.db.fetchrow(
        "SELECT is_suspended, suspension_reason, expires_at FROM subscribers WHERE id = $1", sid
    )
    assert (row["is_suspended"], row["suspension_reason"]) == (True, "admin")
    assert row["expires_at"] > before
    assert s.secrets()["c000"]["disabled"] == "true"
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.patch(
            f"/api/subscribers/{sid}", json={"is_suspended": False}, headers=TOKEN
        )
        assert (await resp.json())["suspension_reason"] is None
    await billing.settle()
    assert s.secrets()["c000"]["disabled"] == "false"


async def run_bills(b: BillingStack) -> str:
    period = current_period("UTC")
    await b.stack.engine.producer.enqueue(
        "billing", "generate_bills", {"tenant_id": b.stack.tenant_id, "period": period}
    )
    await b.settle()
    return period


async def test_bills_once_per_subscriber_and_period(billing: BillingStack) -> None:
    """generate_bills makes one invoice and one message per billable subscriber; a re-run
    makes nothing new and sends nothing more."""
    ids = await customers(billing, 5)
    paid_up = await billing.stack.add_subscriber(
        "paidup", phone="+254711111111", expires_at=datetime.now(UTC) + timedelta(days=400)
    )
    period = await run_bills(billing)
    db = billing.stack.db
    invoices = await db.fetch(
        "SELECT subscriber_id, amount, period FROM invoices WHERE tenant_id = $1",
        billing.stack.tenant_id,
    )
    assert sorted(r["subscriber_id"] for r in invoices) == sorted(ids)
    assert paid_up not in {r["subscriber_id"] for r in invoices}
    assert {str(r["amount"]) for r in invoices} == {"10.00"}
    sent = billing.gateway.messages("sms")
    assert len(sent) == 5
    assert all(f"bill for {period} is 10.00" in m.body for m in sent)
    await run_bills(billing)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM invoices WHERE tenant_id = $1", billing.stack.tenant_id
        )
        == 5
    )
    assert len(billing.gateway.messages("sms")) == 5


async def test_payment_posted_five_times_concurrently_counts_once(billing: BillingStack) -> None:
    """The same payment five times at once (and its job twice): one payment, one extension,
    one reconnect, one acknowledgement."""
    [sid] = await customers(billing, 1, expires_at=datetime.now(UTC) - timedelta(days=1))
    await expiry_sweep(billing)
    s = billing.stack
    assert s.secrets()["c000"]["disabled"] == "true"
    app = build_app(s.engine, s.deps.redis, s.db, "test-token")
    api_billing.add_routes(app, s.deps)
    body = {"subscriber_id": sid, "amount": "10.00", "reference": "QK82H3XY1Z"}
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        responses = await asyncio.gather(
            *(client.post("/api/payments", json=body, headers=TOKEN) for _ in range(5))
        )
        statuses = sorted(r.status for r in responses)
        payloads = [await r.json() for r in responses]
    assert statuses == [200, 200, 200, 200, 201]
    assert len({p["id"] for p in payloads}) == 1
    payment_id = payloads[0]["id"]
    await s.engine.producer.enqueue("billing", "payment_received", {"payment_id": payment_id})
    await billing.settle()
    row = await s.subscriber(sid)
    assert row["is_suspended"] is False
    expires = row["expires_at"]
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert s.secrets()["c000"]["disabled"] == "false"
    acks = [m for m in billing.gateway.messages("sms") if "QK82H3XY1Z" in m.body]
    assert len(acks) == 1
    assert await s.db.fetchval("SELECT count(*) FROM payments WHERE reference = 'QK82H3XY1Z'") == 1
    syncs = await s.db.fetchval(
        "SELECT count(DISTINCT correlation_id) FROM audit_log WHERE correlation_id = $1",
        "payment:QK82H3XY1Z",
    )
    assert syncs == 1
    enabled = await s.db.fetchval(
        "SELECT count(*) FROM audit_log WHERE correlation_id = $1 AND action LIKE 'set %'",
        "payment:QK82H3XY1Z",
    )
    assert enabled == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"subscriber_id": 999999999, "amount": "5", "reference": "REF123456"}, "does not exist"),
        ({"subscriber_id": 1, "amount": "-5", "reference": "REF123456"}, "amount"),
        ({"subscriber_id": 1, "amount": "5", "reference": "bad ref!"}, "reference"),
        ({"subscriber_id": 1, "amount": "5"}, "reference"),
    ],
)
async def test_bad_payments_are_refused_without_writes(
    billing: BillingStack, body: dict[str, object], message: str
) -> None:
    """Unknown subscriber, negative amount, malformed reference → 4xx, nothing written."""
    s = billing.stack
    if body["subscriber_id"] == 1:
        body = {**body, "subscriber_id": (await customers(billing, 1))[0]}
    before = await s.db.fetchval("SELECT count(*) FROM payments")
    app = build_app(s.engine, s.deps.redis, s.db, "test-token")
    api_billing.add_routes(app, s.deps)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.post("/api/payments", json=body, headers=TOKEN)
        data = await resp.json()
    assert 400 <= resp.status < 500
    assert message in data["error"]
    assert await s.db.fetchval("SELECT count(*) FROM payments") == before
    assert await s.db.fetchval("SELECT count(*) FROM outbox WHERE type = 'payment_received'") == 0


async def test_gateway_5xx_and_timeout_are_retried(billing: BillingStack) -> None:
    """A 503 and a timeout are retried with backoff; the message goes out once."""
    await customers(billing, 1)
    await billing.settle()
    billing.gateway.fail_next(1, status=503, channel="sms")
    billing.gateway.timeout_next(1, seconds=5, channel="sms")
    await run_bills(billing)
    [note] = await billing.stack.db.fetch(
        "SELECT status, attempts, provider_message_id FROM notifications WHERE template = 'invoice'"
        " AND tenant_id = $1",
        billing.stack.tenant_id,
    )
    assert note["status"] == "sent"
    assert note["attempts"] == 3
    assert len(billing.gateway.messages("sms")) == 1
    assert billing.gateway.messages("sms")[0].provider_id == note["provider_message_id"]


async def test_gateway_4xx_fails_with_reason_in_dead_letters(billing: BillingStack) -> None:
    """A 4xx marks the message failed with the gateway's reason and dead-letters the job."""
    await customers(billing, 1)
    await billing.settle()
    billing.gateway.fail_next(1, status=400, channel="sms")
    await run_bills(billing)
    note = await billing.stack.db.fetchrow(
        "SELECT status, error FROM notifications WHERE template = 'invoice' AND tenant_id = $1",
        billing.stack.tenant_id,
    )
    assert note["status"] == "failed"
    assert "400" in note["error"]
    [letter] = await billing.stack.engine.dead_letters.list(stream="billing")
    assert "ProviderRejected" in letter.fields["error"]


async def test_send_rate_holds_within_ten_percent(billing: BillingStack) -> None:
    """60 messages at a 40/s limit go out at 40/s (±10 %), not as a burst."""
    s = billing.stack
    s.deps.settings.billing.send_rate_per_s["sms"] = 40.0
    await customers(billing, 60)
    await billing.settle()
    s.engine.consumers["billing"].policy.concurrency = 30
    await run_bills(billing)
    times = sorted(m.at.timestamp() for m in billing.gateway.messages("sms"))
    assert len(times) == 60
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 36.0 <= rate <= 44.0, rate


async def test_reminders_once_per_lead_time_and_caught_up_after_downtime(
    billing: BillingStack,
) -> None:
    """Each lead time reminds once; one missed while down goes out when back (if before
    expiry); an expired subscriber gets none."""
    s = billing.stack
    now = datetime.now(UTC)
    soon = await s.add_subscriber(
        "soon", phone="+254722000001", expires_at=now + timedelta(hours=20)
    )
    later = await s.add_subscriber(
        "later", phone="+254722000002", expires_at=now + timedelta(days=2)
    )
    await s.add_subscriber("gone", phone="+254722000003", expires_at=now - timedelta(hours=1))
    await s.add_subscriber("far", phone="+254722000004", expires_at=now + timedelta(days=10))
    await billing.settle()
    ctx = BillingContext.from_deps(s.deps)
    await queue_reminders(ctx)
    await queue_reminders(ctx)  # the timer again: nothing new
    await billing.settle()
    rows = await s.db.fetch(
        "SELECT subscriber_id, dedupe_key FROM notifications WHERE template = 'reminder'"
        " AND tenant_id = $1 ORDER BY subscriber_id",
        s.tenant_id,
    )
    assert [(r["subscriber_id"], r["dedupe_key"].rsplit(":", 1)[1]) for r in rows] == [
        (soon, "1"),  # the 3-day reminder was missed; only the 1-day one goes
        (later, "3"),
    ]
    texts = [m.body for m in billing.gateway.messages("sms")]
    assert len(texts) == 2
    assert any("in 1 day(s)" in t for t in texts)


async def test_stopped_channel_holds_notifications_until_started(billing: BillingStack) -> None:
    """While SMS is stopped (service_control), messages wait without spending attempts."""
    from imsys.events.channels import ChannelControl

    channels = ChannelControl.from_deps(billing.stack.deps)
    await customers(billing, 2)
    await billing.settle()
    await channels.stop("sms", "test")
    period = current_period("UTC")
    s = billing.stack
    await s.engine.producer.enqueue(
        "billing", "generate_bills", {"tenant_id": s.tenant_id, "period": period}
    )
    for _ in range(3):
        await s.relay.relay_once()
        await s.engine.consumers["billing"].process_once(block_ms=5)
        await s.engine.promote_once()
    assert billing.gateway.messages("sms") == []
    queued = await s.db.fetch(
        "SELECT status, attempts FROM notifications WHERE tenant_id = $1", s.tenant_id
    )
    assert [(r["status"], r["attempts"]) for r in queued] == [("queued", 0), ("queued", 0)]
    await channels.start("sms", "test")
    await billing.settle()
    assert len(billing.gateway.messages("sms")) == 2


async def test_template_and_notification_routes_work_with_billing_routes_alone(
    billing: BillingStack,
) -> None:
    """With only billing's routes: a tenant's template is saved and the next bill uses it;
    an unknown tenant, name or variable is refused; notifications read back per subscriber."""
    s = billing.stack
    sid, _other = await customers(billing, 2)
    app = build_app(s.engine, s.deps.redis, s.db, "test-token")
    api_billing.add_routes(app, s.deps)
    path = f"/api/tenants/{s.tenant_id}/templates"
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=TOKEN) as client:
        saved = await client.put(f"{path}/invoice", json={"body": "Pay {amount} for {period}"})
        assert saved.status == 200
        assert (await saved.json())["body"] == "Pay {amount} for {period}"
        no_tenant = await client.put("/api/tenants/999999999/templates/invoice", json={"body": "x"})
        assert no_tenant.status == 404
        assert (await no_tenant.json())["error"] == "tenant 999999999 not found"
        no_name = await client.put(f"{path}/nope", json={"body": "x"})
        assert no_name.status == 404
        assert (await no_name.json())["error"] == (
            "no template named 'nope'; templates: invoice, reminder, payment_ack"
        )
        typo = await client.put(f"{path}/invoice", json={"body": "Hi {nmae}"})
        assert typo.status == 400
        period = await run_bills(billing)
        notes = await client.get("/api/notifications", params={"subscriber_id": str(sid)})
        assert notes.status == 200
        listed = (await notes.json())["notifications"]
    assert [(n["subscriber_id"], n["template"]) for n in listed] == [(sid, "invoice")]
    assert {m.body for m in billing.gateway.messages("sms")} == {f"Pay 10.00 for {period}"}
