"""Tenant-scoped tokens: a tenant's token sees and changes its own tenant only.

The admin app is the service's own (`imsys.app.build_http`), served on 127.0.0.1, over
real PostgreSQL and Redis. Tenant A is the `stack`'s (routers on the RouterOS
simulator); tenant B ("the other") has a router, a package, a subscriber, a payment, a
notification, a Bouncer user batch and a token of its own. A's token tries every
``/api`` route of the app's route table against B's ids.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from imsys import tokens
from imsys.app import build_http
from imsys.billing import payments
from imsys.bouncer import service as bouncer
from imsys.http.access import declared
from imsys.http.openapi import iter_operations, openapi_path
from imsys.network import models, service
from imsys.settings import Settings
from imsys.sync.service import subscriber_changed
from tests.sync_support import ROUTER_PASSWORD, Stack

ADMIN_TOKEN = "test-token"  # the `settings` fixture's
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MARK = "zz-other-tenant"  # in every name of tenant B's, to spot it in any answer
Client = TestClient[web.Request, web.Application]


@dataclass
class Other:
    """Tenant B's objects, and both tenants' tokens."""

    tenant_id: int
    router_id: int
    package_id: int
    subscriber_id: int
    payment_id: int
    notification_id: int
    batch_id: int
    token_id: int
    token_a: str
    token_b: str

    def auth_a(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_a}"}


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_http(stack.deps), host="127.0.0.1")) as c:
        yield c


@pytest.fixture
async def other(stack: Stack) -> Other:
    """Tenant B with one of each object, a notification for A too, and a token each."""
    db = stack.db
    tenant = await service.create_tenant(db, models.TenantIn(name=f"{MARK}-{stack.prefix}"))
    b = tenant["id"]
    router = await service.create_router(
        db,
        models.RouterIn(
            tenant_id=b,
            name=f"{MARK}-r",
            host="127.0.0.1",
            port=stack.sim.port,
            username="admin",
            password=ROUTER_PASSWORD,
        ),
    )
    package = await service.create_package(
        db,
        models.PackageIn(
            tenant_id=b, name=f"{MARK}-p", profile="basic", price=Decimal(5), period_days=30
        ),
    )
    sub = await service.create_subscriber(
        db,
        models.SubscriberIn(
            tenant_id=b,
            router_id=router["id"],
            package_id=package["id"],
            username=f"{MARK}-s",
            password="pw-other",
            service="pppoe",
            phone="+15550100",
        ),
        "test:other",
        on_change=subscriber_changed,
    )
    payment, _ = await payments.record_payment(
        db,
        payments.PaymentIn(
            subscriber_id=sub["id"], amount=Decimal(5), reference=f"{MARK}-ref-{stack.prefix}"
        ),
    )
    note = await db.fetchval(
        "INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient, template, "
        "body, dedupe_key) VALUES ($1, $2, 'sms', '+15550100', 'invoice', $3, $4) RETURNING id",
        b,
        sub["id"],
        f"{MARK} body",
        f"{MARK}:{stack.prefix}",
    )
    batch = await bouncer.submit(
        db,
        stack.deps.settings.bouncer_batching,
        bouncer.UserBatchIn(check_type="deliverable", emails=["b@example.com"], tenant_id=b),
    )
    a_token = await tokens.create(db, tokens.TokenIn(tenant_id=stack.tenant_id, name="a"))
    b_token = await tokens.create(db, tokens.TokenIn(tenant_id=b, name=f"{MARK}-t"))
    return Other(
        tenant_id=b,
        router_id=router["id"],
        package_id=package["id"],
        subscriber_id=sub["id"],
        payment_id=payment["id"],
        notification_id=note,
        batch_id=batch["id"],
        token_id=b_token["id"],
        token_a=a_token["token"],
        token_b=b_token["token"],
    )


def other_id(segment: str, param: str, o: Other) -> str:
    """A path parameter filled with tenant B's object (or any valid value where it names
    no tenant's object); a new kind of parameter must be added here."""
    by_segment = {
        "tenants": o.tenant_id,
        "routers": o.router_id,
        "packages": o.package_id,
        "subscribers": o.subscriber_id,
        "batches": o.batch_id,
        "tokens": o.token_id,
        "dead-letters": "1700000000000-0",
        "templates": "invoice",
        "whatsapp-templates": "invoice",
        "queues": "sync",
        "routers_index": 0,
    }
    key = "routers_index" if param == "index" else segment
    assert key in by_segment, f"the test does not know what {{{param}}} after {segment} is"
    return str(by_segment[key])


