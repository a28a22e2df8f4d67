"""A whole sync stack in the test's process: real Redis, PostgreSQL, engine, outbox relay,
RouterOS simulator and the real librouteros client. Stepped exactly, or run for real."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from imsys.app import build_deps
from imsys.deps import Deps
from imsys.network import models, service
from imsys.outbox import OutboxRelay
from imsys.settings import Settings
from imsys.sim.routeros import RouterOSSimulator
from imsys.sim.routeros_menus import DEFAULT_VERSION
from imsys.streams.engine import Engine
from imsys.sync.context import SyncContext
from imsys.sync.service import subscriber_changed

ROUTER_PASSWORD = "r0uter-pass"


@dataclass
class Stack:
    deps: Deps
    # Sync's context for calling its functions directly (a router pool of its own).
    sync: SyncContext
    sims: list[RouterOSSimulator]
    relay: OutboxRelay
    tenant_id: int
    router_ids: list[int]
    basic: int
    premium: int
    prefix: str

    @property
    def sim(self) -> RouterOSSimulator:
        return self.sims[0]

    @property
    def router_id(self) -> int:
        return self.router_ids[0]

    @property
    def db(self) -> asyncpg.Pool:
        return self.deps.db

    @property
    def engine(self) -> Engine:
        return self.deps.engine

    async def add_subscriber(self, username: str, *, router: int = 0, **kw: Any) -> int:
        data = models.SubscriberIn(
            tenant_id=self.tenant_id,
            router_id=self.router_ids[router],
            package_id=kw.pop("package_id", self.basic),
            username=username,
            password=kw.pop("password", f"pw-{username}"),
            service=kw.pop("service", "pppoe"),
            **kw,
        )
        row = await service.create_subscriber(
            self.db, data, f"test:create:{username}", on_change=subscriber_changed
        )
        return int(row["id"])

    async def patch(
        self, subscriber_id: int, correlation: str = "test:patch", **changes: Any
    ) -> None:
        await service.update_subscriber(
            self.db,
            subscriber_id,
            models.SubscriberPatch(**changes),
            correlation,
            on_change=subscriber_changed,
        )

    async def subscriber(self, subscriber_id: int) -> dict[str, Any]:
        return await service.get_subscriber(self.db, subscriber_id)

    async def settle(self, timeout: float = 20.0) -> None:
        """Relay, promote and process sync jobs one step at a time until nothing is left."""
        deadline = time.monotonic() + timeout
        consumer = self.engine.consumers["sync"]
        while True:
            moved = await self.relay.relay_once()
            promoted = await self.engine.promote_once()
            ran = await consumer.process_once(block_ms=5)
            if not (moved or promoted or ran):
                waiting = await self.deps.redis.zcard(self.engine.keys.delayed("sync"))
                queued = await self.db.fetchval("SELECT count(*) FROM outbox")
                if not waiting and not queued:
                    return
                await asyncio.sleep(0.02)
            if time.monotonic() > deadline:
                raise AssertionError("sync work did not settle in time")

    def secrets(self, sim: int = 0) -> dict[str, dict[str, str]]:
        return {e["name"]: e for e in self.sims[sim].items("/ppp/secret")}


def sync_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "sync": settings.sync.model_copy(
                update={
                    "router_timeout_s": 1.0,
                    "circuit_schedule_s": [0.2, 0.4, 1.0],
                    "circuit_max_s": 1.0,
                    "guard_min_count": 2,
                }
            )
        }
    )


async def make_stack(
    settings: Settings,
    redis: Redis,
    db: asyncpg.Pool,
    prefix: str,
    routers: int = 1,
    *,
    sensitive: bool = True,
    version: str = DEFAULT_VERSION,
) -> tuple[Stack, aiohttp.ClientSession, SyncContext]:
    settings = sync_settings(settings)
    await db.execute("DELETE FROM outbox")
    sims = []
    for _ in range(routers):
        sim = RouterOSSimulator(
            username="admin", password=ROUTER_PASSWORD, sensitive=sensitive, version=version
        )
        for profile in ("basic", "premium"):
            sim.add_item("/ppp/profile", name=profile)
            sim.add_item("/ip/hotspot/user/profile", name=profile)
        await sim.start()
        sims.append(sim)
    deps = build_deps(settings, redis, db, consumer=f"{prefix}-c")
    engine, http, sync = deps.engine, deps.http, SyncContext.build(deps)
    await engine.prepare()
    tenant = await service.create_tenant(db, models.TenantIn(name=f"tenant-{prefix}"))
    router_ids = []
    for i, sim in enumerate(sims):
        router = await service.create_router(
            db,
            models.RouterIn(
                tenant_id=tenant["id"],
                name=f"r{i}",
                host="127.0.0.1",
                port=sim.port,
                username="admin",
                password=ROUTER_PASSWORD,
            ),
        )
        router_ids.append(router["id"])
    basic = await service.create_package(
        db,
        models.PackageIn(
            tenant_id=tenant["id"], name="basic", profile="basic", price=10, period_days=30
        ),
    )
    premium = await service.create_package(
        db,
        models.PackageIn(
            tenant_id=tenant["id"], name="premium", profile="premium", price=20, period_days=30
        ),
    )
    stack = Stack(
        deps=deps,
        sync=sync,
        sims=sims,
        relay=OutboxRelay(db, engine.producer, poll_s=0.05),
        tenant_id=tenant["id"],
        router_ids=router_ids,
        basic=basic["id"],
        premium=premium["id"],
        prefix=prefix,
    )
    return stack, http, sync


@pytest.fixture
def ros_version() -> str:
    """The RouterOS version `stack`'s simulator models; `ROS_VERSIONS` parametrizes it."""
    return DEFAULT_VERSION


