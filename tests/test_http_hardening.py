"""HTTP hardening of the admin server, for real on 127.0.0.1 against real Redis and
PostgreSQL: body limit, Idempotency-Key, token policy, security headers, literal and
indexed search, 503 while a backing service is down, /healthz degraded."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import asyncpg
import orjson
import pytest
import redis.exceptions
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr
from redis.asyncio import Redis
from structlog.testing import capture_logs

from imsys.errors import ConfigError
from imsys.http import api_billing, api_bouncer, api_network, api_sync, dashboard
from imsys.http.idempotency import IDEMPOTENCY, creating
from imsys.http.json import json_response
from imsys.http.server import build_app, check_listen_safety
from imsys.network import service
from imsys.settings import HttpSettings, Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Registry
from tests.sync_support import Stack

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024
Client = TestClient[web.Request, web.Application]
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def full_app(stack: Stack, **kw: Any) -> web.Application:
    """The admin app with every route, as `imsys.app.serve` builds it."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN, **kw)
    api_network.add_routes(app, stack.deps)
    api_sync.add_routes(app, stack.deps)
    api_bouncer.add_routes(app, stack.deps)
    api_billing.add_routes(app, stack.deps)
    dashboard.add_routes(app, None)
    return app


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The full admin app served for real; every call carries the token."""
    async with TestClient(TestServer(full_app(stack), host="127.0.0.1"), headers=AUTH) as c:
        yield c


@pytest.fixture
async def engine(redis: Redis, settings: Settings) -> Engine:
    eng = Engine(redis, settings, Registry(), consumer="test-hardening")
    await eng.prepare()
    return eng


@pytest.fixture
async def plain(engine: Engine, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[Client]:
    """The core admin app (health, metrics, queues, dead letters), no token by default."""
    async with TestClient(TestServer(build_app(engine, redis, db, TOKEN), host="127.0.0.1")) as c:
        yield c


async def serve_with(
    engine: Engine, redis: Redis, db: asyncpg.Pool, routes: dict[str, Route]
) -> TestClient[web.Request, web.Application]:
    """The core app plus test-only POST routes; the caller closes the client."""
    app = build_app(engine, redis, db, TOKEN)
    for path, route in routes.items():
        app.router.add_post(path, route)
    client: Client = TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH)
    await client.start_server()
    return client


async def error_of(resp: aiohttp.ClientResponse, status: int) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def raw_request(port: int, head: str, parts: list[bytes]) -> tuple[int, bytes]:
    """Send a request head and some body parts over a bare socket; the status and body
    of the answer (read with a guard, so a server waiting for more fails the test)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in parts:
            writer.write(part)
            await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        length = 0
        while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return int(status_line.split()[1]), body
    finally:
        writer.close()


# --- body limit ------------------------------------------------------------------------------


def test_default_body_limit_is_one_mib() -> None:
    """http.max_body_bytes defaults to 1 MiB."""
    assert HttpSettings().max_body_bytes == MIB


async def test_body_announced_past_the_limit_is_refused_before_it_is_read(api: Client) -> None:
    """A 30 MB Content-Length with the token gets 413 JSON naming the limit, though only
    1 KiB of it was ever sent: the server never waits for (nor buffers) the body."""
    head = (
        "POST /api/subscribers HTTP/1.1\nHost: 127.0.0.1\n"
        f"Authorization: Bearer {TOKEN}\nContent-Type: application/json\n"
        f"Content-Length: {30 * 1000 * 1000}\n"
    )
    status, body = await raw_request(api.port, head, [b"[" + b"0," * 512])
    assert status == 413
    error = orjson.loads(body)["error"]
    assert str(MIB) in error
    assert "http.max_body_bytes" in error


async def test_chunked_body_stops_at_the_limit(api: Client, stack: Stack) -> None:
    """A chunked body gets 413 JSON once past the limit, before its end ever arrives."""
    head = (
        "POST /api/subscribers HTTP/1.1\nHost: 127.0.0.1\n"
        f"Authorization: Bearer {TOKEN}\nContent-Type: application/json\n"
        "Transfer-Encoding: chunked\n"
    )
    chunk = b" " * 65536
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 20  # 1.25 MiB, never terminated
    # The database is shared with the run's other tests: count before and after.
    before = await stack.db.fetchval("SELECT count(*) FROM subscribers")
    status, body = await raw_request(api.port, head, parts)
    assert status == 413
    assert str(MIB) in orjson.loads(body)["error"]
    assert await stack.db.fetchval("SELECT count(*) FROM subscribers") == before


