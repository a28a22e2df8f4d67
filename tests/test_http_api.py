"""The admin HTTP server, for real on 127.0.0.1, against real Redis and PostgreSQL."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

from imsys.errors import ConfigError
from imsys.http.idempotency import creating
from imsys.http.server import build_app, check_listen_safety
from imsys.network.errors import Conflict, Invalid, NotFound
from imsys.settings import STREAMS, HttpSettings, Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Registry
from imsys.streams.metrics import EngineMetrics

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def engine(redis: Redis, settings: Settings) -> Engine:
    """An engine with no handlers: every job it processes is of an unknown type."""
    eng = Engine(redis, settings, Registry(), consumer="test-http")
    await eng.prepare()
    return eng


@pytest.fixture
async def client(engine: Engine, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[Client]:
    app = build_app(engine, redis, db, TOKEN)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def make_dead_letter(engine: Engine, stream: str = "billing") -> dict[str, str]:
    """Enqueue a job nobody handles and process it: it is dead-lettered at once."""
    await engine.producer.enqueue(stream, "no_such_type", {"invoice_id": 42})
    assert await engine.consumers[stream].process_once(block_ms=10) == 1
    [newest] = await engine.dead_letters.list(stream=stream, limit=1)
    return newest.as_dict()


async def expect_error(resp: Any, status: int) -> str:
    """The response has ``status`` and the JSON error shape; returns the message."""
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) >= {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- health and metrics --------------------------------------------------------------------


async def test_healthz_reports_redis_and_postgres(client: Client) -> None:
    """/healthz answers 200 without a token, with the state of Redis, PostgreSQL and engine."""
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["ok"] is True
    assert body["redis"] == "ok"
    assert body["postgres"] == "ok"
    assert body["engine"] in ("running", "starting")


async def test_healthz_is_503_when_redis_does_not_answer(engine: Engine, db: asyncpg.Pool) -> None:
    """/healthz answers 503 and says which dependency is down."""
    dead_redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    app = build_app(engine, dead_redis, db, TOKEN)
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            resp = await c.get("/healthz")
            assert resp.status == 503
            body = await resp.json()
            assert body["ok"] is False
            assert body["redis"].startswith("unavailable")
            assert body["postgres"] == "ok"
    finally:
        await dead_redis.aclose()


async def test_metrics_is_prometheus_text(client: Client, engine: Engine) -> None:
    """/metrics is Prometheus text with per-stream figures that follow the streams."""
    for n in range(2):
        await engine.producer.enqueue("sync", "sync_subscriber", {"subscriber_id": n})
    await make_dead_letter(engine)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    for name in (
        "imsys_stream_length",
        "imsys_stream_pending",
        "imsys_stream_lag",
        "imsys_stream_delayed",
        "imsys_stream_oldest_pending_age_seconds",
        "imsys_stream_processed_all_processes",
        "imsys_stream_retried_all_processes",
        "imsys_stream_dead_all_processes",
        "imsys_handler_seconds",
        "imsys_dead_letters",
    ):
        assert f"# TYPE {name} " in text, name
    for stream in STREAMS:
        assert f'imsys_stream_length{{stream="{stream}"}}' in text
    assert 'imsys_stream_length{stream="sync"} 2.0' in text
    assert 'imsys_stream_dead_all_processes{stream="billing"} 1.0' in text
    assert "imsys_dead_letters 1.0" in text


def test_handler_latency_is_a_cumulative_histogram() -> None:
    """Each run time counts in its own bucket and every bucket above it, per stream and type."""
    metrics = EngineMetrics()
    for seconds in (0.0005, 0.002, 0.0025, 0.02, 100.0):
        metrics.observe("sync", "sync_subscriber", seconds)
    metrics.observe("billing", "generate_bills", 0.3)
    [family] = [
        f
        for f in text_string_to_metric_families(metrics.render([], 0).decode())
        if f.name == "imsys_handler_seconds"
    ]
    assert family.type == "histogram"
    samples = {
        (s.name, s.labels["stream"], s.labels.get("le")): s.value for s in family.samples
    }
    bucket = "imsys_handler_seconds_bucket"
    for le, count in (("0.001", 1), ("0.0025", 3), ("0.01", 3), ("0.025", 4), ("60.0", 4)):
        assert samples[(bucket, "sync", le)] == count, le
    assert samples[(bucket, "sync", "+Inf")] == 5
    assert samples[("imsys_handler_seconds_count", "sync", None)] == 5
    assert samples[("imsys_handler_seconds_sum", "sync", None)] == pytest.approx(100.025)
    assert samples[(bucket, "billing", "0.25")] == 0
    assert samples[(bucket, "billing", "0.5")] == 1


# --- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "not-bearer", "longer", "empty"],
)
@pytest.mark.parametrize("path", ["/api/queues", "/api/dead-letters"])
async def test_api_needs_the_bearer_token(
    client: Client, headers: dict[str, str], path: str
) -> None:
    """/api/* without the right bearer token is a 401 JSON error."""
    resp = await client.get(path, headers=headers)
    assert "token" in await expect_error(resp, 401)


async def test_api_write_needs_the_bearer_token(client: Client, engine: Engine) -> None:
    """A replay or delete without the token is refused and changes nothing."""
    letter = await make_dead_letter(engine)
    resp = await client.post(f"/api/dead-letters/{letter['id']}/replay")
    await expect_error(resp, 401)
    resp = await client.delete(f"/api/dead-letters/{letter['id']}")
    await expect_error(resp, 401)
    assert await engine.dead_letters.count() == 1


async def test_empty_configured_token_refuses_every_call(
    engine: Engine, redis: Redis, db: asyncpg.Pool
) -> None:
    """With an empty configured token no bearer value is accepted, not even an empty one."""
    app = build_app(engine, redis, db, "")
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        for value in ("Bearer ", "Bearer", ""):
            resp = await c.get("/api/queues", headers={"Authorization": value})
            await expect_error(resp, 401)


async def test_unknown_api_path_is_a_json_404(client: Client) -> None:
    """An /api path that does not exist answers a JSON 404, not an HTML page."""
    resp = await client.get("/api/no-such-thing", headers=AUTH)
    await expect_error(resp, 404)


# --- queues ----------------------------------------------------------------------------------


async def test_queues_shape_and_figures(client: Client, engine: Engine) -> None:
    """/api/queues lists every stream with its figures, which follow reads and dead letters."""
    for n in range(3):
        await engine.producer.enqueue("sync", "sync_subscriber", {"subscriber_id": n})
    # Deliver one entry without finishing it: it is pending.
    assert len(await engine.consumers["sync"].read(1, None)) == 1
    await make_dead_letter(engine)

    resp = await client.get("/api/queues", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert set(body) >= {"streams", "dead_letters", "progress", "processes"}
    assert [s["stream"] for s in body["streams"]] == list(STREAMS)
    for s in body["streams"]:
        assert set(s) >= {
            "stream",
            "length",
            "pending",
            "lag",
            "delayed",
            "oldest_pending_age_s",
            "processed",
            "retried",
            "dead",
        }
    by_name = {s["stream"]: s for s in body["streams"]}
    sync = by_name["sync"]
    assert sync["length"] == 3
    assert sync["pending"] == 1
    assert sync["lag"] == 2
    assert isinstance(sync["oldest_pending_age_s"], float)
    assert 0 <= sync["oldest_pending_age_s"] < 60
    assert by_name["events"]["pending"] == 0
    assert by_name["events"]["oldest_pending_age_s"] is None
    assert by_name["billing"]["dead"] == 1
    assert by_name["billing"]["length"] == 0
    assert body["dead_letters"] == 1


# --- dead letters ----------------------------------------------------------------------------


async def test_dead_letters_are_listed_with_their_reason(client: Client, engine: Engine) -> None:
    """A dead letter shows its stream, original id, error, time, type and payload."""
    await make_dead_letter(engine)
    resp = await client.get("/api/dead-letters", headers=AUTH)
    assert resp.status == 200
    [letter] = (await resp.json())["dead_letters"]
    assert letter["stream"] == "billing"
    assert letter["type"] == "no_such_type"
    assert letter["payload"] == '{"invoice_id":42}'
    assert letter["original_id"].count("-") == 1
    assert letter["error"].startswith("UnknownJobType")
    assert "no_such_type" in letter["error"]
    assert int(letter["failed_at"]) > 0
    assert letter["id"]


async def test_dead_letters_filter_and_limit(client: Client, engine: Engine) -> None:
    """?stream filters, ?limit caps, and a bad limit or before is a 400 JSON error."""
    await make_dead_letter(engine, "billing")
    await make_dead_letter(engine, "events")
    await make_dead_letter(engine, "events")

    async def listed(query: str) -> list[dict[str, str]]:
        resp = await client.get(f"/api/dead-letters{query}", headers=AUTH)
        assert resp.status == 200
        return list((await resp.json())["dead_letters"])

    assert len(await listed("")) == 3
    assert {d["stream"] for d in await listed("?stream=events")} == {"events"}
    assert len(await listed("?stream=events")) == 2
    assert await listed("?stream=sync") == []
    newest = await listed("?limit=1")
    assert len(newest) == 1
    older = await listed(f"?before={newest[0]['id']}")
    assert len(older) == 2
    assert newest[0]["id"] not in {d["id"] for d in older}
    for query in ("?limit=0", "?limit=abc", "?before=garbage", "?before=0-0"):
        resp = await client.get(f"/api/dead-letters{query}", headers=AUTH)
        await expect_error(resp, 400)


async def test_replay_puts_the_job_back(client: Client, engine: Engine, redis: Redis) -> None:
    """Replay moves the dead letter back onto its stream as attempt 1 and removes it."""
    letter = await make_dead_letter(engine)
    stream_key = engine.keys.stream("billing")
    assert await redis.xlen(stream_key) == 0

    resp = await client.post(f"/api/dead-letters/{letter['id']}/replay", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert body["replayed"] == letter["id"]

    assert await redis.xlen(stream_key) == 1
    [(entry_id, fields)] = await redis.xrange(stream_key)
    assert entry_id == body["entry_id"]
    assert fields["type"] == "no_such_type"
    assert fields["payload"] == letter["payload"]
    assert fields["attempt"] == "1"
    assert await engine.dead_letters.count() == 0

    resp = await client.post(f"/api/dead-letters/{letter['id']}/replay", headers=AUTH)
    await expect_error(resp, 404)
    assert await redis.xlen(stream_key) == 1


async def test_delete_drops_a_dead_letter_once(client: Client, engine: Engine) -> None:
    """DELETE removes the dead letter (200); a second DELETE is a JSON 404."""
    letter = await make_dead_letter(engine)
    resp = await client.delete(f"/api/dead-letters/{letter['id']}", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["dropped"] == letter["id"]
    assert await engine.dead_letters.count() == 0

    resp = await client.delete(f"/api/dead-letters/{letter['id']}", headers=AUTH)
    assert "not found" in await expect_error(resp, 404)


@pytest.mark.parametrize(
    "dead_id",
    ["not-an-id", "12", "1-2-3", "abc-1", "99999999999999999999-0", "1-99999999999999999999"],
)
async def test_malformed_dead_letter_id_is_a_json_404(
    client: Client, engine: Engine, dead_id: str
) -> None:
    """An id that is not a stream entry id (or overflows one) is a JSON 404 and harms nothing."""
    await make_dead_letter(engine)
    resp = await client.delete(f"/api/dead-letters/{dead_id}", headers=AUTH)
    await expect_error(resp, 404)
    resp = await client.post(f"/api/dead-letters/{dead_id}/replay", headers=AUTH)
    await expect_error(resp, 404)
    assert await engine.dead_letters.count() == 1


# --- listening safety ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "admin.example.net"])
@pytest.mark.parametrize("token", ["change-me", ""])
def test_refuses_to_listen_beyond_loopback_with_a_weak_token(host: str, token: str) -> None:
    """A non-loopback host with an empty or example token is a ConfigError naming the fix."""
    with pytest.raises(ConfigError, match="IMSYS_HTTP__TOKEN"):
        check_listen_safety(HttpSettings(host=host, token=SecretStr(token)))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
@pytest.mark.parametrize("token", ["change-me", ""])
def test_loopback_is_allowed_with_any_token(host: str, token: str) -> None:
    """On loopback the example token is allowed (only local users can reach it)."""
    check_listen_safety(HttpSettings(host=host, token=SecretStr(token)))


def test_beyond_loopback_is_allowed_with_a_real_token() -> None:
    """0.0.0.0 with a real token is allowed."""
    check_listen_safety(HttpSettings(host="0.0.0.0", token=SecretStr("s3cure-and-long-token-" * 2)))


async def test_domain_errors_become_their_status_in_one_middleware(
    engine: Engine, redis: Redis, db: asyncpg.Pool
) -> None:
    """NotFound → 404 "… not found", Conflict → 409, Invalid → 400, a value PostgreSQL cannot
    hold → 400, from any handler; a creating POST's 409 is kept for its Idempotency-Key."""
    runs: list[str] = []

    def raising(exc: Exception) -> Any:
        async def handler(request: web.Request) -> web.Response:
            runs.append(request.path)
            raise exc

        return handler

    app = build_app(engine, redis, db, TOKEN)
    app.router.add_get("/api/t/missing", raising(NotFound("thing 7")))
    app.router.add_post("/api/t/taken", creating(raising(Conflict("a thing named 'x' exists"))))
    app.router.add_get("/api/t/invalid", raising(Invalid("nothing to change")))
    app.router.add_get(
        "/api/t/data", raising(asyncpg.exceptions.NumericValueOutOfRangeError("out of range"))
    )
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as c:
        assert await expect_error(await c.get("/api/t/missing"), 404) == "thing 7 not found"
        assert await expect_error(await c.get("/api/t/invalid"), 400) == "nothing to change"
        stored = await expect_error(await c.get("/api/t/data"), 400)
        assert stored == "a value cannot be stored: out of range"
        key = {"Idempotency-Key": f"conflict-{uuid.uuid4()}"}
        first = await c.post("/api/t/taken", json={}, headers=key)
        assert await expect_error(first, 409) == "a thing named 'x' exists"
        again = await c.post("/api/t/taken", json={}, headers=key)
        assert await expect_error(again, 409) == "a thing named 'x' exists"
        assert again.headers.get("Idempotent-Replayed") == "true"
    assert runs.count("/api/t/taken") == 1