def fill(path: str, o: Other) -> str:
    parts, previous = [], ""
    for part in openapi_path(path)[0].split("/"):
        param = re.fullmatch(r"\{(\w+)\}", part)
        parts.append(other_id(previous, param.group(1), o) if param else part)
        previous = part
    return "/".join(parts)


def body_for(method: str, path: str, o: Other) -> Any:
    """A valid body for each route that takes one, naming tenant B wherever it can."""
    subscriber = {
        "tenant_id": o.tenant_id,
        "router_id": o.router_id,
        "package_id": o.package_id,
        "username": "intruder",
        "password": "pw-intruder",
        "service": "pppoe",
    }
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/api/tenants"): {"name": "intruder-tenant"},
        ("PATCH", "/api/tenants/{id}"): {"name": "renamed"},
        ("POST", "/api/routers"): {
            "tenant_id": o.tenant_id,
            "name": "intruder",
            "host": "127.0.0.1",
            "username": "admin",
        },
        ("PATCH", "/api/routers/{id}"): {"name": "renamed"},
        ("POST", "/api/packages"): {
            "tenant_id": o.tenant_id,
            "name": "intruder",
            "profile": "basic",
            "price": 1,
            "period_days": 30,
        },
        ("PATCH", "/api/packages/{id}"): {"name": "renamed"},
        ("POST", "/api/subscribers"): subscriber,
        ("POST", "/api/subscribers/bulk"): [subscriber],
        ("PATCH", "/api/subscribers/{id}"): {"is_suspended": True},
        ("POST", "/api/routers/{id}/adopt"): {"apply": True, "import_unknown": True},
        ("POST", "/api/routers/{id}/guard/confirm"): {"minutes": 5},
        ("POST", "/api/routers/{id}/maintenance"): {"until": "2999-01-01T00:00:00Z"},
        ("POST", "/api/payments"): {
            "subscriber_id": o.subscriber_id,
            "amount": "5.00",
            "reference": "intruder-ref",
        },
        ("PUT", "/api/tenants/{id}/templates/{name}"): {"body": "hello"},
        ("PUT", "/api/tenants/{id}/messaging"): {"sms_fallback": False},
        ("PUT", "/api/tenants/{id}/whatsapp-templates/{kind}"): {"name": "intruder"},
        ("POST", "/api/bouncer/batches"): {
            "check_type": "deliverable",
            "emails": ["x@example.com"],
            "tenant_id": o.tenant_id,
        },
        ("POST", "/api/tokens"): {"tenant_id": o.tenant_id, "name": "intruder"},
        ("POST", "/api/demo/routers/{index}/outage"): {"down": True},
    }
    key = (method, openapi_path(path)[0])
    assert key in bodies, f"the test has no example body for {method} {key[1]}"
    return bodies[key]


def mentions_other(data: Any, o: Other) -> bool:
    """Whether an answer carries anything of tenant B's: its id as a tenant_id, or a name."""
    if isinstance(data, dict):
        if data.get("tenant_id") == o.tenant_id or (
            data.get("id") == o.tenant_id and "time_zone" in data
        ):
            return True
        return any(mentions_other(v, o) for v in data.values())
    if isinstance(data, list):
        return any(mentions_other(v, o) for v in data)
    return isinstance(data, str) and MARK in data