async def test_body_limit_follows_the_setting(stack: Stack) -> None:
    """With max_body_bytes 2048, 2049 bytes are refused (413) and a small body passes."""
    app = full_app(stack, max_body_bytes=2048)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as c:
        body = orjson.dumps(subscriber_body(stack, "small"))
        big = body[:-1] + b" " * (2049 - len(body)) + b"}"
        assert len(big) == 2049
        resp = await c.post("/api/subscribers", data=big)
        assert "2048" in await error_of(resp, 413)
        resp = await c.post("/api/subscribers", data=body)
        assert resp.status == 201, await resp.text()


# --- Idempotency-Key -------------------------------------------------------------------------


async def test_retried_post_gets_the_first_answer(api: Client, stack: Stack) -> None:
    """The same key and body again returns the first 201 and body, marked replayed,
    and creates nothing more (the dropped-connection retry of POST /api/subscribers)."""
    key = {"Idempotency-Key": "create-alice-1"}
    first = await api.post("/api/subscribers", json=subscriber_body(stack, "alice"), headers=key)
    assert first.status == 201, await first.text()
    assert "Idempotent-Replayed" not in first.headers
    again = await api.post("/api/subscribers", json=subscriber_body(stack, "alice"), headers=key)
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == await first.json()
    count = await stack.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE username = 'alice' AND tenant_id = $1",
        stack.tenant_id,
    )
    assert count == 1
    # Without the key, the same retry is the conflict the client could not act on.
    await error_of(await api.post("/api/subscribers", json=subscriber_body(stack, "alice")), 409)


async def test_same_key_with_another_body_is_422(api: Client, stack: Stack) -> None:
    """A key reused with a different body is a 422 JSON error and creates nothing."""
    key = {"Idempotency-Key": "k-422"}
    resp = await api.post("/api/subscribers", json=subscriber_body(stack, "bob"), headers=key)
    assert resp.status == 201
    resp = await api.post("/api/subscribers", json=subscriber_body(stack, "carol"), headers=key)
    assert "different request body" in await error_of(resp, 422)
    assert not await stack.db.fetchval(
        "SELECT 1 FROM subscribers WHERE username = 'carol' AND tenant_id = $1", stack.tenant_id
    )


async def test_key_still_in_progress_is_409(engine: Engine, redis: Redis, db: asyncpg.Pool) -> None:
    """A second request with a key whose first request still runs gets 409, then the
    first answer once it is done."""
    entered, release = asyncio.Event(), asyncio.Event()

    @creating
    async def slow(_request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return json_response({"made": 1}, status=201)

    client = await serve_with(engine, redis, db, {"/api/test/slow": slow})
    try:
        key = {"Idempotency-Key": "slow-409"}
        first = asyncio.create_task(client.post("/api/test/slow", json={}, headers=key))
        await entered.wait()
        resp = await client.post("/api/test/slow", json={}, headers=key)
        assert "in progress" in await error_of(resp, 409)
        release.set()
        assert (await first).status == 201
        resp = await client.post("/api/test/slow", json={}, headers=key)
        assert resp.status == 201
        assert resp.headers["Idempotent-Replayed"] == "true"
    finally:
        await client.close()


async def test_5xx_answer_is_not_kept(engine: Engine, redis: Redis, db: asyncpg.Pool) -> None:
    """A request that failed with a 5xx runs again on retry with the same key; its
    success is then the answer kept."""
    calls: list[int] = []

    @creating
    async def flaky(_request: web.Request) -> web.Response:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return json_response({"call": len(calls)}, status=201)

    client = await serve_with(engine, redis, db, {"/api/test/flaky": flaky})
    try:
        key = {"Idempotency-Key": "flaky-1"}
        await error_of(await client.post("/api/test/flaky", json={}, headers=key), 500)
        resp = await client.post("/api/test/flaky", json={}, headers=key)
        assert resp.status == 201
        assert await resp.json() == {"call": 2}
        resp = await client.post("/api/test/flaky", json={}, headers=key)
        assert await resp.json() == {"call": 2}
        assert resp.headers["Idempotent-Replayed"] == "true"
        assert len(calls) == 2
    finally:
        await client.close()


CREATING = {
    "/api/tenants",
    "/api/routers",
    "/api/packages",
    "/api/subscribers",
    "/api/payments",
    "/api/bouncer/batches",
}


async def test_every_creating_post_honours_the_key(api: Client) -> None:
    """Each creating POST replays its first answer (here a 400) for the same key and
    body; action POSTs (a forced sync) run every time."""
    for path in sorted(CREATING):
        key = {"Idempotency-Key": f"every-{path}"}
        first = await api.post(path, json={}, headers=key)
        await error_of(first, 400)
        again = await api.post(path, json={}, headers=key)
        assert again.headers.get("Idempotent-Replayed") == "true", path
        assert await again.json() == await first.json()
    key = {"Idempotency-Key": "action"}
    for _ in range(2):
        resp = await api.post("/api/subscribers/999999/sync", headers=key)
        await error_of(resp, 404)
        assert "Idempotent-Replayed" not in resp.headers


async def test_key_is_scoped_by_path(api: Client, stack: Stack) -> None:
    """The same key on two paths is two requests, not a 422."""
    key = {"Idempotency-Key": "shared-key"}
    resp = await api.post("/api/tenants", json={"name": "scoped"}, headers=key)
    assert resp.status == 201
    package = {
        "tenant_id": stack.tenant_id,
        "name": "p",
        "profile": "basic",
        "price": 1,
        "period_days": 30,
    }
    resp = await api.post("/api/packages", json=package, headers=key)
    assert resp.status == 201, await resp.text()
    assert "Idempotent-Replayed" not in resp.headers


async def test_expired_key_is_ignored_and_purged(api: Client, stack: Stack) -> None:
    """Past 24 h a key is free again (no replay, no 422), and expired rows are purged."""
    key = {"Idempotency-Key": "old-key"}
    resp = await api.post("/api/tenants", json={"name": "then"}, headers=key)
    assert resp.status == 201
    await stack.db.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = $1",
        "old-key",
    )
    resp = await api.post("/api/tenants", json={"name": "now"}, headers=key)
    assert resp.status == 201
    assert "Idempotent-Replayed" not in resp.headers
    assert (await resp.json())["name"] == "now"
    await stack.db.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = $1",
        "old-key",
    )
    assert await api.app[IDEMPOTENCY].purge() >= 1
    assert not await stack.db.fetchval("SELECT 1 FROM idempotency_keys WHERE key = 'old-key'")


