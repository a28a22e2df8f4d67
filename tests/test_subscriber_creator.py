"""Single creates that arrive together are written together (imsys.network.creator), each
with its own outcome, correlation id and outbox row."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imsys.http import api_network
from imsys.http.idempotency import IdempotencyStore, Scope, Stored
from imsys.http.server import build_app
from imsys.network import models
from imsys.network.creator import SubscriberCreator
from imsys.network.errors import Conflict, Invalid
from imsys.sync.jobs import sync_job_id
from imsys.sync.service import subscriber_changed, subscribers_changed
from tests.sync_support import Stack
from tests.test_http_network_api import AUTH, TOKEN, subscriber_body

Client = TestClient[web.Request, web.Application]


def creator(stack: Stack) -> SubscriberCreator:
    return SubscriberCreator(stack.db, on_change=subscriber_changed, on_created=subscribers_changed)


def sub(stack: Stack, name: str, **over: Any) -> models.SubscriberIn:
    fields: dict[str, Any] = {
        "tenant_id": stack.tenant_id,
        "router_id": stack.router_id,
        "package_id": stack.basic,
        "username": f"{stack.prefix}-{name}",
        "password": f"pw-{name}",
        "service": "pppoe",
        **over,
    }
    return models.SubscriberIn(**fields)


async def outbox_of(stack: Stack, ids: list[int]) -> dict[str, dict[str, Any]]:
    """The outbox rows of these subscribers' syncs, by job id, with their payloads."""
    rows = await stack.db.fetch(
        "SELECT job_id, payload::text AS payload FROM outbox WHERE job_id = ANY($1::text[])",
        [sync_job_id(i) for i in ids],
    )
    return {r["job_id"]: orjson.loads(r["payload"]) for r in rows}


async def test_concurrent_creates_share_one_transaction(stack: Stack) -> None:
    """Twenty creates queued together are one transaction (one xmin), and each row keeps
    its own correlation id, in the row and in its own outbox row."""
    c = creator(stack)
    rows = await asyncio.gather(
        *(c.create(sub(stack, f"together-{i}"), f"corr-{i}") for i in range(20))
    )
    ids = [r["id"] for r in rows]
    assert [r["username"] for r in rows] == [f"{stack.prefix}-together-{i}" for i in range(20)]
    assert all(r["sync_status"] == "pending" for r in rows)
    written = await stack.db.fetch(
        "SELECT id, xmin::text AS xmin, pending_correlations FROM subscribers "
        "WHERE id = ANY($1::bigint[])",
        ids,
    )
    # All were queued before the first flush ran (asyncio runs ready tasks in order).
    assert len({w["xmin"] for w in written}) == 1
    by_id = {w["id"]: w["pending_correlations"] for w in written}
    assert [by_id[i] for i in ids] == [[f"corr-{i}"] for i in range(20)]
    jobs = await outbox_of(stack, ids)
    assert [jobs[sync_job_id(i)]["correlation_id"] for i in ids] == [f"corr-{n}" for n in range(20)]


async def test_a_bad_create_fails_alone(stack: Stack) -> None:
    """In one batch, a taken username is a Conflict and a missing package an Invalid naming
    it; the others are written, and only they have outbox rows."""
    await stack.add_subscriber(f"{stack.prefix}-taken")
    c = creator(stack)
    outcomes = await asyncio.gather(
        c.create(sub(stack, "ok-1"), "c1"),
        c.create(sub(stack, "taken"), "c2"),
        c.create(sub(stack, "nopkg", package_id=987654321), "c3"),
        c.create(sub(stack, "ok-2"), "c4"),
        return_exceptions=True,
    )
    ok1, taken, nopkg, ok2 = outcomes
    assert isinstance(taken, Conflict)
    assert f"subscriber '{stack.prefix}-taken'" in str(taken)
    assert isinstance(nopkg, Invalid)
    assert f"package 987654321 of tenant {stack.tenant_id} does not exist" in str(nopkg)
    assert isinstance(ok1, dict)
    assert isinstance(ok2, dict)
    names = await stack.db.fetch(
        "SELECT username FROM subscribers WHERE tenant_id = $1 AND username LIKE $2",
        stack.tenant_id,
        f"{stack.prefix}-%",
    )
    assert sorted(n["username"] for n in names) == sorted(
        f"{stack.prefix}-{n}" for n in ("taken", "ok-1", "ok-2")
    )
    jobs = await outbox_of(stack, [ok1["id"], ok2["id"]])
    assert sorted(j["correlation_id"] for j in jobs.values()) == ["c1", "c4"]


async def test_same_username_twice_at_once(stack: Stack) -> None:
    """Two creates of one username queued together (they never share a batch): one is
    created, the other is the 409 a second create gets, and the row is the winner's."""
    c = creator(stack)
    outcomes = await asyncio.gather(
        c.create(sub(stack, "twice", password="first-pw"), "a"),
        c.create(sub(stack, "twice", password="second-pw"), "b"),
        return_exceptions=True,
    )
    made = [(o, pw) for o, pw in zip(outcomes, ("first-pw", "second-pw"), strict=True)]
    won = [(o, pw) for o, pw in made if isinstance(o, dict)]
    lost = [o for o, _ in made if not isinstance(o, dict)]
    assert len(won) == 1
    assert len(lost) == 1
    assert isinstance(lost[0], Conflict)
    stored = await stack.db.fetch(
        "SELECT id, password FROM subscribers WHERE username = $1", f"{stack.prefix}-twice"
    )
    assert [(s["id"], s["password"]) for s in stored] == [(won[0][0]["id"], won[0][1])]