async def snapshot(stack: Stack, o: Other) -> dict[str, Any]:
    """What a call could have changed: every row of both tenants' in each table with a
    tenant_id (or a subscriber_id: theirs), the row count of every other table, the
    Redis keys of this test with their sizes, and the simulated router's entries. When a
    token was last used is left out: using one is not changing anything."""
    db = stack.db
    tenants = [stack.tenant_id, o.tenant_id]
    subs = [
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM subscribers WHERE tenant_id = ANY($1::bigint[])", tenants
        )
    ]
    columns: dict[str, set[str]] = {}
    for r in await db.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public'"
    ):
        columns.setdefault(r["table_name"], set()).add(r["column_name"])
    out: dict[str, Any] = {}
    for table, cols in sorted(columns.items()):
        # Table and column names come from the catalogue, not from a request.
        if "tenant_id" in cols:
            query, args = f"SELECT * FROM {table} WHERE tenant_id = ANY($1::bigint[])", tenants
        elif "subscriber_id" in cols:
            query, args = f"SELECT * FROM {table} WHERE subscriber_id = ANY($1::bigint[])", subs
        elif table == "tenants":
            query, args = "SELECT * FROM tenants WHERE id = ANY($1::bigint[])", tenants
        else:
            out[table] = await db.fetchval(f"SELECT count(*) FROM {table}")
            continue
        rows = await db.fetch(query, args)
        out[table] = sorted(
            orjson.dumps(
                {k: v for k, v in dict(r).items() if k != "last_used_at"},
                default=str,
                option=orjson.OPT_SORT_KEYS,
            )
            for r in rows
        )
    redis = stack.deps.redis
    sizes: dict[str, Any] = {}
    for key in sorted(await redis.keys(f"{stack.prefix}:*")):
        kind = await redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        read = {
            "stream": redis.xlen,
            "list": redis.llen,
            "hash": redis.hgetall,
            "zset": redis.zcard,
            "string": redis.get,
            "set": redis.scard,
        }[kind]
        sizes[str(key)] = (kind, await read(key))
    out["redis"] = sizes
    out["router"] = [
        stack.sim.items(menu) for menu in ("/ppp/secret", "/ip/hotspot/user", "/ppp/profile")
    ]
    return out


async def test_every_api_route_keeps_a_tenant_token_out_of_another_tenant(
    client: Client, stack: Stack, other: Other
) -> None:
    """Walking the app's route table: every /api route declares its access, and tenant
    A's token, given tenant B's ids (in the path, the query and the body), gets 404 or
    403 on each — a list answers A's rows only — and nothing anywhere changed."""
    app = client.app
    assert app is not None
    before = await snapshot(stack, other)
    tried, undeclared, leaks = 0, [], []
    for op in iter_operations(app):
        if not op.path.startswith("/api/") or not op.auth:
            continue
        if declared(app, op.method, openapi_path(op.path)[0]) is None:
            undeclared.append(f"{op.method} {op.path}")
        path = fill(op.path, other)
        body = body_for(op.method, op.path, other) if op.body is not None else None
        has_id = "{" in op.path
        queries = [""]
        if op.method == "GET":
            queries.append(
                f"?tenant_id={other.tenant_id}&router_id={other.router_id}"
                f"&subscriber_id={other.subscriber_id}"
            )
        for query in queries:
            tried += 1
            resp = await client.request(op.method, path + query, json=body, headers=other.auth_a())
            text = await resp.text()
            where = f"{op.method} {path}{query} -> {resp.status} {text[:200]}"
            if resp.status in (403, 404):
                assert "error" in orjson.loads(text), where
                continue
            if op.method == "GET" and not has_id and not query and resp.status == 200:
                if mentions_other(orjson.loads(text), other):
                    leaks.append(where)
                continue
            leaks.append(where)
    assert leaks == [], "answers that reached tenant B:\n" + "\n".join(leaks)
    assert undeclared == [], f"routes that declare no access (imsys.http.access): {undeclared}"
    assert tried >= 45  # the walk saw the real table, not an empty one
    assert await snapshot(stack, other) == before


