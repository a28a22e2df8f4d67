"""The mass-disconnect guard in the open: it holds only disconnections, shows what it holds
(API, backend event, metric) and lets an operator confirm; tenants and routers change
after creation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from imsys.http import api_network, api_sync
from imsys.http.server import build_app
from tests.sync_support import ROUTER_PASSWORD, Stack, past

SECRET = "/ppp/secret"
TOKEN = "test-token-for-the-guard-tests-000000"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    api_sync.add_routes(app, stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        yield client


def hand_edit(stack: Stack, verb: str, **args: str) -> None:
    """A technician's change in Winbox: straight into the router's state."""
    stack.sim.state.execute(SECRET, verb, args, [])


async def reconcile(stack: Stack) -> None:
    await stack.engine.producer.enqueue(
        "sync",
        "sync_router",
        {"router_id": stack.router_id},
        job_id=f"sync_router:{stack.router_id}",
    )
    await stack.settle()


async def guard_events(stack: Stack) -> list[dict[str, object]]:
    entries = await stack.deps.redis.xrange(stack.engine.keys.backend_events)
    out = []
    for _, fields in entries:
        if fields.get("type", fields.get(b"type")) in (
            "router_guard_tripped",
            b"router_guard_tripped",
        ):
            payload = fields.get("payload", fields.get(b"payload"))
            data = orjson.loads(payload)
            if data["router_id"] == stack.router_id:
                out.append(data)
    return out


async def guard_metric(api: Client, router_id: int) -> str | None:
    resp = await api.get("/metrics")
    assert resp.status == 200
    for line in (await resp.text()).splitlines():
        if line.startswith(f'imsys_router_guard_tripped{{router_id="{router_id}"}}'):
            return line.rsplit(" ", 1)[1]
    return None


async def test_tripped_guard_holds_only_the_disconnections(stack: Stack, api: Client) -> None:
    """Reconciliation that would cut off 6 of 8 holds those 6 (visible via the API, one
    router_guard_tripped event, the metric at 1) while a new subscriber, a re-add and a
    package repair go through; Confirm applies the held plan and clears it all."""
    cut = [await stack.add_subscriber(f"g{i}", is_suspended=True) for i in range(6)]
    gone = await stack.add_subscriber("h0")
    edited = await stack.add_subscriber("h1")
    await stack.settle()
    secrets = stack.secrets()
    assert all(secrets[f"g{i}"]["disabled"] == "true" for i in range(6))
    # A technician enables the six by hand, deletes one and changes another's profile.
    for i in range(6):
        hand_edit(stack, "set", **{".id": secrets[f"g{i}"][".id"], "disabled": "false"})
    hand_edit(stack, "remove", **{".id": secrets["h0"][".id"]})
    hand_edit(stack, "set", **{".id": secrets["h1"][".id"], "profile": "premium"})

    await reconcile(stack)
    fresh = await stack.add_subscriber("fresh")  # created while the guard is tripped
    await stack.settle()
    await reconcile(stack)  # a second round: same holding, no second event

    secrets = stack.secrets()
    assert all(secrets[f"g{i}"]["disabled"] == "false" for i in range(6))  # held
    assert secrets["h0"]["disabled"] == "false"  # re-added: not a disconnection
    assert secrets["h1"]["profile"] == "basic"  # package repaired
    assert secrets["fresh"]["disabled"] == "false"
    assert (await stack.subscriber(fresh))["sync_status"] == "synced"
    assert (await stack.subscriber(gone))["sync_status"] == "synced"
    assert (await stack.subscriber(edited))["sync_status"] == "synced"

    resp = await api.get(f"/api/routers/{stack.router_id}")
    router = await resp.json()
    assert router["guard_tripped_at"] is not None
    held = router["guard_held"]["reconciliation"]
    assert sorted(held["subscriber_ids"]) == sorted(cut)
    assert held["would_disconnect"] == 6
    assert held["subscribers"] == 9
    assert {c["subscriber_id"] for c in held["changes"]} == set(cut)
    assert all(
        cmd["fields"] == {"disabled": "yes"} for c in held["changes"] for cmd in c["commands"]
    ), held["changes"]
    events = await guard_events(stack)
    assert len(events) == 1
    assert events[0]["cause"] == "reconciliation"
    assert events[0]["would_disconnect"] == 6
    assert await guard_metric(api, stack.router_id) == "1.0"

    resp = await api.post(f"/api/routers/{stack.router_id}/guard/confirm")
    assert resp.status == 200
    assert (await resp.json())["guard_held"] == {}
    await stack.settle()
    secrets = stack.secrets()
    assert all(secrets[f"g{i}"]["disabled"] == "true" for i in range(6))
    assert secrets["fresh"]["disabled"] == "false"
    router = await (await api.get(f"/api/routers/{stack.router_id}")).json()
    assert router["guard_tripped_at"] is None
    assert router["guard_held"] == {}
    assert await guard_metric(api, stack.router_id) == "0.0"


async def test_sweep_guard_holds_its_suspensions_and_releases_when_resolved(
    stack: Stack, api: Client
) -> None:
    """A sweep over the share holds every expiry on the router (reason and ids on the
    router row, one event); once no sweep holds anything the router is no longer tripped."""
    due = [await stack.add_subscriber(f"e{i}", expires_at=past(3600)) for i in range(5)]
    await stack.add_subscriber("e-keep")
    await stack.settle()
    await stack.engine.producer.enqueue("sync", "expire_tenant", {"tenant_id": stack.tenant_id})
    await stack.settle()
    router = await (await api.get(f"/api/routers/{stack.router_id}")).json()
    held = router["guard_held"]["sweep"]
    assert sorted(held["subscriber_ids"]) == sorted(due)
    assert "would cut off 5 of 6" in held["reason"]
    assert [e["cause"] for e in await guard_events(stack)] == ["sweep"]
    assert not any(e["disabled"] == "true" for e in stack.secrets().values())
    # The operator pays them all up instead: the next sweep holds nothing.
    await stack.db.execute(
        "UPDATE subscribers SET expires_at = now() + interval '1 day' WHERE id = ANY($1)", due
    )
    await stack.engine.producer.enqueue("sync", "expire_tenant", {"tenant_id": stack.tenant_id})
    await stack.settle()
    router = await (await api.get(f"/api/routers/{stack.router_id}")).json()
    assert router["guard_held"] == {}
    assert router["guard_tripped_at"] is None


async def test_sweep_suspension_reason_is_expired_and_api_shows_it(
    stack: Stack, api: Client
) -> None:
    """The sweep's suspension reads suspension_reason 'expired'; an API suspension
    'admin'; an unsuspended subscriber null."""
    late = await stack.add_subscriber("r-late", expires_at=past(60))
    admin = await stack.add_subscriber("r-admin", is_suspended=True)
    fine = await stack.add_subscriber("r-fine")
    await stack.settle()
    await stack.engine.producer.enqueue("sync", "expire_tenant", {"tenant_id": stack.tenant_id})
    await stack.settle()
    reasons = {}
    for sid in (late, admin, fine):
        resp = await api.get(f"/api/subscribers/{sid}")
        body = await resp.json()
        reasons[sid] = (body["is_suspended"], body["suspension_reason"])
    assert reasons == {late: (True, "expired"), admin: (True, "admin"), fine: (False, None)}


async def test_patch_tenant(stack: Stack, api: Client) -> None:
    """PATCH /api/tenants/{id} changes name, grace, guard share and time zone; bad values
    and an unknown tenant are refused."""
    resp = await api.patch(
        f"/api/tenants/{stack.tenant_id}",
        json={"grace_period_s": 3600, "max_disconnect_share": 0.5, "time_zone": "Africa/Nairobi"},
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["grace_period_s"] == 3600
    assert body["max_disconnect_share"] == 0.5
    assert body["time_zone"] == "Africa/Nairobi"
    row = await stack.db.fetchrow(
        "SELECT max_disconnect_share::float AS s, time_zone FROM tenants WHERE id = $1",
        stack.tenant_id,
    )
    assert (row["s"], row["time_zone"]) == (0.5, "Africa/Nairobi")
    for bad in ({"max_disconnect_share": 0}, {"time_zone": "Mars/Base"}, {}, {"name": None}):
        resp = await api.patch(f"/api/tenants/{stack.tenant_id}", json=bad)
        assert resp.status == 400, bad
    assert (await api.patch("/api/tenants/999999999", json={"name": "x"})).status == 404


async def test_patch_tenant_share_lets_the_sweep_pass(stack: Stack, api: Client) -> None:
    """A share raised after creation applies to the next sweep: what the guard held at
    20% goes through at 90%."""
    due = [await stack.add_subscriber(f"s{i}", expires_at=past(3600)) for i in range(4)]
    await stack.add_subscriber("s-keep")
    await stack.settle()
    sweep = {"tenant_id": stack.tenant_id}
    await stack.engine.producer.enqueue("sync", "expire_tenant", sweep)
    await stack.settle()
    assert (await stack.subscriber(due[0]))["is_suspended"] is False
    resp = await api.patch(f"/api/tenants/{stack.tenant_id}", json={"max_disconnect_share": 0.9})
    assert resp.status == 200
    await stack.engine.producer.enqueue("sync", "expire_tenant", sweep)
    await stack.settle()
    secrets = stack.secrets()
    assert all(secrets[f"s{i}"]["disabled"] == "true" for i in range(4))
    assert secrets["s-keep"]["disabled"] == "false"


async def test_patch_router_and_refused_changes(stack: Stack, api: Client) -> None:
    """PATCH /api/routers/{id} changes concurrency and credentials (the password never in
    the answer); a bad port or an unknown field is a 400; the next sync uses the change."""
    resp = await api.patch(
        f"/api/routers/{stack.router_id}", json={"max_concurrency": 3, "port": stack.sim.port}
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["max_concurrency"] == 3
    assert "password" not in body
    for bad in ({"port": 0}, {"tenant_id": 5}, {}, {"host": None}):
        resp = await api.patch(f"/api/routers/{stack.router_id}", json=bad)
        assert resp.status == 400, bad
    # New credentials are stored (never shown) and the next sync uses them.
    resp = await api.patch(f"/api/routers/{stack.router_id}", json={"password": "rotated-pw"})
    assert resp.status == 200
    stored = "SELECT password FROM routers WHERE id = $1"
    assert await stack.db.fetchval(stored, stack.router_id) == "rotated-pw"
    resp = await api.patch(f"/api/routers/{stack.router_id}", json={"password": ROUTER_PASSWORD})
    assert resp.status == 200
    await stack.add_subscriber("p-after")
    await stack.settle()
    assert stack.secrets()["p-after"]["disabled"] == "false"
    assert (await api.patch("/api/routers/999999999", json={"port": 8728})).status == 404


async def test_delete_router_only_without_subscribers(stack: Stack, api: Client) -> None:
    """DELETE /api/routers/{id} is a 409 while the router has subscribers, removes an
    empty router, and is a 404 after."""
    await stack.add_subscriber("d-one")
    resp = await api.delete(f"/api/routers/{stack.router_id}")
    assert resp.status == 409
    assert "subscribers" in (await resp.json())["error"]
    resp = await api.post(
        "/api/routers",
        json={
            "tenant_id": stack.tenant_id,
            "name": "spare",
            "host": "127.0.0.1",
            "username": "admin",
            "password": "secret-pw",
        },
    )
    assert resp.status == 201, await resp.text()
    spare = (await resp.json())["id"]
    resp = await api.delete(f"/api/routers/{spare}")
    assert resp.status == 200, await resp.text()
    assert "password" not in await resp.json()
    assert await stack.db.fetchval("SELECT count(*) FROM routers WHERE id = $1", spare) == 0
    assert (await api.delete(f"/api/routers/{spare}")).status == 404