async def test_a_value_postgres_refuses_does_not_fail_the_batch(stack: Stack) -> None:
    """A row PostgreSQL cannot store (a NUL in the e-mail) fails the batch's statement; each
    create is then tried alone, so only that one fails (DataError, the API's 400)."""
    c = creator(stack)
    outcomes = await asyncio.gather(
        *(c.create(sub(stack, f"nul-{i}"), f"n{i}") for i in range(3)),
        c.create(sub(stack, "nul-bad", email="a\x00b@example.com"), "bad"),
        return_exceptions=True,
    )
    assert all(isinstance(o, dict) for o in outcomes[:3])
    assert isinstance(outcomes[3], asyncpg.DataError)
    found = await stack.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE username LIKE $1", f"{stack.prefix}-nul-%"
    )
    assert found == 3


async def test_a_create_cancelled_while_queued_is_not_written(stack: Stack) -> None:
    """A request that goes away before its batch is taken writes nothing."""
    c = creator(stack)
    task = asyncio.create_task(c.create(sub(stack, "gone"), "gone"))
    await asyncio.sleep(0)  # the create is queued; its flush has not run yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await c.create(sub(stack, "after"), "after")  # a flush has run since
    names = await stack.db.fetch(
        "SELECT username FROM subscribers WHERE username = ANY($1::text[])",
        [f"{stack.prefix}-gone", f"{stack.prefix}-after"],
    )
    assert [n["username"] for n in names] == [f"{stack.prefix}-after"]


# --- through the API, with Idempotency-Key (claims and answers are batched too) -------------


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The admin app with the network routes, served for real, with the token."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        yield client


async def test_concurrent_keyed_creates_replay_their_own_answers(api: Client, stack: Stack) -> None:
    """Sixteen creates at once, each with its own key: each is created once, its key is
    claimed and answered in shared statements, and sent again each replays its own answer."""

    async def post(i: int) -> tuple[int, str | None, dict[str, Any]]:
        resp = await api.post(
            "/api/subscribers",
            json=subscriber_body(stack, f"{stack.prefix}-keyed-{i}"),
            headers={"Idempotency-Key": f"{stack.prefix}-key-{i}"},
        )
        return resp.status, resp.headers.get("Idempotent-Replayed"), await resp.json()

    first = await asyncio.gather(*(post(i) for i in range(16)))
    assert [(s, r) for s, r, _ in first] == [(201, None)] * 16
    assert [b["username"] for _, _, b in first] == [f"{stack.prefix}-keyed-{i}" for i in range(16)]
    again = await asyncio.gather(*(post(i) for i in range(16)))
    assert [(s, r) for s, r, _ in again] == [(201, "true")] * 16
    assert [b for _, _, b in again] == [b for _, _, b in first]


async def test_concurrent_claims_share_one_statement(stack: Stack) -> None:
    """Claims made together are one insert (one xmin), each won by its own caller; their
    answers, recorded together, replay each to its own key."""
    store = IdempotencyStore(stack.db)
    await store.claim(Scope(f"{stack.prefix}-first", "POST", "/api/x"), b"d")  # its purge ran
    scopes = [Scope(f"{stack.prefix}-claim-{i}", "POST", "/api/x") for i in range(8)]
    claims = await asyncio.gather(*(store.claim(s, b"digest") for s in scopes))
    assert all(isinstance(c, uuid.UUID) for c in claims)
    xmins = await stack.db.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM idempotency_keys WHERE key LIKE $1",
        f"{stack.prefix}-claim-%",
    )
    assert xmins == 1
    await asyncio.gather(
        *(
            store.complete(s, cast(uuid.UUID, c), 201, f'{{"n":{i}}}'.encode())
            for i, (s, c) in enumerate(zip(scopes, claims, strict=True))
        )
    )
    replays = await asyncio.gather(*(store.claim(s, b"digest") for s in scopes))
    assert replays == [Stored(201, f'{{"n":{i}}}'.encode()) for i in range(8)]


async def test_one_key_sent_twice_at_once_creates_once(api: Client, stack: Stack) -> None:
    """The same key and body twice at once (a client retrying too soon): one create; the
    other answer is the first's replay or the 409 that says it is still in progress."""
    body = subscriber_body(stack, f"{stack.prefix}-twin")
    key = {"Idempotency-Key": f"{stack.prefix}-twin-key"}
    a, b = await asyncio.gather(
        api.post("/api/subscribers", json=body, headers=key),
        api.post("/api/subscribers", json=body, headers=key),
    )
    statuses = sorted([a.status, b.status])
    assert statuses in ([201, 201], [201, 409]), statuses
    count = await stack.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE username = $1", f"{stack.prefix}-twin"
    )
    assert count == 1