# `pytestmark = ROS_VERSIONS` runs a module's `stack` tests against a RouterOS 6.49 router
# (an empty print is just `!done`) and a 7.18+ one (`!empty` then `!done`).
ROS_VERSIONS = pytest.mark.parametrize(
    "ros_version", ["6.49.17", DEFAULT_VERSION], ids=["ros6.49", f"ros{DEFAULT_VERSION}"]
)


@pytest.fixture
async def stack(
    request: pytest.FixtureRequest,
    settings: Settings,
    redis: Redis,
    db: asyncpg.Pool,
    prefix: str,
    ros_version: str,
) -> AsyncIterator[Stack]:
    """One router. Parametrized indirectly (``SENSITIVITY``), False is a simulator whose API
    user lacks the `sensitive` policy (passwords not printed)."""
    sensitive = bool(getattr(request, "param", True))
    s, http, pool = await make_stack(
        settings, redis, db, prefix, sensitive=sensitive, version=ros_version
    )
    yield s
    await _teardown(s, http, pool)


# `pytestmark = SENSITIVITY` runs a module's `stack` tests with and without `sensitive`.
SENSITIVITY = pytest.mark.parametrize(
    "stack", [True, False], ids=["sensitive", "no-sensitive"], indirect=True
)


@pytest.fixture
async def stack2(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> AsyncIterator[Stack]:
    """Two routers in one tenant."""
    s, http, pool = await make_stack(settings, redis, db, prefix, routers=2)
    yield s
    await _teardown(s, http, pool)


@pytest.fixture
async def isolated_stack(
    settings: Settings, redis: Redis, prefix: str, isolated_database: str
) -> AsyncIterator[Stack]:
    """A stack on a database of its own (for tests that run the real service process)."""
    settings = settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": SecretStr(isolated_database)})
        }
    )
    pool = await asyncpg.create_pool(isolated_database, min_size=1, max_size=5)
    assert pool is not None
    s, http, routers = await make_stack(settings, redis, pool, prefix)
    yield s
    await _teardown(s, http, routers)
    await pool.close()


async def _teardown(s: Stack, http: aiohttp.ClientSession, sync: SyncContext) -> None:
    await s.db.execute("DELETE FROM outbox")
    await sync.close()
    await s.deps.closing.aclose()
    await http.close()
    for sim in s.sims:
        await sim.stop()


def past(seconds: float) -> datetime:
    from datetime import UTC, timedelta

    return datetime.now(UTC) - timedelta(seconds=seconds)
