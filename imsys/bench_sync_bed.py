"""The sync benchmark's bed: its own database, key prefix, service and routers.

Set-up and tear-down of ``python -m imsys bench sync`` (`imsys.bench_sync` runs the
phases): a fresh PostgreSQL database on the configured server with the schema applied,
a Redis key prefix of its own on the configured Redis (both dropped at the end unless
``--keep``), the service as a real ``python -m imsys run`` child (`imsys.chaos.process.
Service`), and the simulated routers in a child process of their own
(`imsys.bench_sync_sims`). Waiting is bounded by ``--timeout`` and stops early if the
service dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from imsys.bench_sync_sims import SimHost
from imsys.chaos.process import Service
from imsys.chaos.servers import Reaper, free_port
from imsys.db import migrate
from imsys.redisconn import make_redis
from imsys.settings import Settings

ROUTER_USER = "admin"
MENU = "/ppp/secret"
PROFILE = "basic"
POLL_S = 0.2


@dataclass(frozen=True)
class SyncBenchOptions:
    routers: int
    subscribers: int
    clients: int = 16
    api_creates: int = 2000
    drift: float = 0.01
    # Longest wait of each phase that waits for the service (seconds).
    timeout: float = 1800.0
    keep: bool = False


class BenchTimeout(RuntimeError):
    """A phase did not finish within --timeout; the figures so far are still reported."""


def say(message: str) -> None:
    print(f"bench sync: {message}", file=sys.stderr, flush=True)


def peak_rss_mb(pid: int) -> float | None:
    """The process's high-water resident set (VmHWM), in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SyncBed:
    """What one run owns: the temp folder, the database, the key prefix, the service and
    the simulated routers. It is the `Host` its `Service` needs (root, scenario_name,
    reaper, call)."""

    def __init__(self, settings: Settings, opts: SyncBenchOptions) -> None:
        self.opts = opts
        self.settings = settings
        self.root = Path(tempfile.mkdtemp(prefix="imsys-bench-sync-"))
        self.scenario_name = "bench-sync"
        self.reaper = Reaper()
        self.token = secrets.token_urlsafe(24)
        self.router_password = secrets.token_urlsafe(12)
        run = secrets.token_hex(4)
        self.prefix = f"{settings.redis.prefix}-bench-sync-{run}"
        base = settings.database.url.get_secret_value().rsplit("/", 1)[0]
        self.db_name = f"imsys_bench_sync_{run}"
        self.db_url = f"{base}/{self.db_name}"
        self.tag = settings.sync.comment_tag
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=max(opts.timeout, 60)),
            connector=aiohttp.TCPConnector(limit=max(opts.clients, 16) + 4),
        )
        self.sims: SimHost | None = None
        self.svc: Service | None = None
        self.db: asyncpg.Pool | None = None
        self.router_ids: list[int] = []
        self.tenant_id = self.package_id = 0
        # Subscribers seen synced by the last check (what a timed-out phase reached).
        self.progress = 0

    # -- the admin API ----------------------------------------------------------------

    async def call(self, svc: Service, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body); status 0 when the service did not answer."""
        data = None if body is None else orjson.dumps(body)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            async with self.http.request(
                method, f"http://127.0.0.1:{svc.port}{path}", data=data, headers=headers
            ) as resp:
                raw = await resp.read()
                return resp.status, orjson.loads(raw) if raw else None
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
            return 0, None

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        assert self.svc is not None
        status, data = await self.call(self.svc, method, path, body)
        if status not in (200, 201, 202):
            raise RuntimeError(f"{method} {path} answered {status}: {str(data)[:500]}")
        return data

    # -- set-up and tear-down -----------------------------------------------------------

    def service_env(self) -> dict[str, str]:
        env = dict(os.environ)  # IMSYS_* of the caller reach the service (tuning runs)
        env.update(
            {
                "IMSYS_REDIS__URL": self.settings.redis.url.get_secret_value(),
                "IMSYS_REDIS__PREFIX": self.prefix,
                "IMSYS_DATABASE__URL": self.db_url,
                "IMSYS_HTTP__ENABLED": "true",
                "IMSYS_HTTP__HOST": "127.0.0.1",
                "IMSYS_HTTP__PORT": str(free_port()),
                "IMSYS_HTTP__TOKEN": self.token,
                "IMSYS_LOG__FORMAT": "json",
                "IMSYS_DEMO__ENABLED": "false",
                "IMSYS_SYNC__COMMENT_TAG": self.tag,
                # Only the benchmark's own reconciliation runs during the run.
                "IMSYS_SYNC__RECONCILE_EVERY_S": "86400",
            }
        )
        return env

    async def start(self) -> list[int]:
        o = self.opts
        say(f"database {self.db_name}, key prefix {self.prefix}, logs in {self.root}")
        await migrate(self.db_url)
        self.db = await asyncpg.create_pool(self.db_url, min_size=1, max_size=2)
        self.sims = SimHost(o.routers + 1, ROUTER_USER, self.router_password)
        ports = await self.sims.ready()
        self.svc = Service(self, "service", self.service_env())
        await self.svc.start(limit=60)
        tenant = await self.api("POST", "/api/tenants", {"name": "Bench ISP"})
        router_ids = []
        for i, port in enumerate(ports):
            router = await self.api(
                "POST",
                "/api/routers",
                {
                    "tenant_id": tenant["id"],
                    "name": f"bench-{i}" if i < o.routers else "bench-api",
                    "host": "127.0.0.1",
                    "port": port,
                    "username": ROUTER_USER,
                    "password": self.router_password,
                },
            )
            router_ids.append(int(router["id"]))
        package = await self.api(
            "POST",
            "/api/packages",
            {
                "tenant_id": tenant["id"],
                "name": "Basic",
                "profile": PROFILE,
                "price": 10,
                "period_days": 30,
            },
        )
        self.tenant_id, self.package_id = int(tenant["id"]), int(package["id"])

        async def profiles_everywhere() -> bool:
            assert self.sims is not None
            return all(
                [
                    await self.sims.ask("has", i, "/ppp/profile", PROFILE) == 1
                    for i in range(len(ports))
                ]
            )

        await self.wait(profiles_everywhere, "the package's profile on every router")
        return router_ids

    async def close(self) -> None:
        keep = self.opts.keep
        if self.svc is not None:
            await self.svc.stop()
        if self.sims is not None:
            self.sims.stop()
        await self.http.close()
        if self.db is not None:
            await self.db.close()
        self.reaper.reap()
        if keep:
            say(f"kept: database {self.db_name}, key prefix {self.prefix}, logs in {self.root}")
            return
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(self.db_url.rsplit("/", 1)[0] + "/postgres")
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            finally:
                await conn.close()
        redis = make_redis(self.settings)
        try:
            async for key in redis.scan_iter(match=f"{self.prefix}:*", count=1000):
                await redis.delete(key)
        finally:
            await redis.aclose()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- waiting ---------------------------------------------------------------------------

    async def wait(
        self, check: Callable[[], Awaitable[bool]], what: str, every: float = POLL_S
    ) -> float:
        """Seconds until `check()` held; BenchTimeout after --timeout, or if the service
        died (its log's tail in the message)."""
        assert self.svc is not None
        start = time.monotonic()
        while not await check():
            if not self.svc.alive:
                raise RuntimeError(
                    f"the service exited while waiting for {what}: {self.svc.tail()}"
                )
            if time.monotonic() - start > self.opts.timeout:
                raise BenchTimeout(f"timed out after {self.opts.timeout:g}s waiting for {what}")
            await asyncio.sleep(every)
        return time.monotonic() - start

    async def all_synced(self, router_ids: list[int], per_router: int) -> float:
        """Wait until every subscriber of `router_ids` is synced in the database and on its
        router (`per_router` managed entries, no two by one name); progress on stderr."""
        assert self.db is not None
        assert self.sims is not None
        db, sims = self.db, self.sims
        indexes = [self.router_ids.index(r) for r in router_ids]
        total = per_router * len(router_ids)
        start = last_said = time.monotonic()

        async def check() -> bool:
            nonlocal last_said
            row = await db.fetchrow(
                "SELECT count(*) FILTER (WHERE sync_status = 'synced') AS synced, "
                "count(*) FILTER (WHERE sync_status = 'error') AS errors "
                "FROM subscribers WHERE router_id = ANY($1::bigint[])",
                router_ids,
            )
            assert row is not None
            synced, errors = int(row["synced"]), int(row["errors"])
            self.progress = synced
            now = time.monotonic()
            if now - last_said >= 5:
                last_said = now
                rate = synced / (now - start)
                say(f"{synced}/{total} synced ({rate:.0f}/s), {errors} in error")
            if synced < total:
                return False
            for i in indexes:
                entries, names = await sims.ask("managed", i, MENU, self.tag)
                if entries != per_router or names != per_router:
                    return False
            return True

        return await self.wait(check, f"{total} subscribers synced")

    # -- phases ------------------------------------------------------------------------------

    def body(self, router_id: int, username: str) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "router_id": router_id,
            "package_id": self.package_id,
            "username": username,
            "password": f"pw-{username}",
            "service": "pppoe",
        }