async def test_replay_needs_the_token(api: Client, stack: Stack) -> None:
    """A stored answer is never replayed to a caller without the token."""
    key = {"Idempotency-Key": "private"}
    resp = await api.post("/api/subscribers", json=subscriber_body(stack, "dave"), headers=key)
    assert resp.status == 201
    resp = await api.post(
        "/api/subscribers",
        json=subscriber_body(stack, "dave"),
        headers={**key, "Authorization": "Bearer wrong"},
    )
    await error_of(resp, 401)
    assert "dave" not in await resp.text()


async def test_malformed_key_is_400(api: Client, stack: Stack) -> None:
    """A key past 255 characters is a 400 and nothing is created."""
    resp = await api.post(
        "/api/subscribers",
        json=subscriber_body(stack, "erin"),
        headers={"Idempotency-Key": "k" * 256},
    )
    assert "Idempotency-Key" in await error_of(resp, 400)
    assert not await stack.db.fetchval(
        "SELECT 1 FROM subscribers WHERE username = 'erin' AND tenant_id = $1", stack.tenant_id
    )


# --- token policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "admin.example.net"])
@pytest.mark.parametrize(
    "token", ["", "x", " change-me", "Change-Me", "CHANGE-ME\t", "a" * 31, " " * 40]
)
def test_weak_token_beyond_loopback_is_refused(host: str, token: str) -> None:
    """Beyond loopback, a token under 32 characters or any spelling of the example's
    is a ConfigError naming the fix."""
    with pytest.raises(ConfigError, match="IMSYS_HTTP__TOKEN"):
        check_listen_safety(HttpSettings(host=host, token=SecretStr(token)))


def test_refusal_never_shows_the_token() -> None:
    """The error about a weak token does not contain the token."""
    with pytest.raises(ConfigError, match="shorter than 32") as caught:
        check_listen_safety(HttpSettings(host="0.0.0.0", token=SecretStr("Sh0rt-S3cret")))
    assert "Sh0rt-S3cret" not in str(caught.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "localhost", "LocalHost"])
def test_loopback_keeps_short_tokens(host: str) -> None:
    """On loopback a short token (the tests' own) is accepted."""
    check_listen_safety(HttpSettings(host=host, token=SecretStr(TOKEN)))


def test_long_random_token_may_listen_beyond_loopback() -> None:
    """A 48-character random token is accepted on 0.0.0.0."""
    check_listen_safety(HttpSettings(host="0.0.0.0", token=SecretStr("9f" * 24)))


