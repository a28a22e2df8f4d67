"""/metrics as Prometheus reads it: every series from start-up, counters typed and named
as counters, the 0.0.4 content type, unknown values left out; real Redis and PostgreSQL,
and a real service process for the idle start-up."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from redis.asyncio import Redis

from imsys.contract import job_specs
from imsys.events.channels import CHANNELS, ChannelControl
from imsys.http.server import build_app
from imsys.network import models
from imsys.network import service as network
from imsys.settings import STREAMS, Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry
from tests.conftest import subprocess_env
from tests.test_sync_processes import Service

Client = TestClient[web.Request, web.Application]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COUNTERS = ("processed", "retried", "deferred", "dead", "recovered")
ALL_PROCESSES = ("processed", "retried", "deferred", "dead", "deduplicated")
STREAM_GAUGES = ("length", "pending", "lag", "delayed", "oldest_pending_age_seconds")


class Ping(BaseModel):
    n: int


async def ping(_job: Job[Ping]) -> None:
    """A handler that does nothing: the job only has to finish."""


@pytest.fixture
async def engine(redis: Redis, settings: Settings) -> Engine:
    """An engine with one job type registered (sync/ping), its groups created."""
    registry = Registry()
    registry.register("sync", "ping", Ping, ping)
    eng = Engine(redis, settings, registry, consumer="test-metrics")
    await eng.prepare()
    return eng


@pytest.fixture
async def client(engine: Engine, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app(engine, redis, db, "t"), host="127.0.0.1")) as c:
        yield c


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """(sample name and labels → value, family name → type) of a Prometheus text page."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


async def scrape(client: Client) -> tuple[Samples, dict[str, str]]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE
    return parse(await resp.text())


def stream_series(name: str, stream: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, (("stream", stream),))


