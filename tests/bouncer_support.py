"""The Bouncer domain in the test's process: real Redis and PostgreSQL, the engine, the
admin API, and the Bouncer simulator on 127.0.0.1:0. Stepped exactly: a test runs one
creator cycle, one status cycle, one download at a time."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr
from redis.asyncio import Redis

from imsys.app import build_deps
from imsys.bouncer import repo, service
from imsys.bouncer.context import BouncerContext
from imsys.bouncer.creator import CycleResult, create_batches
from imsys.bouncer.status import StatusResult, check_batches
from imsys.deps import Deps
from imsys.http import api_bouncer
from imsys.http.server import build_app
from imsys.provider_settings import BouncerConfig
from imsys.settings import BouncerBatchingSettings, Settings
from imsys.sim.bouncer import BouncerSimulator
from imsys.streams.engine import Engine

KEY = "bouncer-test-key-51c0"
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[web.Request, web.Application]

TABLES = (
    "user_batches, user_batch_emails, emails_global, bouncer_batches,"
    " email_deliverable_results, email_catchall_results, rate_limit_tracker"
)


def addresses(owner: str, n: int, domain: str = "example.com") -> list[str]:
    return [f"{owner}{i}@{domain}" for i in range(n)]


@dataclass
class BouncerStack:
    deps: Deps
    ctx: BouncerContext
    sim: BouncerSimulator
    api: Client

    @property
    def db(self) -> asyncpg.Pool:
        return self.deps.db

    @property
    def engine(self) -> Engine:
        return self.deps.engine

    async def submit(self, emails: list[str], check_type: str = "deliverable") -> int:
        row = await service.submit(
            self.db, self.ctx.cfg, service.UserBatchIn(check_type=check_type, emails=emails)
        )
        return int(row["id"])

    async def create(self, check_type: str = "deliverable") -> CycleResult:
        return await create_batches(self.ctx, check_type)

    async def check(self, check_type: str = "deliverable") -> StatusResult:
        return await check_batches(self.ctx, check_type)

    async def download(self) -> int:
        """Run every queued bouncer-stream job to its end; how many ran."""
        ran = 0
        while n := await self.engine.consumers["bouncer"].process_once(block_ms=5):
            ran += n
        return ran

    async def run_to_end(self, check_type: str = "deliverable", cycles: int = 50) -> None:
        """Create, complete at Bouncer, check, download, until no e-mail is left open."""
        for _ in range(cycles):
            await self.create(check_type)
            self.sim.complete_all()
            await self.check(check_type)
            await self.download()
            open_rows = await self.db.fetchval(
                "SELECT count(*) FROM user_batch_emails WHERE status IN ('pending', 'assigned')"
            )
            if open_rows == 0:
                return
        raise AssertionError("work did not finish")

    async def user_batch(self, user_batch_id: int) -> dict[str, Any]:
        row = await repo.get_user_batch(self.db, user_batch_id)
        assert row is not None
        return row

    async def batches(self, check_type: str | None = None) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM bouncer_batches WHERE check_type = coalesce($1, check_type)"
            " ORDER BY id",
            check_type,
        )

    async def composition(self, batch_id: int) -> list[tuple[int, int]]:
        """(user batch, e-mails) of our batch, in FIFO order."""
        rows = await self.db.fetch(
            "SELECT e.user_batch_id, count(*) AS n FROM user_batch_emails e"
            " JOIN user_batches u ON u.id = e.user_batch_id WHERE e.bouncer_batch_id = $1"
            " GROUP BY e.user_batch_id, u.created_at ORDER BY u.created_at, e.user_batch_id",
            batch_id,
        )
        return [(r["user_batch_id"], r["n"]) for r in rows]

    async def statuses(self) -> Counter[str]:
        rows = await self.db.fetch(
            "SELECT status, count(*) AS n FROM user_batch_emails GROUP BY status"
        )
        return Counter({r["status"]: r["n"] for r in rows})

    async def calls_last_minute(self) -> int:
        return await self.ctx.limiter.calls_last_minute()

    async def prefill_rate(self, n: int, request_type: str = "status", age_s: float = 1.0) -> None:
        """Pretend ``n`` Bouncer calls were made ``age_s`` seconds ago."""
        await self.db.execute(
            "INSERT INTO rate_limit_tracker (check_type, request_type, at)"
            " SELECT 'deliverable', $2, now() - make_interval(secs => $3)"
            " FROM generate_series(1, $1)",
            n,
            request_type,
            age_s,
        )


def bouncer_settings(settings: Settings, sim: BouncerSimulator, **batching: Any) -> Settings:
    return settings.model_copy(
        update={
            "bouncer": BouncerConfig(base_url=sim.url, api_key=SecretStr(KEY), timeout=5.0,
                                     connect_timeout=2.0),
            "bouncer_batching": BouncerBatchingSettings(**batching),
        }
    )


async def clean(db: asyncpg.Pool) -> None:
    await db.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")


@asynccontextmanager
async def bouncer_stack(
    settings: Settings, redis: Redis, db: asyncpg.Pool, **batching: Any
) -> AsyncIterator[BouncerStack]:
    """The whole domain wired as app.py wires it, against a fresh simulator."""
    await clean(db)
    # Batches stay queued until a test completes them (or speeds them up).
    sim = BouncerSimulator(KEY, queue_seconds=3600.0)
    await sim.start()
    settings = bouncer_settings(settings, sim, **batching)
    deps = build_deps(settings, redis, db, consumer=f"{settings.redis.prefix}-b")
    engine, http = deps.engine, deps.http
    await engine.prepare()
    app = build_app(engine, redis, db, TOKEN)
    api_bouncer.add_routes(app, deps)
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as api:
            yield BouncerStack(deps, BouncerContext.from_deps(deps), sim, api)
    finally:
        await deps.closing.aclose()
        await http.close()
        await sim.stop()
        await clean(db)