# --- security headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "auth", "status"),
    [
        ("GET", "/", False, 200),
        ("GET", "/static/app.js", False, 200),
        ("GET", "/healthz", False, 200),
        ("GET", "/metrics", False, 200),
        ("GET", "/api/queues", True, 200),
        ("GET", "/api/queues", False, 401),
        ("GET", "/api/no-such-thing", True, 404),
        ("GET", "/no-such-page", False, 404),
        ("POST", "/api/subscribers", True, 413),
    ],
)
async def test_security_headers_on_every_answer(
    stack: Stack, method: str, path: str, auth: bool, status: int
) -> None:
    """nosniff and no-referrer on every answer, errors and the dashboard included;
    no-store on every /api answer."""
    app = full_app(stack, max_body_bytes=1024)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        resp = await c.request(
            method, path, headers=AUTH if auth else {}, data=b"x" * 2000 if status == 413 else None
        )
        assert resp.status == status
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        if path.startswith("/api/"):
            assert resp.headers["Cache-Control"] == "no-store"
        else:
            assert resp.headers.get("Cache-Control") != "no-store"


# --- search ----------------------------------------------------------------------------------


async def test_search_wildcards_match_literally(api: Client, stack: Stack) -> None:
    """%, _ and a backslash in the search term match themselves, not any text."""
    for name in ("a%b", "axb", "c_d", "cxd", "e\\f", "eef"):
        await stack.add_subscriber(name)

    async def found(term: str) -> set[str]:
        # This stack's router only: the run's other tests share the database.
        params = {"q": term, "router_id": str(stack.router_id)}
        resp = await api.get("/api/subscribers", params=params)
        assert resp.status == 200
        return {s["username"] for s in (await resp.json())["subscribers"]}

    assert await found("%") == {"a%b"}
    assert await found("a%b") == {"a%b"}
    assert await found("c_d") == {"c_d"}
    assert await found("\\") == {"e\\f"}
    assert await found("x") == {"axb", "cxd"}


