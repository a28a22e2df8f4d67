"""The test bed: private servers, in-process RouterOS simulators, service processes.

The simulators run in the suite's own event loop (as in the process tests), so faults
are switched and router state is read exactly; the service under test is always the
real `python -m imsys run`, in child processes with their own JSON logs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from imsys.chaos.process import ROOT, Service
from imsys.chaos.servers import PrivatePostgres, PrivateRedis, Reaper, free_port
from imsys.sim.routeros import RouterOSSimulator

ROUTER_USER, ROUTER_PASSWORD = "admin", "chaos-router-pw"
PROFILES = ("basic", "premium")


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class Bed:
    """Everything one chaos run owns. Each scenario gets a fresh database and an empty Redis."""

    def __init__(self, root: Path, *, short: bool, postgres_down_s: float | None = None) -> None:
        self.root, self.short = root, short
        self.postgres_down_s = postgres_down_s
        self.reaper = Reaper()
        self.redis = PrivateRedis(root, self.reaper)
        self.pg = PrivatePostgres(root, self.reaper)
        self.token = secrets.token_urlsafe(32)
        self.scenario_name = "setup"
        self.db_url = ""
        self.db: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None
        self.sims: list[RouterOSSimulator] = []
        self.services: list[Service] = []
        self.router_ids: list[int] = []
        self.tenant_id = self.empty_tenant_id = self.package_id = 0

    async def start(self) -> None:
        await self.pg.init()
        await self.pg.start()
        await self.redis.start()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self.end_scenario()
        if self.http is not None:
            await self.http.close()
        self.reaper.reap()

    def n(self, full: int, short: int) -> int:
        return short if self.short else full

    def t(self, full: float, short: float) -> float:
        return short if self.short else full

    async def begin_scenario(self, name: str) -> None:
        self.scenario_name = name
        if not await self.pg.ready():
            await self.pg.start()
        if self.redis.proc is None:
            await self.redis.start()
        r = self.redis.client()
        try:
            await r.flushall()
        finally:
            await r.aclose()
        self.db_url = await self.pg.fresh_database(f"chaos_{name}")
        self.db = await asyncpg.create_pool(self.db_url, min_size=0, max_size=4)

    async def end_scenario(self) -> None:
        for svc in self.services:
            await svc.kill()
        self.services.clear()
        for sim in self.sims:
            await sim.stop()
        self.sims.clear()
        if self.db is not None:
            await self.db.close()
            self.db = None

    # -- processes and routers -------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        short = self.short
        # Nothing of the caller's imsys configuration leaks into the bed's services.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMSYS_")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "IMSYS_REDIS__URL": self.redis.url,
                "IMSYS_DATABASE__URL": self.db_url,
                "IMSYS_HTTP__HOST": "127.0.0.1",
                "IMSYS_HTTP__PORT": str(free_port()),
                "IMSYS_HTTP__TOKEN": self.token,
                "IMSYS_LOG__FORMAT": "json",
                "IMSYS_LOG__LEVEL": "info",
                "IMSYS_DEMO__ENABLED": "false",
                "IMSYS_ENGINE__CLAIM_IDLE_S": "1.0" if short else "2.0",
                "IMSYS_ENGINE__HEARTBEAT_S": "0.25" if short else "0.5",
                "IMSYS_ENGINE__RECOVER_INTERVAL_S": "0.25" if short else "0.5",
                "IMSYS_ENGINE__READ_BLOCK_MS": "100",
                "IMSYS_ENGINE__LIMIT_LEASE_S": "1.0" if short else "2.0",
                "IMSYS_ENGINE__PROMOTE_INTERVAL_S": "0.1",
                "IMSYS_ENGINE__GRACE_PERIOD_S": "5",
                "IMSYS_SYNC__ROUTER_TIMEOUT_S": "5",
                "IMSYS_SYNC__CIRCUIT_SCHEDULE_S": "[0.5, 1, 2]",
                "IMSYS_SYNC__CIRCUIT_MAX_S": "2",
                "IMSYS_SYNC__FACTS_EVERY_S": "2" if short else "5",
                "IMSYS_SYNC__RECONCILE_EVERY_S": "3600",
                "IMSYS_SYNC__EXPIRE_EVERY_S": "3600",
                "IMSYS_SYNC__OUTBOX_POLL_S": "0.2",
                "IMSYS_STREAMS__SYNC__BACKOFF": "[0.5, 1, 2]",
            }
        )
        env.update(extra)
        return env

    async def service(self, name: str, *, start: bool = True, **extra: str) -> Service:
        svc = Service(self, name, self.env(**extra))
        self.services.append(svc)
        return await svc.start(wait=start)

    async def new_sim(self, port: int = 0, uptime: str | None = "3d") -> RouterOSSimulator:
        """A simulated router; by default one that has been up for days, as a router in
        service is (a fresh boot is `uptime=None`)."""
        sim = RouterOSSimulator(username=ROUTER_USER, password=ROUTER_PASSWORD)
        if uptime is not None:
            sim.set_resource(uptime=uptime)
        for profile in PROFILES:
            sim.add_item("/ppp/profile", name=profile)
            sim.add_item("/ip/hotspot/user/profile", name=profile)
        await sim.start("127.0.0.1", port)
        return sim

    # -- the admin API -----------------------------------------------------------------

    async def call(
        self,
        svc: Service,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> tuple[int, Any]:
        """(status, JSON body) from one service; status 0 when it did not answer."""
        assert self.http is not None
        h = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        try:
            async with self.http.request(
                method, f"http://127.0.0.1:{svc.port}{path}", json=body, data=data, headers=h
            ) as resp:
                raw = await resp.read()
                try:
                    return resp.status, orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    return resp.status, raw[:200].decode(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return 0, None

    async def api(self, svc: Service, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.call(svc, method, path, body)
        if status not in (200, 201, 202):
            raise RuntimeError(f"{method} {path} answered {status}: {data}")
        return data

    async def network(self, svc: Service, routers: int = 1, max_concurrency: int = 5) -> None:
        """A tenant with `routers` simulated routers and a package; and an empty tenant."""
        tenant = await self.api(svc, "POST", "/api/tenants", {"name": "Chaos ISP"})
        empty = await self.api(svc, "POST", "/api/tenants", {"name": "Empty ISP"})
        self.tenant_id, self.empty_tenant_id = tenant["id"], empty["id"]
        self.router_ids = []
        for i in range(routers):
            sim = await self.new_sim()
            self.sims.append(sim)
            router = await self.api(
                svc,
                "POST",
                "/api/routers",
                {
                    "tenant_id": self.tenant_id,
                    "name": f"r{i}",
                    "host": "127.0.0.1",
                    "port": sim.port,
                    "username": ROUTER_USER,
                    "password": ROUTER_PASSWORD,
                    "max_concurrency": max_concurrency,
                },
            )
            self.router_ids.append(router["id"])
        package = await self.api(
            svc,
            "POST",
            "/api/packages",
            {
                "tenant_id": self.tenant_id,
                "name": "basic",
                "profile": "basic",
                "price": 10,
                "period_days": 30,
            },
        )
        self.package_id = package["id"]

    def subscriber_body(self, username: str, router: int = 0) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "router_id": self.router_ids[router],
            "package_id": self.package_id,
            "username": username,
            "password": f"pw-{username}",
            "service": "pppoe",
        }

    async def subscribers(
        self, svc: Service, n: int, tag: str, router: int = 0, parallel: int = 8
    ) -> list[int]:
        """Create `n` subscribers through the API, `parallel` requests at a time."""
        ids: list[int] = []
        names = [f"{tag}{i:05d}" for i in range(n)]

        async def worker() -> None:
            while names:
                body = self.subscriber_body(names.pop(), router)
                ids.append(int((await self.api(svc, "POST", "/api/subscribers", body))["id"]))

        await asyncio.gather(*(worker() for _ in range(parallel)))
        return sorted(ids)

    # -- what is true --------------------------------------------------------------------

    async def sub_rows(self, ids: list[int]) -> list[asyncpg.Record]:
        assert self.db is not None
        return list(
            await self.db.fetch(
                "SELECT id, username, sync_status, router_id FROM subscribers WHERE id = ANY($1)",
                ids,
            )
        )

    def on_router(self, sim: RouterOSSimulator) -> dict[str, int]:
        """Managed /ppp/secret entries per name (a count above 1 is a duplicate)."""
        counts: dict[str, int] = {}
        for e in sim.items("/ppp/secret"):
            if e.get("comment", "").startswith("imsys:sub="):
                counts[e["name"]] = counts.get(e["name"], 0) + 1
        return counts

    async def truth(self, ids: list[int], sim: RouterOSSimulator) -> tuple[int, int, int]:
        """(healed, false statuses, duplicates): healed means synced and on the router;
        a false status is `synced` while absent or `error` while present."""
        present = self.on_router(sim)
        healed = false = 0
        for row in await self.sub_rows(ids):
            here = present.get(row["username"], 0) > 0
            healed += here and row["sync_status"] == "synced"
            false += (row["sync_status"] == "synced") != here and row["sync_status"] != "pending"
        return healed, false, sum(1 for c in present.values() if c > 1)

    async def dead(self) -> list[dict[bytes, bytes]]:
        r = self.redis.client(decode=False)
        try:
            entries = await r.xrange(b"imsys:dead")
            return [{_b(k): _b(v) for k, v in (f or {}).items()} for _, f in entries or []]
        finally:
            await r.aclose()