async def test_lists_show_only_the_tenants_own_rows(
    client: Client, stack: Stack, other: Other
) -> None:
    """With A's token the lists hold A's tenant, routers, packages, subscribers,
    notifications and batches only; the admin token still sees both tenants'."""
    mine = await stack.add_subscriber("mine")
    await stack.db.execute(
        "INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient, template, "
        "body, dedupe_key) VALUES ($1, $2, 'sms', '+15550101', 'invoice', 'hi', $3)",
        stack.tenant_id,
        mine,
        f"mine:{stack.prefix}",
    )
    a = other.auth_a()
    checks = {
        "/api/tenants": ("tenants", {stack.tenant_id}, {other.tenant_id}),
        "/api/routers": ("routers", set(stack.router_ids), {other.router_id}),
        "/api/packages": ("packages", {stack.basic, stack.premium}, {other.package_id}),
        "/api/subscribers": ("subscribers", {mine}, {other.subscriber_id}),
        "/api/notifications": ("notifications", None, {other.notification_id}),
    }
    for path, (key, expected, theirs) in checks.items():
        resp = await client.get(path, headers=a)
        assert resp.status == 200, await resp.text()
        ids = {row["id"] for row in (await resp.json())[key]}
        if expected is not None:
            assert ids == expected, path
        assert ids, path
        assert not ids & theirs, path
        # The admin token sees both tenants' rows (subscribers read by id: in the run's
        # shared database the first page of that list need not reach this test's rows).
        if path != "/api/subscribers":  # short lists: every row on one page
            listed = (await (await client.get(path, headers=ADMIN)).json())[key]
            assert theirs | ids <= {row["id"] for row in listed}, path
        else:
            for row_id in theirs | ids:
                seen = await client.get(f"{path}/{row_id}", headers=ADMIN)
                assert seen.status == 200, (path, row_id)
    subs = await (await client.get("/api/subscribers", headers=a)).json()
    assert subs["total"] == 1
    created = await client.post(
        "/api/bouncer/batches",
        json={"check_type": "deliverable", "emails": ["a@example.com"]},
        headers=a,
    )
    assert created.status == 201, await created.text()
    assert (await created.json())["tenant_id"] == stack.tenant_id
    batches = await (await client.get("/api/bouncer/batches", headers=a)).json()
    assert [b["tenant_id"] for b in batches["batches"]] == [stack.tenant_id]


async def test_a_tenant_token_changes_its_own_network(
    client: Client, stack: Stack, other: Other
) -> None:
    """A's token creates and changes A's subscribers and reads its routers; a body that
    names B's router or package on A's own subscriber is a 404 and changes nothing."""
    a = other.auth_a()
    body = {
        "tenant_id": stack.tenant_id,
        "router_id": stack.router_id,
        "package_id": stack.basic,
        "username": "own-1",
        "password": "pw-own-1",
        "service": "pppoe",
    }
    resp = await client.post("/api/subscribers", json=body, headers=a)
    assert resp.status == 201, await resp.text()
    sub = (await resp.json())["id"]
    resp = await client.patch(f"/api/subscribers/{sub}", json={"is_suspended": True}, headers=a)
    assert resp.status == 200, await resp.text()
    assert (await client.get(f"/api/routers/{stack.router_id}", headers=a)).status == 200
    for change in ({"router_id": other.router_id}, {"package_id": other.package_id}):
        resp = await client.patch(f"/api/subscribers/{sub}", json=change, headers=a)
        assert resp.status == 404, await resp.text()
    mixed = {**body, "username": "own-2", "package_id": other.package_id}
    resp = await client.post("/api/subscribers", json=mixed, headers=a)
    assert resp.status == 404, await resp.text()
    bulk = [
        {**body, "username": "own-3"},
        {**body, "username": "own-4", "tenant_id": str(other.tenant_id)},
    ]
    resp = await client.post("/api/subscribers/bulk", json=bulk, headers=a)
    assert resp.status == 404, await resp.text()
    row = await stack.subscriber(sub)
    assert (row["router_id"], row["package_id"]) == (stack.router_id, stack.basic)
    names = {r["username"] for r in await stack.db.fetch("SELECT username FROM subscribers")}
    assert not names & {"own-2", "own-3", "own-4"}


async def test_admin_wide_calls_are_refused_to_a_tenant_token(client: Client, other: Other) -> None:
    """Queues, dead letters, tokens, new tenants, the channels and the demo answer 403
    to a tenant's token; ``/api/me`` says whom each token speaks for."""
    a = other.auth_a()
    for method, path in (
        ("GET", "/api/queues"),
        ("GET", "/api/dead-letters"),
        ("GET", "/api/tokens"),
        ("GET", "/api/channels"),
        ("GET", "/api/demo"),
    ):
        resp = await client.request(method, path, headers=a)
        assert resp.status == 403, f"{path}: {await resp.text()}"
        assert "admin token" in (await resp.json())["error"]
    me = await (await client.get("/api/me", headers=a)).json()
    assert me["admin"] is False
    assert me["tenant_id"] != other.tenant_id
    assert (await (await client.get("/api/me", headers=ADMIN)).json())["admin"] is True


