"""Router maintenance and the operators' controls in the admin API: a router in
maintenance has its jobs wait without spending attempts and is not reconciled by the
timer; pause/resume and maintenance through HTTP, with 4xx JSON for bad input. Real
Redis, PostgreSQL, RouterOS simulator and admin server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from imsys.app import build_http
from imsys.sync.maintenance import set_maintenance
from imsys.sync.reconcile import enqueue_reconciliation
from imsys.sync.service import queue_reconciliation
from tests.sync_support import Stack

AUTH = {"Authorization": "Bearer test-token"}  # the `settings` fixture's


def ahead(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def delayed_jobs(stack: Stack) -> list[dict[str, str]]:
    """The fields of every job waiting in the sync stream's delayed store."""
    members = await stack.deps.redis.zrange(stack.engine.keys.delayed("sync"), 0, -1)
    out = []
    for m in members:
        flat = orjson.loads(m)["f"]
        out.append(dict(zip(flat[::2], flat[1::2], strict=True)))
    return out


async def make_due(stack: Stack) -> None:
    """Bring every delayed job's time forward to now and put it back on its stream."""
    key = stack.engine.keys.delayed("sync")
    for member in await stack.deps.redis.zrange(key, 0, -1):
        await stack.deps.redis.zadd(key, {member: 0})
    await stack.engine.promote_once()


async def test_maintenance_defers_jobs_without_spending_attempts_and_ends_at_until(
    stack: Stack,
) -> None:
    """While its router is in maintenance a subscriber's sync job is deferred again and
    again with its attempt unchanged, nothing reaches the router and nothing is
    dead-lettered; once ``until`` has passed the job goes through on its own."""
    sid = await stack.add_subscriber("mona")
    await set_maintenance(stack.db, stack.router_id, ahead(3600))
    await stack.relay.relay_once()
    sync = stack.engine.consumers["sync"]
    for _ in range(3):
        assert await sync.process_once(block_ms=10) == 1
        [job] = await delayed_jobs(stack)
        assert job["type"] == "sync_subscriber"
        assert job.get("attempt", "1") == "1"
        assert "maintenance until" in job["last_error"]
        await make_due(stack)
    assert "mona" not in stack.secrets()
    assert await stack.engine.dead_letters.count() == 0
    assert (await stack.subscriber(sid))["sync_status"] != "synced"

    # Ends a second from now: the deferred job comes back after that and syncs.
    await set_maintenance(stack.db, stack.router_id, ahead(1))
    await stack.settle()
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
    assert "mona" in stack.secrets()
    assert await stack.engine.dead_letters.count() == 0


