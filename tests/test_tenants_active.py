"""Active tenants (seed 001: the expiry scheduler "finds active tenants"): tenants.active,
PATCH-able; an inactive tenant is not swept, billed, reminded or reconciled, and a job
that still arrives for it is dead-lettered with a reason naming it. Real Redis and
PostgreSQL, the RouterOS and gateway simulators, the real admin app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imsys.billing.context import BillingContext
from imsys.billing.domain import due_billing_runs, queue_reminders
from imsys.billing.handlers import current_period
from imsys.http import api_network, api_sync
from imsys.http.server import build_app
from imsys.network import models, service
from imsys.sync.reconcile import enqueue_expiry, enqueue_reconciliation
from tests.sync_support import Stack, past
from tests.test_billing import BillingStack, billing  # noqa: F401  (the fixture)

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The admin app with the network routes, served for real."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    api_sync.add_routes(app, stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        yield client


async def deactivate(stack: Stack) -> None:
    await service.update_tenant(stack.db, stack.tenant_id, models.TenantPatch(active=False))


async def take_queued(stack: Stack, job_type: str, key: str) -> set[int]:
    """``payload[key]`` of the ``job_type`` entries waiting on the sync stream, which
    are then deleted (other tests' tenants share the database: not this test's to run)."""
    stream = stack.engine.keys.stream("sync")
    found = set()
    for eid, fields in await stack.deps.redis.xrange(stream):
        if fields.get("type") == job_type:
            found.add(int(orjson.loads(fields["payload"])[key]))
        await stack.deps.redis.xdel(stream, eid)
    return found


async def dead_reasons(stack: Stack, job_type: str) -> list[str]:
    return [
        d.fields["error"]
        for d in await stack.engine.dead_letters.list()
        if d.fields.get("type") == job_type
    ]


async def test_active_is_shown_and_patchable(api: Client, stack: Stack) -> None:
    """A tenant is active by default; PATCH {"active": false} switches it off and GET
    shows it; {"active": null} and a non-boolean are 400s."""
    resp = await api.post("/api/tenants", json={"name": f"isp-{stack.prefix}"})
    assert resp.status == 201, await resp.text()
    tenant = await resp.json()
    assert tenant["active"] is True
    resp = await api.patch(f"/api/tenants/{tenant['id']}", json={"active": False})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["active"] is False
    listed = {t["id"]: t for t in (await (await api.get("/api/tenants")).json())["tenants"]}
    assert listed[tenant["id"]]["active"] is False
    for bad in (None, "maybe"):
        resp = await api.patch(f"/api/tenants/{tenant['id']}", json={"active": bad})
        assert resp.status == 400, await resp.text()
    resp = await api.post("/api/tenants", json={"name": f"off-{stack.prefix}", "active": False})
    assert (await resp.json())["active"] is False


async def test_inactive_tenant_is_not_swept(stack: Stack) -> None:
    """The expiry timer queues no expire_tenant job for an inactive tenant, and one that
    arrives anyway is dead-lettered naming the tenant: its expired subscriber stays
    connected on the router."""
    sid = await stack.add_subscriber("late", expires_at=past(7200))
    await stack.settle()
    await enqueue_expiry(stack.sync)
    assert stack.tenant_id in await take_queued(stack, "expire_tenant", "tenant_id")
    await deactivate(stack)
    await enqueue_expiry(stack.sync)
    assert stack.tenant_id not in await take_queued(stack, "expire_tenant", "tenant_id")
    await stack.engine.producer.enqueue("sync", "expire_tenant", {"tenant_id": stack.tenant_id})
    await stack.settle()
    [reason] = await dead_reasons(stack, "expire_tenant")
    assert f"TenantInactive: tenant {stack.tenant_id} is inactive" in reason
    assert (await stack.subscriber(sid))["is_suspended"] is False
    assert stack.secrets()["late"]["disabled"] == "false"


async def test_inactive_tenant_jobs_are_refused_then_replayed(stack: Stack) -> None:
    """A subscriber change of an inactive tenant does not reach the router: its sync job
    is dead-lettered with the reason; reactivated and replayed, it goes through."""
    await deactivate(stack)
    sid = await stack.add_subscriber("held")
    await stack.settle()
    assert "held" not in stack.secrets()
    [dead] = [
        d for d in await stack.engine.dead_letters.list() if d.fields["type"] == "sync_subscriber"
    ]
    assert f"tenant {stack.tenant_id} is inactive" in dead.fields["error"]
    assert (await stack.subscriber(sid))["sync_status"] != "synced"
    await service.update_tenant(stack.db, stack.tenant_id, models.TenantPatch(active=True))
    assert await stack.engine.dead_letters.replay(dead.id)
    await stack.settle()
    assert "held" in stack.secrets()
    assert (await stack.subscriber(sid))["sync_status"] == "synced"


async def test_inactive_tenant_is_not_reconciled(stack: Stack, api: Client) -> None:
    """The reconciliation timer leaves an inactive tenant's routers out; the dry-run plan
    of one is a 409 naming the tenant."""
    await enqueue_reconciliation(stack.sync)
    assert stack.router_id in await take_queued(stack, "sync_router", "router_id")
    await deactivate(stack)
    await enqueue_reconciliation(stack.sync)
    assert stack.router_id not in await take_queued(stack, "sync_router", "router_id")
    resp = await api.post(f"/api/routers/{stack.router_id}/plan")
    assert resp.status == 409, await resp.text()
    assert f"tenant {stack.tenant_id} is inactive" in (await resp.json())["error"]


async def test_inactive_tenant_is_not_billed_or_reminded(billing: BillingStack) -> None:  # noqa: F811
    """No billing run is due for an inactive tenant, a generate_bills job for it is
    dead-lettered naming it (no invoice, no message), and no reminder is queued for its
    subscribers near expiry."""
    s = billing.stack
    await s.add_subscriber("due", phone="+254733000001", expires_at=datetime.now(UTC))
    await s.add_subscriber(
        "soon", phone="+254733000002", expires_at=datetime.now(UTC) + timedelta(hours=20)
    )
    await billing.settle()
    await deactivate(s)
    assert s.tenant_id not in {t for t, _ in await due_billing_runs(s.db)}
    await s.engine.producer.enqueue(
        "billing", "generate_bills", {"tenant_id": s.tenant_id, "period": current_period("UTC")}
    )
    await billing.settle()
    [reason] = await dead_reasons(s, "generate_bills")
    assert f"tenant {s.tenant_id} is inactive" in reason
    invoices = "SELECT count(*) FROM invoices WHERE tenant_id = $1"
    assert await s.db.fetchval(invoices, s.tenant_id) == 0
    await queue_reminders(BillingContext.from_deps(s.deps))
    assert await s.db.fetchval(
        "SELECT count(*) FROM notifications WHERE tenant_id = $1", s.tenant_id
    ) == 0
    assert billing.gateway.messages("sms") == []
    # Active again, the same reminder timer reaches it.
    await service.update_tenant(s.db, s.tenant_id, models.TenantPatch(active=True))
    assert s.tenant_id in {t for t, _ in await due_billing_runs(s.db)}
    await queue_reminders(BillingContext.from_deps(s.deps))
    assert await s.db.fetchval(
        "SELECT count(*) FROM notifications WHERE tenant_id = $1 AND template = 'reminder'",
        s.tenant_id,
    ) == 1


async def test_inactive_tenant_gets_no_message_and_no_payment_applied(
    billing: BillingStack,  # noqa: F811
) -> None:
    """A message or a payment job that still arrives for an inactive tenant is refused
    naming the tenant: nothing is sent, the payment stays recorded but not applied; with
    the tenant active again, the replayed jobs go through."""
    s = billing.stack
    sid = await s.add_subscriber("late", phone="+254733000009")
    await billing.settle()
    nid = await s.db.fetchval(
        "INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient, template,"
        " body, dedupe_key) VALUES ($1, $2::bigint, 'sms', '+254733000009', 'reminder', 'hello',"
        " 'test:inactive:' || $2::text) RETURNING id",
        s.tenant_id,
        sid,
    )
    pid = await s.db.fetchval(
        "INSERT INTO payments (tenant_id, subscriber_id, amount, reference)"
        " VALUES ($1, $2, 10, 'INACTIVE-1') RETURNING id",
        s.tenant_id,
        sid,
    )
    await deactivate(s)
    await s.engine.producer.enqueue("billing", "send_notification", {"notification_id": nid})
    await s.engine.producer.enqueue("billing", "payment_received", {"payment_id": pid})
    await billing.settle()
    for job_type in ("send_notification", "payment_received"):
        [reason] = await dead_reasons(s, job_type)
        assert f"tenant {s.tenant_id} is inactive" in reason
    assert billing.gateway.messages("sms") == []
    assert await s.db.fetchval("SELECT status FROM notifications WHERE id = $1", nid) == "queued"
    assert await s.db.fetchval("SELECT applied_at FROM payments WHERE id = $1", pid) is None
    await service.update_tenant(s.db, s.tenant_id, models.TenantPatch(active=True))
    for dead in await s.engine.dead_letters.list():
        assert await s.engine.dead_letters.replay(dead.id)
    await billing.settle()
    assert len(billing.gateway.messages("sms")) >= 1
    assert await s.db.fetchval("SELECT applied_at FROM payments WHERE id = $1", pid) is not None