async def test_tokens_are_made_listed_and_revoked_by_the_admin_only(
    client: Client, stack: Stack, other: Other
) -> None:
    """POST /api/tokens answers the token once; only its SHA-256 is stored, the list
    holds no secret, the token works until DELETE, then it is a 401; nothing of it is
    logged."""
    with capture_logs() as logs:
        resp = await client.post(
            "/api/tokens", json={"tenant_id": stack.tenant_id, "name": "reseller"}, headers=ADMIN
        )
        assert resp.status == 201, await resp.text()
        made = await resp.json()
        token = made["token"]
        auth = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/api/subscribers", headers=auth)).status == 200
    assert token not in repr(logs)
    stored = await stack.db.fetchrow(
        "SELECT token_sha256 FROM api_tokens WHERE id = $1", made["id"]
    )
    assert stored is not None
    assert bytes(stored["token_sha256"]) == hashlib.sha256(token.encode()).digest()
    dumped = repr([dict(r) for r in await stack.db.fetch("SELECT * FROM api_tokens")])
    assert token not in dumped
    listed = await (await client.get("/api/tokens", headers=ADMIN)).text()
    assert token not in listed
    assert "sha256" not in listed
    assert made["id"] in [t["id"] for t in orjson.loads(listed)["tokens"]]
    refused = await client.post(
        "/api/tokens", json={"tenant_id": stack.tenant_id, "name": "x"}, headers=auth
    )
    assert refused.status == 403
    missing = await client.post(
        "/api/tokens", json={"tenant_id": 999_999_999, "name": "x"}, headers=ADMIN
    )
    assert missing.status == 404
    assert (await client.delete(f"/api/tokens/{made['id']}", headers=ADMIN)).status == 200
    assert (await client.get("/api/subscribers", headers=auth)).status == 401
    assert (await client.delete(f"/api/tokens/{made['id']}", headers=ADMIN)).status == 404
    wrong = {"Authorization": f"Bearer {token[:-2]}xx"}
    assert (await client.get("/api/subscribers", headers=wrong)).status == 401


async def test_an_idempotency_key_never_replays_another_callers_answer(
    client: Client, stack: Stack, other: Other
) -> None:
    """The same Idempotency-Key from tenant B's token and from A's is two requests:
    each gets its own answer, neither the other's."""
    key = {"Idempotency-Key": "same-key"}
    batch = {"check_type": "deliverable", "emails": ["k@example.com"]}
    b_auth = {"Authorization": f"Bearer {other.token_b}", **key}
    first = await client.post("/api/bouncer/batches", json=batch, headers=b_auth)
    assert first.status == 201, await first.text()
    second = await client.post(
        "/api/bouncer/batches", json=batch, headers={**other.auth_a(), **key}
    )
    assert second.status == 201, await second.text()
    assert "Idempotent-Replayed" not in second.headers
    assert (await second.json())["tenant_id"] == stack.tenant_id
    assert (await first.json())["tenant_id"] == other.tenant_id


def test_cli_creates_lists_and_deletes_tokens(settings: Settings, stack: Stack) -> None:
    """``python -m imsys tokens create|list|delete``: the token printed once, the list
    without it, and a deleted token gone; an unknown tenant exits 1."""
    from tests.test_cli import imsys

    made = imsys(settings, "tokens", "create", "--tenant-id", str(stack.tenant_id), "--name", "cli")
    assert made.returncode == 0, made.stderr
    created = orjson.loads(made.stdout)
    assert created["token"].startswith(tokens.PREFIX)
    listed = imsys(settings, "tokens", "list", "--tenant-id", str(stack.tenant_id))
    assert listed.returncode == 0, listed.stderr
    assert created["token"] not in listed.stdout
    assert [t["name"] for t in orjson.loads(listed.stdout)["tokens"]] == ["cli"]
    gone = imsys(settings, "tokens", "delete", str(created["id"]))
    assert gone.returncode == 0, gone.stderr
    listed = imsys(settings, "tokens", "list", "--tenant-id", str(stack.tenant_id))
    assert orjson.loads(listed.stdout)["tokens"] == []
    bad = imsys(settings, "tokens", "create", "--tenant-id", "999999999", "--name", "x")
    assert bad.returncode == 1
    assert "tenant 999999999 not found" in bad.stderr