async def test_reconciliation_passes_a_router_in_maintenance_by(stack2: Stack) -> None:
    """The reconciliation timer queues no sync_router for a router in maintenance (the
    other router still gets one), and a reconciliation queued for it anyway is deferred
    without touching the router."""
    down, up = stack2.router_ids
    await set_maintenance(stack2.db, down, ahead(3600))
    await enqueue_reconciliation(stack2.sync)  # every router of the database's tenants
    key = stack2.engine.keys.stream("sync")
    queued = [
        orjson.loads(f["payload"])["router_id"] for _, f in await stack2.deps.redis.xrange(key)
    ]
    assert up in queued
    assert down not in queued
    # Only the job below is to run here (the timer also queued other tests' routers).
    await stack2.deps.redis.xdel(key, *[eid for eid, _ in await stack2.deps.redis.xrange(key)])

    await queue_reconciliation(stack2.engine.producer, down)
    before = len(stack2.sims[0].items("/ppp/profile"))
    assert await stack2.engine.consumers["sync"].process_once(block_ms=10) == 1
    [job] = await delayed_jobs(stack2)
    assert job["type"] == "sync_router"
    assert job.get("attempt", "1") == "1"
    assert len(stack2.sims[0].items("/ppp/profile")) == before
    assert await stack2.engine.dead_letters.count() == 0


Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Any]:
    """The admin app as the service builds it, with the admin token."""
    app = build_http(stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as c:
        yield c


async def metric(client: Any, name: str, **labels: str) -> float | None:
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def error(resp: Any, status: int) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return str((await resp.json())["error"])


async def test_api_maintenance_starts_shows_and_ends(client: Any, stack: Stack) -> None:
    """POST /api/routers/{id}/maintenance sets ``until``: the router read and /metrics show
    it and a dry-run plan is refused (503); ``until: null`` ends it at once and queues the
    router's reconciliation."""
    rid = stack.router_id
    assert await metric(client, "imsys_router_maintenance", router_id=str(rid)) == 0
    until = ahead(600).isoformat()
    resp = await client.post(f"/api/routers/{rid}/maintenance", json={"until": until})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["router_id"] == rid
    assert datetime.fromisoformat(body["maintenance_until"]) == datetime.fromisoformat(until)
    shown = await (await client.get(f"/api/routers/{rid}")).json()
    assert datetime.fromisoformat(shown["maintenance_until"]) == datetime.fromisoformat(until)
    listed = await (await client.get(f"/api/routers?tenant_id={stack.tenant_id}")).json()
    assert [r["maintenance_until"] is not None for r in listed["routers"]] == [True]
    assert await metric(client, "imsys_router_maintenance", router_id=str(rid)) == 1
    # A dry run would read the router: refused while it is in maintenance, saying why.
    assert "maintenance until" in await error(await client.post(f"/api/routers/{rid}/plan"), 503)

    outbox = await stack.db.fetchval("SELECT count(*) FROM outbox")
    resp = await client.post(f"/api/routers/{rid}/maintenance", json={"until": None})
    assert resp.status == 200
    assert (await resp.json())["maintenance_until"] is None
    assert (await (await client.get(f"/api/routers/{rid}")).json())["maintenance_until"] is None
    assert await metric(client, "imsys_router_maintenance", router_id=str(rid)) == 0
    assert await stack.db.fetchval("SELECT count(*) FROM outbox") == outbox + 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"until": "tomorrow"}, "until"),
        ({"until": "2999-01-01T00:00:00"}, "until"),  # no offset: whose midnight?
        ({"until": "2001-01-01T00:00:00Z"}, "future"),
        ({}, "until"),
        ({"until": None, "extra": 1}, "extra"),
    ],
    ids=["not-a-time", "naive", "past", "missing", "extra-field"],
)
async def test_api_maintenance_refuses_a_bad_time(
    client: Any, stack: Stack, body: dict[str, Any], fragment: str
) -> None:
    """A time that is not an ISO instant with its offset, one in the past, a missing
    ``until`` or an unknown field is a 400 JSON naming it; the router is unchanged."""
    resp = await client.post(f"/api/routers/{stack.router_id}/maintenance", json=body)
    assert fragment in await error(resp, 400)
    row = await (await client.get(f"/api/routers/{stack.router_id}")).json()
    assert row["maintenance_until"] is None


async def test_api_maintenance_of_an_unknown_router_is_404(client: Any) -> None:
    """An unknown router id is a 404 JSON."""
    resp = await client.post("/api/routers/987654321/maintenance", json={"until": None})
    assert "router 987654321" in await error(resp, 404)


async def test_api_pause_and_resume_a_stream(client: Any, stack: Stack) -> None:
    """POST /api/queues/{stream}/pause and /resume: GET /api/queues and /metrics show the
    state, the engine stops and starts the stream, a repeat says nothing changed, an
    unknown stream is a 404 JSON."""
    assert await metric(client, "imsys_stream_paused", stream="sync") == 0
    resp = await client.post("/api/queues/sync/pause")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"stream": "sync", "paused": True, "changed": True}
    again = await (await client.post("/api/queues/sync/pause")).json()
    assert again["changed"] is False
    assert stack.engine.consumers["sync"].paused is True
    queues = await (await client.get("/api/queues")).json()
    assert {s["stream"]: s["paused"] for s in queues["streams"]} == {
        "sync": True,
        "billing": False,
        "events": False,
        "bouncer": False,
    }
    assert await metric(client, "imsys_stream_paused", stream="sync") == 1
    assert await metric(client, "imsys_stream_paused", stream="billing") == 0

    resp = await client.post("/api/queues/sync/resume")
    assert await resp.json() == {"stream": "sync", "paused": False, "changed": True}
    assert stack.engine.consumers["sync"].paused is False
    assert await metric(client, "imsys_stream_paused", stream="sync") == 0

    assert "unknown stream 'nope'" in await error(await client.post("/api/queues/nope/pause"), 404)
    assert "unknown stream" in await error(await client.post("/api/queues/nope/resume"), 404)
    assert (
        await client.post("/api/queues/sync/pause", headers={"Authorization": ""})
    ).status == 401
