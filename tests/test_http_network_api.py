"""The network admin API (tenants, routers, packages, subscribers) through the real aiohttp
app, on 127.0.0.1, over the whole sync stack: RouterOS simulator, engine, outbox relay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imsys.http import api_network, api_sync
from imsys.http.server import build_app
from imsys.sync.reconcile import router_facts
from imsys.sync.repo import load_router
from tests.sync_support import ROUTER_PASSWORD, Stack

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "/ppp/secret"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The admin app with the network routes, served for real; every call carries the token."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    api_sync.add_routes(app, stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        yield client


async def expect_error(resp: aiohttp.ClientResponse, status: int) -> str:
    """The response has ``status`` and the JSON error shape; returns the message."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str)
    assert body["error"]
    return str(body["error"])


async def created(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.status == 201, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    return body


def subscriber_body(stack: Stack, username: str, **over: Any) -> dict[str, Any]:
    return {
        "tenant_id": stack.tenant_id,
        "router_id": stack.router_id,
        "package_id": stack.basic,
        "username": username,
        "password": f"pw-{username}-s3cret",
        "service": "pppoe",
        **over,
    }


async def new_subscriber(api: Client, stack: Stack, username: str, **over: Any) -> int:
    resp = await api.post("/api/subscribers", json=subscriber_body(stack, username, **over))
    return int((await created(resp))["id"])


async def get_json(api: Client, path: str) -> Any:
    resp = await api.get(path)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def sync_stream(stack: Stack) -> list[dict[str, Any]]:
    """The jobs waiting on the sync stream, as (type, payload) dicts."""
    entries: Any = await stack.deps.redis.xrange(stack.engine.keys.stream("sync"))
    return [{"type": f["type"], "payload": orjson.loads(f["payload"])} for _, f in entries]


# --- tenants -------------------------------------------------------------------------------


async def test_tenant_is_created_and_listed(api: Client, stack: Stack) -> None:
    """POST /api/tenants answers 201 with an id; GET /api/tenants lists that tenant."""
    name = f"{stack.prefix}-acme"
    body = await created(
        await api.post("/api/tenants", json={"name": name, "time_zone": "Africa/Nairobi"})
    )
    assert isinstance(body["id"], int)
    assert body["name"] == name
    assert body["time_zone"] == "Africa/Nairobi"
    listed = await get_json(api, "/api/tenants")
    assert {t["id"]: t["name"] for t in listed["tenants"]}[body["id"]] == name


async def test_duplicate_tenant_name_is_a_conflict(api: Client, stack: Stack) -> None:
    """A second tenant with a name already taken gets 409, naming the tenant."""
    name = f"{stack.prefix}-twice"
    await created(await api.post("/api/tenants", json={"name": name}))
    message = await expect_error(await api.post("/api/tenants", json={"name": name}), 409)
    assert name in message


async def test_unknown_time_zone_is_rejected_clearly(api: Client, stack: Stack) -> None:
    """A time zone that does not exist gets 400 naming the field and the value."""
    resp = await api.post(
        "/api/tenants", json={"name": f"{stack.prefix}-tz", "time_zone": "Mars/Olympus_Mons"}
    )
    message = await expect_error(resp, 400)
    assert "time_zone" in message
    assert "unknown time zone 'Mars/Olympus_Mons'" in message


async def test_tenant_without_name_is_rejected(api: Client) -> None:
    """A tenant body without a name gets 400 naming the missing field."""
    message = await expect_error(await api.post("/api/tenants", json={"time_zone": "UTC"}), 400)
    assert "name" in message
    assert "required" in message.lower()


async def test_non_json_body_is_rejected(api: Client) -> None:
    """A body that is not JSON gets 400 saying so."""
    resp = await api.post(
        "/api/tenants", data=b"name=acme", headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in await expect_error(resp, 400)


async def test_json_array_body_is_rejected(api: Client, stack: Stack) -> None:
    """A JSON array where an object is expected gets 400 and creates nothing."""
    resp = await api.post("/api/tenants", json=[{"name": f"{stack.prefix}-arr"}])
    assert "JSON object" in await expect_error(resp, 400)
    listed = await get_json(api, "/api/tenants")
    assert f"{stack.prefix}-arr" not in {t["name"] for t in listed["tenants"]}


# --- routers -------------------------------------------------------------------------------


async def test_router_create_never_shows_its_password(api: Client, stack: Stack) -> None:
    """POST /api/routers answers 201 and no response about it ever carries the password."""
    password = "Very-Secret-Router-Pw-42"
    resp = await api.post(
        "/api/routers",
        json={
            "tenant_id": stack.tenant_id,
            "name": "edge-2",
            "host": "127.0.0.1",
            "port": 8729,
            "username": "admin",
            "password": password,
            "use_tls": False,
        },
    )
    raw = await resp.text()
    assert resp.status == 201, raw
    assert password not in raw
    body = orjson.loads(raw)
    assert "password" not in body
    assert body["tenant_id"] == stack.tenant_id
    assert body["port"] == 8729
    for path in ("/api/routers", f"/api/routers/{body['id']}"):
        listed = await api.get(path)
        assert listed.status == 200
        assert password not in await listed.text()
        assert ROUTER_PASSWORD not in await listed.text()


async def test_router_read_shows_live_status(api: Client, stack: Stack) -> None:
    """GET /api/routers[/id] carries the facts pulled from the router and its circuit state."""
    stack.sim.set_resource(version="7.15.3 (stable)", uptime="1d2h3m4s")
    await router_facts(stack.sync, await load_router(stack.db, stack.router_id))
    one = await get_json(api, f"/api/routers/{stack.router_id}")
    assert one["online"] is True
    assert one["version"] == "7.15.3 (stable)"
    assert one["uptime"]
    assert one["last_seen_at"] is not None
    assert one["circuit"] == "closed"
    listed = await get_json(api, f"/api/routers?tenant_id={stack.tenant_id}")
    assert [r["id"] for r in listed["routers"]] == [stack.router_id]
    assert listed["routers"][0]["version"] == "7.15.3 (stable)"

    await stack.sim.go_down()  # drops the pooled connection too
    await router_facts(stack.sync, await load_router(stack.db, stack.router_id))
    down = await get_json(api, f"/api/routers/{stack.router_id}")
    assert down["online"] is False
    assert down["circuit"] == "open"
    assert down["last_error"]


async def test_router_of_unknown_tenant_is_rejected(api: Client) -> None:
    """A router for a tenant that does not exist gets 400 naming the tenant."""
    resp = await api.post(
        "/api/routers",
        json={"tenant_id": 987654321, "name": "x", "host": "10.0.0.1", "username": "admin"},
    )
    assert "tenant 987654321 does not exist" in await expect_error(resp, 400)


async def test_unknown_router_id_is_not_found(api: Client) -> None:
    """GET /api/routers/{id} of no router answers 404 JSON."""
    assert "router 987654321" in await expect_error(await api.get("/api/routers/987654321"), 404)


@pytest.mark.parametrize("bad", ["abc", "1.5", "-1", "99999999999999999999999"])
async def test_malformed_router_id_is_a_json_client_error(api: Client, bad: str) -> None:
    """A router id that is not a (storable) integer answers 404 or 400 JSON, never 500."""
    resp = await api.get(f"/api/routers/{bad}")
    assert resp.status in (400, 404)
    await expect_error(resp, resp.status)


# --- packages ------------------------------------------------------------------------------


async def test_package_is_created_and_listed(api: Client, stack: Stack) -> None:
    """POST /api/packages answers 201; GET /api/packages?tenant_id= lists it."""
    body = await created(
        await api.post(
            "/api/packages",
            json={
                "tenant_id": stack.tenant_id,
                "name": "gold",
                "profile": "premium",
                "rate_limit": "20M/20M",
                "price": "12.50",
                "period_days": 30,
            },
        )
    )
    assert body["profile"] == "premium"
    assert body["rate_limit"] == "20M/20M"
    listed = await get_json(api, f"/api/packages?tenant_id={stack.tenant_id}")
    by_name = {p["name"]: p for p in listed["packages"]}
    assert set(by_name) == {"basic", "premium", "gold"}
    assert by_name["gold"]["id"] == body["id"]
    assert float(by_name["gold"]["price"]) == 12.5
    assert by_name["gold"]["period_days"] == 30


@pytest.mark.parametrize(
    ("field", "value"), [("price", -1), ("period_days", 0), ("period_days", 367)]
)
async def test_package_out_of_range_is_rejected(
    api: Client, stack: Stack, field: str, value: int
) -> None:
    """A negative price or a period outside 1..366 days gets 400 naming the field."""
    body = {
        "tenant_id": stack.tenant_id,
        "name": "bad",
        "profile": "basic",
        "price": 5,
        "period_days": 30,
        field: value,
    }
    message = await expect_error(await api.post("/api/packages", json=body), 400)
    assert field in message
    listed = await get_json(api, f"/api/packages?tenant_id={stack.tenant_id}")
    assert "bad" not in {p["name"] for p in listed["packages"]}


# --- subscribers: life cycle ---------------------------------------------------------------


async def test_new_subscriber_is_pending_then_synced(api: Client, stack: Stack) -> None:
    """POST gives 201 pending without the password; after the sync GET shows it synced."""
    payload = subscriber_body(stack, "alice")
    resp = await api.post("/api/subscribers", json=payload)
    raw = await resp.text()
    assert resp.status == 201, raw
    assert payload["password"] not in raw
    body = orjson.loads(raw)
    assert "password" not in body
    assert body["sync_status"] == "pending"
    assert body["last_synced_at"] is None
    sid = body["id"]

    await stack.settle()
    assert stack.secrets()["alice"]["password"] == payload["password"]
    row = await get_json(api, f"/api/subscribers/{sid}")
    assert row["sync_status"] == "synced"
    assert row["sync_error"] is None
    assert row["last_synced_at"] is not None
    assert row["online"] is False
    assert row["address"] is None
    assert "password" not in row

    stack.sim.connect_session("alice", address="10.9.8.7")
    await router_facts(stack.sync, await load_router(stack.db, stack.router_id))
    live = await get_json(api, f"/api/subscribers/{sid}")
    assert live["online"] is True
    assert live["address"] == "10.9.8.7"


async def test_suspension_by_patch_reaches_the_router(api: Client, stack: Stack) -> None:
    """PATCH is_suspended answers pending; after the sync it is synced and the secret disabled."""
    sid = await new_subscriber(api, stack, "bob")
    await stack.settle()
    assert stack.secrets()["bob"]["disabled"] == "false"
    resp = await api.patch(f"/api/subscribers/{sid}", json={"is_suspended": True})
    assert resp.status == 200
    body = await resp.json()
    assert body["is_suspended"] is True
    assert body["sync_status"] == "pending"
    await stack.settle()
    assert (await get_json(api, f"/api/subscribers/{sid}"))["sync_status"] == "synced"
    assert stack.secrets()["bob"]["disabled"] == "true"


async def test_patch_with_unknown_field_is_rejected(api: Client, stack: Stack) -> None:
    """PATCH with a field the subscriber has not gets 400 naming it, and changes nothing."""
    sid = await new_subscriber(api, stack, "carol")
    before = await get_json(api, f"/api/subscribers/{sid}")
    resp = await api.patch(f"/api/subscribers/{sid}", json={"is_suspendd": True})
    assert "is_suspendd" in await expect_error(resp, 400)
    assert await get_json(api, f"/api/subscribers/{sid}") == before


async def test_empty_patch_is_rejected(api: Client, stack: Stack) -> None:
    """PATCH {} gets 400: there is nothing to change."""
    sid = await new_subscriber(api, stack, "dave")
    message = await expect_error(await api.patch(f"/api/subscribers/{sid}", json={}), 400)
    assert "nothing to change" in message


async def test_patch_to_another_router_is_rejected(api: Client, stack: Stack) -> None:
    """PATCH moving a subscriber to another router gets 400 and the subscriber stays put."""
    other = await created(
        await api.post(
            "/api/routers",
            json={
                "tenant_id": stack.tenant_id,
                "name": "r-other",
                "host": "127.0.0.1",
                "username": "admin",
                "password": "x",
            },
        )
    )
    sid = await new_subscriber(api, stack, "erin")
    resp = await api.patch(f"/api/subscribers/{sid}", json={"router_id": other["id"]})
    assert "another router" in await expect_error(resp, 400)
    assert (await get_json(api, f"/api/subscribers/{sid}"))["router_id"] == stack.router_id


@pytest.mark.parametrize(
    "field", ["router_id", "package_id", "username", "password", "service", "is_suspended"]
)
async def test_patch_null_on_a_required_field_is_rejected(
    api: Client, stack: Stack, field: str
) -> None:
    """PATCH setting a field the subscriber cannot be without to null gets 400, not 500."""
    sid = await new_subscriber(api, stack, f"nul-{field}")
    before = await get_json(api, f"/api/subscribers/{sid}")
    resp = await api.patch(f"/api/subscribers/{sid}", json={field: None})
    assert f"{field}: cannot be null" in await expect_error(resp, 400)
    assert await get_json(api, f"/api/subscribers/{sid}") == before


async def test_patch_null_clears_an_optional_field(api: Client, stack: Stack) -> None:
    """PATCH with phone null clears the phone."""
    sid = await new_subscriber(api, stack, "phoebe", phone="+255700000001")
    resp = await api.patch(f"/api/subscribers/{sid}", json={"phone": None})
    assert resp.status == 200
    assert (await resp.json())["phone"] is None


async def test_non_ascii_username_is_rejected(api: Client, stack: Stack) -> None:
    """A username RouterOS cannot take (non-ASCII) gets 400 naming the field."""
    resp = await api.post("/api/subscribers", json=subscriber_body(stack, "jöhn"))
    assert "username" in await expect_error(resp, 400)
    found = await get_json(api, f"/api/subscribers?router_id={stack.router_id}")
    assert found["total"] == 0


async def test_naive_expiry_is_rejected(api: Client, stack: Stack) -> None:
    """An expires_at without a UTC offset gets 400: expiry is an instant."""
    resp = await api.post(
        "/api/subscribers", json=subscriber_body(stack, "naive", expires_at="2030-01-01T00:00:00")
    )
    message = await expect_error(resp, 400)
    assert "expires_at" in message
    assert "offset" in message


async def test_aware_expiry_is_kept_as_an_instant(api: Client, stack: Stack) -> None:
    """An expires_at with an offset is stored as that instant."""
    sid = await new_subscriber(api, stack, "aware", expires_at="2030-01-01T03:00:00+03:00")
    row = await get_json(api, f"/api/subscribers/{sid}")
    assert datetime.fromisoformat(row["expires_at"]) == datetime(2030, 1, 1, tzinfo=UTC)


async def test_duplicate_username_on_a_router_is_a_conflict(api: Client, stack: Stack) -> None:
    """A second subscriber with the same username and service on one router gets 409."""
    await new_subscriber(api, stack, "frank")
    resp = await api.post("/api/subscribers", json=subscriber_body(stack, "frank"))
    assert "frank" in await expect_error(resp, 409)
    found = await get_json(api, f"/api/subscribers?router_id={stack.router_id}&q=frank")
    assert found["total"] == 1


async def test_package_of_another_tenant_is_rejected(api: Client, stack: Stack) -> None:
    """A subscriber cannot take a package that belongs to another tenant."""
    other = await created(await api.post("/api/tenants", json={"name": f"{stack.prefix}-o"}))
    package = await created(
        await api.post(
            "/api/packages",
            json={
                "tenant_id": other["id"],
                "name": "theirs",
                "profile": "basic",
                "price": 1,
                "period_days": 30,
            },
        )
    )
    resp = await api.post(
        "/api/subscribers", json=subscriber_body(stack, "gina", package_id=package["id"])
    )
    assert f"package {package['id']} of tenant {stack.tenant_id}" in await expect_error(resp, 400)
    sid = await new_subscriber(api, stack, "gina")
    resp = await api.patch(f"/api/subscribers/{sid}", json={"package_id": package["id"]})
    await expect_error(resp, 400)


async def test_delete_removes_the_secret(api: Client, stack: Stack) -> None:
    """DELETE answers 200; after the sync the secret is gone and GET shows deleted_at."""
    sid = await new_subscriber(api, stack, "henry")
    await stack.settle()
    assert "henry" in stack.secrets()
    resp = await api.delete(f"/api/subscribers/{sid}")
    assert resp.status == 200
    assert (await resp.json())["deleted_at"] is not None
    await stack.settle()
    assert "henry" not in stack.secrets()
    row = await get_json(api, f"/api/subscribers/{sid}")
    assert row["deleted_at"] is not None
    assert row["sync_status"] == "synced"
    again = await api.delete(f"/api/subscribers/{sid}")
    assert f"subscriber {sid}" in await expect_error(again, 404)
    await expect_error(await api.patch(f"/api/subscribers/{sid}", json={"phone": None}), 404)


async def test_forced_sync_reaches_the_sync_stream(api: Client, stack: Stack) -> None:
    """POST /sync answers 202 and, through the outbox, puts a sync_subscriber job on the stream."""
    sid = await new_subscriber(api, stack, "ivan")
    await stack.settle()
    stream = stack.engine.keys.stream("sync")
    assert await stack.deps.redis.xlen(stream) == 0
    resp = await api.post(f"/api/subscribers/{sid}/sync")
    assert resp.status == 202
    assert (await resp.json())["queued"] is True
    assert await stack.relay.relay_once()
    assert await stack.deps.redis.xlen(stream) == 1
    [job] = await sync_stream(stack)
    assert job["type"] == "sync_subscriber"
    assert job["payload"]["subscriber_id"] == sid
    await expect_error(await api.post("/api/subscribers/987654321/sync"), 404)


async def test_search_and_sync_status_filter(api: Client, stack: Stack) -> None:
    """GET /api/subscribers finds by a name fragment and filters by sync status."""
    ok = await new_subscriber(api, stack, "kilo-one", email="kilo@example.com")
    await new_subscriber(api, stack, "lima-two")
    stack.sim.add_item(SECRET, name="mike", password="hand", profile="default")  # not ours
    broken = await new_subscriber(api, stack, "mike")
    await stack.settle()
    on_router = f"router_id={stack.router_id}"

    found = await get_json(api, f"/api/subscribers?{on_router}&q=kilo")
    assert [s["id"] for s in found["subscribers"]] == [ok]
    assert found["total"] == 1
    by_mail = await get_json(api, f"/api/subscribers?{on_router}&q=KILO%40example")
    assert [s["id"] for s in by_mail["subscribers"]] == [ok]

    errors = await get_json(api, f"/api/subscribers?{on_router}&sync_status=error")
    assert [s["id"] for s in errors["subscribers"]] == [broken]
    assert "does not manage" in errors["subscribers"][0]["sync_error"]
    synced = await get_json(api, f"/api/subscribers?{on_router}&sync_status=synced")
    assert broken not in {s["id"] for s in synced["subscribers"]}
    assert synced["total"] == 2

    await expect_error(await api.get("/api/subscribers?sync_status=lost"), 400)


@pytest.mark.parametrize("query", ["limit=-1", "offset=x", "limit=abc", "router_id=x"])
async def test_bad_paging_is_a_client_error(api: Client, query: str) -> None:
    """Malformed or negative paging and filter parameters get 400, never 500."""
    await expect_error(await api.get(f"/api/subscribers?{query}"), 400)


async def test_correlation_id_reaches_the_audit_log(api: Client, stack: Stack) -> None:
    """The caller's X-Correlation-Id tags the audit rows of the router commands it caused."""
    cid = f"ui-{stack.prefix}-create"
    resp = await api.post(
        "/api/subscribers",
        json=subscriber_body(stack, "nina"),
        headers={"X-Correlation-Id": cid},
    )
    sid = (await created(resp))["id"]
    await stack.settle()
    rows = await stack.db.fetch(
        "SELECT action, outcome, subscriber_id FROM audit_log WHERE correlation_id = $1", cid
    )
    assert [(r["action"], r["outcome"], r["subscriber_id"]) for r in rows] == [
        (f"add {SECRET}", "ok", sid)
    ]


# --- routers: plan, guard, reboot ----------------------------------------------------------


async def test_plan_shows_drift_and_writes_nothing(api: Client, stack: Stack) -> None:
    """A hand edit re-enabling a suspended secret shows in the dry run; nothing is written."""
    sid = await new_subscriber(api, stack, "oscar", is_suspended=True)
    await stack.settle()
    [entry] = stack.sim.find(SECRET, name="oscar")
    assert entry["disabled"] == "true"
    stack.sim.state.execute(SECRET, "set", {".id": entry[".id"], "disabled": "false"}, [])
    writes = sum(stack.sim.writes.values())

    resp = await api.post(f"/api/routers/{stack.router_id}/plan")
    assert resp.status == 200, await resp.text()
    plan = await resp.json()
    assert plan["router_id"] == stack.router_id
    assert plan["changes"] == [
        {
            "subscriber_id": sid,
            "commands": [
                {"action": "set", "menu": SECRET, "id": entry[".id"], "fields": {"disabled": "yes"}}
            ],
        }
    ]
    assert plan["would_disconnect"] == 1
    assert sum(stack.sim.writes.values()) == writes
    assert stack.secrets()["oscar"]["disabled"] == "false"
    assert await sync_stream(stack) == []


async def test_plan_of_unreachable_router_is_503(api: Client, stack: Stack) -> None:
    """A dry run on a router that refuses connections answers 503 JSON."""
    await stack.sim.refuse_connections(True)
    message = await expect_error(await api.post(f"/api/routers/{stack.router_id}/plan"), 503)
    assert "cannot read the router" in message
    await expect_error(await api.post("/api/routers/987654321/plan"), 404)


async def test_plan_of_router_refusing_the_login_is_a_json_error(api: Client, stack: Stack) -> None:
    """A dry run on a router that rejects imsys's login answers a JSON error, not a bare 500."""
    router = await created(
        await api.post(
            "/api/routers",
            json={
                "tenant_id": stack.tenant_id,
                "name": "wrong-pw",
                "host": "127.0.0.1",
                "port": stack.sim.port,
                "username": "admin",
                "password": "not-it",
            },
        )
    )
    resp = await api.post(f"/api/routers/{router['id']}/plan")
    assert resp.status in (502, 503)
    message = await expect_error(resp, resp.status)
    assert "not-it" not in message


async def test_guard_confirm_clears_the_guard(api: Client, stack: Stack) -> None:
    """Confirming the guard clears its trip, sets an override and queues the sweep again."""
    await stack.db.execute(
        "UPDATE routers SET guard_tripped_at = now(), guard_reason = 'too many' WHERE id = $1",
        stack.router_id,
    )
    resp = await api.post(f"/api/routers/{stack.router_id}/guard/confirm", json={"minutes": 30})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["guard_tripped_at"] is None
    assert body["guard_reason"] is None
    until = datetime.fromisoformat(body["guard_override_until"])
    assert 25 * 60 < (until - datetime.now(UTC)).total_seconds() <= 30 * 60
    row = await get_json(api, f"/api/routers/{stack.router_id}")
    assert row["guard_tripped_at"] is None
    assert row["guard_override_until"] == body["guard_override_until"]
    assert {j["type"] for j in await sync_stream(stack)} == {"expire_tenant", "sync_router"}


@pytest.mark.parametrize("body", [{"minutes": 0}, {"minutes": "soon"}, {"hours": 1}])
async def test_guard_confirm_with_bad_minutes_is_rejected(
    api: Client, stack: Stack, body: dict[str, Any]
) -> None:
    """Guard confirm with minutes out of range, not a number, or another field gets 400."""
    await stack.db.execute(
        "UPDATE routers SET guard_tripped_at = now(), guard_reason = 'x' WHERE id = $1",
        stack.router_id,
    )
    resp = await api.post(f"/api/routers/{stack.router_id}/guard/confirm", json=body)
    await expect_error(resp, 400)
    row = await get_json(api, f"/api/routers/{stack.router_id}")
    assert row["guard_tripped_at"] is not None
    assert row["guard_override_until"] is None


async def test_reboot_is_queued_once(api: Client, stack: Stack) -> None:
    """POST /reboot answers 202 and puts one reboot_router job on the sync stream."""
    resp = await api.post(f"/api/routers/{stack.router_id}/reboot")
    assert resp.status == 202
    assert (await resp.json())["queued"] is True
    again = await api.post(f"/api/routers/{stack.router_id}/reboot")
    assert again.status == 202
    assert (await again.json())["queued"] is False
    jobs = await sync_stream(stack)
    assert [(j["type"], j["payload"]["router_id"]) for j in jobs] == [
        ("reboot_router", stack.router_id)
    ]
    await expect_error(await api.post("/api/routers/987654321/reboot"), 404)


# --- errors and auth -----------------------------------------------------------------------


async def test_unstorable_values_are_client_errors(api: Client, stack: Stack) -> None:
    """Ids past 64 bits and text PostgreSQL cannot hold get 400 JSON, never 500."""
    huge = 2**63  # one past PostgreSQL's bigint
    for resp in (
        await api.post("/api/subscribers", json=subscriber_body(stack, "big", tenant_id=huge)),
        await api.post("/api/subscribers", json=subscriber_body(stack, "big", router_id=huge)),
        await api.post("/api/tenants", json={"name": f"{stack.prefix}-nul\u0000"}),
        await api.get(f"/api/subscribers?router_id={huge}"),
        await api.get(f"/api/subscribers/{huge}"),
        await api.post(f"/api/subscribers/{huge}/sync"),
        await api.post(f"/api/routers/{huge}/plan"),
    ):
        await expect_error(resp, 400)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/tenants", {"name": ""}, 400),
        ("POST", "/api/tenants", {"name": "x", "colour": "red"}, 400),
        ("POST", "/api/routers", {"tenant_id": "one"}, 400),
        ("POST", "/api/packages", {}, 400),
        ("POST", "/api/subscribers", {"service": "dialup"}, 400),
        ("POST", "/api/subscribers", {"tenant_id": 2**70}, 400),
        ("GET", "/api/subscribers/987654321", None, 404),
        ("PATCH", "/api/subscribers/987654321", {"phone": None}, 404),
        ("DELETE", "/api/subscribers/987654321", None, 404),
        ("GET", "/api/subscribers/99999999999999999999999", None, 400),
        ("GET", "/api/routers?tenant_id=abc", None, 400),
        ("GET", "/api/no-such-thing", None, 404),
        ("PUT", "/api/tenants", {"name": "x"}, 405),
        ("POST", "/api/subscribers/987654321/sync", None, 404),
    ],
)
async def test_every_error_is_json(
    api: Client, method: str, path: str, body: Any, status: int
) -> None:
    """Each bad request answers its 4xx status with a JSON {"error": ...} body."""
    resp = await api.request(method, path, json=body)
    await expect_error(resp, status)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/tenants"), ("POST", "/api/subscribers"), ("GET", "/api/routers/1")],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer "])
async def test_without_the_token_is_401(
    api: Client, method: str, path: str, auth: str | None
) -> None:
    """A call without the right bearer token answers 401 JSON and does nothing."""
    headers = {} if auth is None else {"Authorization": auth}
    async with aiohttp.ClientSession() as plain:
        resp = await plain.request(method, api.make_url(path), headers=headers, json={})
        await expect_error(resp, 401)