class Explaining:
    """Stands in for the pool: runs each query search_subscribers sends under EXPLAIN on
    one connection, and keeps the plans."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def _explain(self, sql: str, *args: Any) -> None:
        rows = await self.conn.fetch(f"EXPLAIN {sql}", *args)
        self.plans.append("\n".join(r[0] for r in rows))

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        await self._explain(sql, *args)
        return []

    async def fetchval(self, sql: str, *args: Any) -> int:
        await self._explain(sql, *args)
        return 0


@pytest.mark.parametrize("term", ["alice", "5550100", "example.net"])
async def test_search_is_served_by_trigram_indexes(stack: Stack, term: str) -> None:
    """Both queries of a search (page and total) read the trigram indexes with a Bitmap
    Index Scan, not a Seq Scan, on a table of 20,000 subscribers.

    Enough rows rather than ``enable_seqscan = off``: on a handful of rows the planner
    rightly prefers a Seq Scan, and with seq scans off it walks the primary key in
    ``ORDER BY id`` order instead, which proves nothing; with real numbers it picks the
    trigram indexes on its own, as production does. The rows live in a transaction
    rolled back at the end, so no other test sees them.
    """
    await stack.add_subscriber("alice", phone="+15550100", email="alice@example.net")
    async with stack.db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                """
                INSERT INTO subscribers (tenant_id, router_id, package_id, username,
                                         password, service, phone, email)
                SELECT $1, $2, $3, md5(n::text), 'pw', 'pppoe',
                       '+' || (100000000 + n * 7919 % 899999999)::text,
                       md5(n::text) || '@mail' || (n % 97)::text || '.test'
                FROM generate_series(1, 20000) AS n
                """,
                stack.tenant_id,
                stack.router_id,
                stack.basic,
            )
            # What autovacuum does to a table that grew: merge GIN's pending list (the
            # planner prices a long one as a scan) and gather statistics.
            await conn.execute(
                "SELECT gin_clean_pending_list(i::regclass) FROM unnest($1::text[]) AS i",
                [f"subscribers_{c}_trgm" for c in ("username", "phone", "email")],
            )
            await conn.execute("ANALYZE subscribers")
            spy = Explaining(cast(asyncpg.Connection, conn))
            await service.search_subscribers(
                cast(asyncpg.Pool, spy),
                search=term,
                sync_status=None,
                router_id=None,
                limit=50,
                offset=0,
            )
        finally:
            await tx.rollback()
    assert len(spy.plans) == 2
    for plan in spy.plans:
        assert "Seq Scan" not in plan, plan
        for index in ("username", "phone", "email"):
            assert f"Bitmap Index Scan on subscribers_{index}_trgm" in plan, plan


# --- 503 while a backing service is down -----------------------------------------------------


async def test_api_is_503_while_postgresql_is_down(stack: Stack) -> None:
    """With PostgreSQL refusing connections, reads and creating POSTs answer 503 JSON
    "PostgreSQL unavailable" with Retry-After, and neither answer nor log shows the
    URL or its password."""
    port = free_port()
    dead = await asyncpg.create_pool(
        f"postgresql://imsys:pg-s3cret-pw@127.0.0.1:{port}/imsys", min_size=0, max_size=1
    )
    deps = dataclasses.replace(stack.deps, db=dead)
    app = build_app(stack.engine, stack.deps.redis, dead, TOKEN)
    api_network.add_routes(app, deps)
    api_sync.add_routes(app, deps)
    try:
        async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as c:
            with capture_logs() as logs:
                for resp in (
                    await c.get("/api/subscribers"),
                    await c.post("/api/tenants", json={"name": "t"}),
                    await c.post(
                        "/api/tenants", json={"name": "t"}, headers={"Idempotency-Key": "k"}
                    ),
                ):
                    assert await error_of(resp, 503) == "PostgreSQL unavailable"
                    assert resp.headers["Retry-After"].isdigit()
                    text = await resp.text()
                    assert "pg-s3cret-pw" not in text
                    assert str(port) not in text
            assert logs, "the outage is logged"
            assert "pg-s3cret-pw" not in repr(logs)
            assert str(port) not in repr(logs)
    finally:
        await dead.close()


async def test_api_is_503_while_redis_is_down(settings: Settings, db: asyncpg.Pool) -> None:
    """With Redis refusing connections, /api/queues answers 503 JSON "Redis unavailable"
    with Retry-After."""
    port = free_port()
    dead = Redis.from_url(f"redis://:rd-s3cret@127.0.0.1:{port}/0", socket_connect_timeout=1)
    engine = Engine(dead, settings, Registry(), consumer="test-dead-redis")
    try:
        async with TestClient(
            TestServer(build_app(engine, dead, db, TOKEN), host="127.0.0.1"), headers=AUTH
        ) as c:
            resp = await c.get("/api/queues")
            assert await error_of(resp, 503) == "Redis unavailable"
            assert resp.headers["Retry-After"].isdigit()
            assert "rd-s3cret" not in await resp.text()
    finally:
        await dead.aclose()


@pytest.mark.parametrize(
    ("exc", "status", "error"),
    [
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), 503, "PostgreSQL"),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), 503, "PostgreSQL"),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), 503, "PostgreSQL"),
        (asyncpg.InterfaceError("pool is closed"), 503, "PostgreSQL"),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), 503, "Redis"),
        (redis.exceptions.ConnectionError("Connection closed by server."), 503, "Redis"),
        (asyncpg.InterfaceError("another operation is in progress"), 500, "internal error"),
        (RuntimeError("a bug"), 500, "internal error"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
async def test_backing_service_errors_are_503_and_bugs_500(
    engine: Engine, redis: Redis, db: asyncpg.Pool, exc: Exception, status: int, error: str
) -> None:
    """One middleware maps PostgreSQL's and Redis's "not answering" errors to 503 (with
    Retry-After) and leaves every other error a 500."""

    async def failing(_request: web.Request) -> web.Response:
        raise exc

    client = await serve_with(engine, redis, db, {"/api/test/fail": failing})
    try:
        resp = await client.post("/api/test/fail")
        assert (await error_of(resp, status)).startswith(error)
        assert ("Retry-After" in resp.headers) == (status == 503)
    finally:
        await client.close()


# --- /healthz degraded -----------------------------------------------------------------------


async def test_healthz_is_degraded_while_a_loop_keeps_failing(
    plain: Client, engine: Engine
) -> None:
    """A loop that failed three times in a row makes /healthz 503 "degraded" with the
    reason, although Redis and PostgreSQL answer; it is ok again once the loop is."""
    resp = await plain.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["problems"] == []
    for _ in range(3):
        engine._loop_failed("read:sync", RuntimeError("x"))
    resp = await plain.get("/healthz")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "degraded"
    assert body["ok"] is False
    assert body["redis"] == "ok"
    assert body["postgres"] == "ok"
    assert any("read:sync" in p and "RuntimeError" in p for p in body["problems"])
    engine._loop_ok("read:sync")
    assert (await plain.get("/healthz")).status == 200