def router_series(name: str, router_id: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, (("router_id", str(router_id)),))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fresh_service_scrape(settings: Settings, database_url: str) -> tuple[str, str]:
    """Start `python -m imsys run` on an empty database and its own Redis prefix, wait
    until /healthz answers 200, and return /metrics' content type and text at once."""
    port = free_port()
    env = subprocess_env(
        settings,
        IMSYS_DATABASE__URL=database_url,
        IMSYS_HTTP__PORT=str(port),
        IMSYS_RECOVERY__ENABLED="false",
    )
    service = Service(env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                assert service.proc.poll() is None, service.output()[-3000:]
                assert time.monotonic() < deadline, service.output()[-3000:]
                try:
                    async with http.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                return resp.headers["Content-Type"], await resp.text()
    finally:
        service.kill()


async def test_fresh_idle_service_shows_every_series_at_zero(
    settings: Settings, isolated_database: str
) -> None:
    """A service just started, with nothing to do, already exports every series: each
    stream's counters, all-process totals and gauges, a histogram per registered job type,
    the dead letters and each channel, all at 0, typed counter where named ``_total``."""
    content_type, text = await fresh_service_scrape(settings, isolated_database)
    assert content_type == CONTENT_TYPE
    samples, types = parse(text)
    assert samples
    assert {k: v for k, v in samples.items() if v != 0} == {}
    names = {name for name, _ in samples}
    for stream in STREAMS:
        for c in COUNTERS:
            assert stream_series(f"imsys_jobs_{c}_total", stream) in samples
        for t in ALL_PROCESSES:
            assert stream_series(f"imsys_stream_{t}_all_processes", stream) in samples
        for g in STREAM_GAUGES:
            assert stream_series(f"imsys_stream_{g}", stream) in samples
    for spec in job_specs():
        key = (("stream", spec.stream), ("type", spec.name))
        assert ("imsys_handler_seconds_count", key) in samples, spec.name
        assert ("imsys_handler_seconds_bucket", (("le", "+Inf"), *key)) in samples
    for channel in CHANNELS:
        assert ("imsys_channel_stopped", (("channel", channel),)) in samples
        assert ("imsys_channel_out_of_credit_tenants", (("channel", channel),)) in samples
    assert ("imsys_dead_letters", ()) in samples
    # Counters, and only counters, carry the _total suffix; no _created timestamps.
    for name in names:
        assert not name.endswith("_created"), name
        if name.endswith("_total"):
            assert types[name.removesuffix("_total")] == "counter", name
    for family, kind in types.items():
        assert kind != "counter" or f"{family}_total" in names, family


async def test_counters_and_all_process_totals_follow_a_job(client: Client, engine: Engine) -> None:
    """Before the first job, the registered type's histogram and each stream's counters
    are there at 0; after one job they count it, typed counter and histogram, while the
    all-process totals (same figure in every process) are gauges without ``_total``."""
    samples, types = await scrape(client)
    count = ("imsys_handler_seconds_count", (("stream", "sync"), ("type", "ping")))
    assert samples[count] == 0
    assert samples[stream_series("imsys_jobs_processed_total", "sync")] == 0
    assert samples[stream_series("imsys_jobs_processed_total", "billing")] == 0
    await engine.producer.enqueue("sync", "ping", {"n": 1})
    assert await engine.consumers["sync"].process_once(block_ms=10) == 1
    samples, types = await scrape(client)
    assert samples[count] == 1
    assert samples[stream_series("imsys_jobs_processed_total", "sync")] == 1
    assert samples[stream_series("imsys_stream_processed_all_processes", "sync")] == 1
    assert types["imsys_jobs_processed"] == "counter"
    assert types["imsys_handler_seconds"] == "histogram"
    assert types["imsys_stream_processed_all_processes"] == "gauge"
    assert not any(name.endswith("_total_all_processes") for name, _ in samples)


async def test_unknown_lag_is_left_out_not_zero(
    client: Client, engine: Engine, redis: Redis
) -> None:
    """When Redis cannot say a group's lag (an entry deleted inside the undelivered
    range), that stream's lag series is left out rather than shown as 0; the other
    streams keep theirs, and it is back once Redis knows it again."""
    ids = [(await engine.producer.enqueue("sync", "ping", {"n": n})).entry_id for n in range(3)]
    samples, _ = await scrape(client)
    assert samples[stream_series("imsys_stream_lag", "sync")] == 3
    await redis.xdel(engine.keys.stream("sync"), ids[1])
    [group] = await redis.xinfo_groups(engine.keys.stream("sync"))
    assert group["lag"] is None  # Redis itself does not know it
    samples, _ = await scrape(client)
    assert stream_series("imsys_stream_lag", "sync") not in samples
    assert samples[stream_series("imsys_stream_lag", "billing")] == 0
    assert samples[stream_series("imsys_stream_length", "sync")] == 2
    while await engine.consumers["sync"].process_once(block_ms=10):
        pass
    samples, _ = await scrape(client)
    assert samples[stream_series("imsys_stream_lag", "sync")] == 0


async def test_oldest_pending_age_is_zero_when_nothing_waits(
    client: Client, engine: Engine, redis: Redis
) -> None:
    """Nothing pending is a known 0, not a missing series; with an entry delivered and
    not acknowledged the series is still there (its age)."""
    samples, _ = await scrape(client)
    assert samples[stream_series("imsys_stream_oldest_pending_age_seconds", "sync")] == 0
    await engine.producer.enqueue("sync", "ping", {"n": 1})
    # Delivered to a consumer that never acknowledges: pending.
    await redis.xreadgroup("imsys", "elsewhere", {engine.keys.stream("sync"): ">"}, count=1)
    samples, _ = await scrape(client)
    assert samples[stream_series("imsys_stream_pending", "sync")] == 1
    assert stream_series("imsys_stream_oldest_pending_age_seconds", "sync") in samples


async def test_router_online_left_out_until_known(
    client: Client, db: asyncpg.Pool, prefix: str
) -> None:
    """A router never reached has no ``imsys_router_online`` series (unknown, not
    offline) but has its info and guard; offline shows 0, online 1, a tripped guard 1,
    and a removed router's series go with it."""
    tenant = await network.create_tenant(db, models.TenantIn(name=f"metrics-{prefix}"))
    router = await network.create_router(
        db,
        models.RouterIn(
            tenant_id=tenant["id"], name="r-metrics", host="127.0.0.1", username="admin"
        ),
    )
    rid = int(router["id"])
    samples, _ = await scrape(client)
    info = (
        "imsys_router_info",
        (("name", "r-metrics"), ("router_id", str(rid)), ("tenant_id", str(tenant["id"]))),
    )
    assert samples[info] == 1
    assert router_series("imsys_router_online", rid) not in samples
    assert samples[router_series("imsys_router_guard_tripped", rid)] == 0
    await db.execute("UPDATE routers SET online = false WHERE id = $1", rid)
    samples, _ = await scrape(client)
    assert samples[router_series("imsys_router_online", rid)] == 0
    await db.execute(
        "UPDATE routers SET online = true, guard_tripped_at = now() WHERE id = $1", rid
    )
    samples, _ = await scrape(client)
    assert samples[router_series("imsys_router_online", rid)] == 1
    assert samples[router_series("imsys_router_guard_tripped", rid)] == 1
    await db.execute("DELETE FROM tenants WHERE id = $1", tenant["id"])
    samples, _ = await scrape(client)
    assert router_series("imsys_router_online", rid) not in samples
    assert router_series("imsys_router_guard_tripped", rid) not in samples
    assert info not in samples


async def test_router_series_left_out_while_postgres_is_away(
    engine: Engine, redis: Redis, db: asyncpg.Pool, database_url: str, prefix: str
) -> None:
    """While PostgreSQL does not answer, /metrics still answers with the streams, and the
    routers' series are left out rather than kept from the last scrape that could read them."""
    tenant = await network.create_tenant(db, models.TenantIn(name=f"metrics-pg-{prefix}"))
    router = await network.create_router(
        db,
        models.RouterIn(tenant_id=tenant["id"], name="r-pg", host="127.0.0.1", username="a"),
    )
    rid = int(router["id"])
    await db.execute("UPDATE routers SET online = false WHERE id = $1", rid)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    app = build_app(engine, redis, pool, "t")
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        samples, _ = await scrape(c)
        assert samples[router_series("imsys_router_online", rid)] == 0
        await pool.close()  # PostgreSQL gone, as far as this app can tell
        samples, _ = await scrape(c)
    assert not any(name.startswith("imsys_router_") for name, _ in samples)
    assert samples[stream_series("imsys_stream_length", "sync")] == 0


async def test_channel_stopped_and_out_of_credit(
    client: Client, engine: Engine, redis: Redis
) -> None:
    """A channel an operator stopped shows 1 until started again; a tenant out of credit
    counts on that channel only."""
    control = ChannelControl(redis, engine.keys)
    await control.stop("sms", "test")
    await control.out_of_credit("whatsapp", 7, "no credit")
    samples, _ = await scrape(client)
    assert samples[("imsys_channel_stopped", (("channel", "sms"),))] == 1
    assert samples[("imsys_channel_stopped", (("channel", "whatsapp"),))] == 0
    assert samples[("imsys_channel_out_of_credit_tenants", (("channel", "whatsapp"),))] == 1
    assert samples[("imsys_channel_out_of_credit_tenants", (("channel", "sms"),))] == 0
    await control.start("sms", "test")
    await control.start("whatsapp", "test", 7)
    samples, _ = await scrape(client)
    assert samples[("imsys_channel_stopped", (("channel", "sms"),))] == 0
    assert samples[("imsys_channel_out_of_credit_tenants", (("channel", "whatsapp"),))] == 0
