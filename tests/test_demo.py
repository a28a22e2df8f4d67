"""Demo mode, as `make run` starts it: the real service process with its simulators."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from imsys.demo import BOUNCER_KEY, Demo
from imsys.settings import Settings
from tests.conftest import ROOT, subprocess_env
from tests.sync_support import Stack

AUTH = {"Authorization": "Bearer change-me"}  # allowed: the demo listens on loopback only
SUBSCRIBERS = 20

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoService:
    """`python -m imsys run` with IMSYS_DEMO__ENABLED=true, and a client for its API."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix="imsys-demo-", suffix=".log")[1])
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imsys", "run"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.http = aiohttp.ClientSession(headers=AUTH)

    async def get(self, path: str) -> Any:
        async with self.http.get(self.base + path) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def post(self, path: str, body: Any = None) -> Any:
        async with self.http.post(self.base + path, json=body) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def patch(self, path: str, body: Any) -> Any:
        async with self.http.patch(self.base + path, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def until(self, what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"service died: {self.output()}"
            try:
                if await check():
                    return
            except (aiohttp.ClientError, AssertionError):
                pass  # not listening yet, or not there yet
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not in {timeout}s\n{self.output()}")
            await asyncio.sleep(0.2)

    async def stop(self) -> int:
        await self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, 30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    async def synced(self) -> int:
        body = await self.get("/api/subscribers?sync_status=synced&limit=1")
        return int(body["total"])

    async def routers(self) -> list[dict[str, Any]]:
        body = await self.get("/api/routers")
        rows: list[dict[str, Any]] = body["routers"]
        return rows


def demo_env(settings: Settings, database_url: str, port: int) -> dict[str, str]:
    return subprocess_env(
        settings,
        IMSYS_DATABASE__URL=database_url,
        IMSYS_HTTP__PORT=str(port),
        IMSYS_ENGINE__READ_BLOCK_MS="100",
        IMSYS_DEMO__ENABLED="true",
        IMSYS_DEMO__SUBSCRIBERS=str(SUBSCRIBERS),
        IMSYS_DEMO__EXPIRING="2",
        IMSYS_DEMO__CREATE_PER_S="0",
        IMSYS_DEMO__CHURN_EVERY_S="0",  # nothing changes but what the test changes
        IMSYS_DEMO__FACTS_EVERY_S="0.5",
        IMSYS_DEMO__CIRCUIT_MAX_S="1",
    )


async def test_demo_syncs_survives_an_outage_and_restarts_idempotently(
    settings: Settings, isolated_database: str
) -> None:
    """The demo creates its tenant, routers, subscribers (which sync to the simulated
    routers) and a Bouncer user batch; a router taken offline from the demo API goes
    offline, its jobs wait (no error, no dead letter) and finish once it is back; a
    restart creates nothing twice and reconciliation refills the fresh simulators."""
    port = free_port()
    env = demo_env(settings, isolated_database, port)
    svc = DemoService(env, port)
    try:
        await svc.until("all demo subscribers synced", lambda: _eq(svc.synced(), SUBSCRIBERS), 40)
        demo = await svc.get("/api/demo")
        assert demo["enabled"] is True
        assert [r["down"] for r in demo["routers"]] == [False, False]
        # A sync marks a router online at once; its version comes with the next facts pull.
        await svc.until("routers online with their facts", lambda: _all_reported(svc), 20)
        routers = await svc.routers()
        assert all(r["online"] is True and r["version"] for r in routers)
        soon = datetime.now(UTC) + timedelta(minutes=10)
        first = (await svc.get("/api/subscribers?q=demo0001"))["subscribers"][0]
        assert datetime.fromisoformat(first["expires_at"]) < soon  # one of the expiring few

        # Router 1 goes down.
        router = demo["routers"][0]
        assert (await svc.post("/api/demo/routers/0/outage", {"down": True}))["down"] is True

        async def offline() -> bool:
            rows = {r["id"]: r for r in await svc.routers()}
            return rows[router["router_id"]]["online"] is False

        await svc.until("router offline", offline, 10)
        victims = await svc.get(f"/api/subscribers?router_id={router['router_id']}&limit=3")
        for sub in victims["subscribers"]:
            await svc.patch(f"/api/subscribers/{sub['id']}", {"is_suspended": True})
        await asyncio.sleep(2)  # the circuit defers the jobs meanwhile
        for sub in victims["subscribers"]:
            row = await svc.get(f"/api/subscribers/{sub['id']}")
            # Held, not failed: waiting for its first try, or told when the next one is.
            assert row["sync_status"] in ("pending", "retrying"), row
        # Back up: the waiting jobs go through, nothing was dead-lettered.
        assert (await svc.post("/api/demo/routers/0/outage", {"down": False}))["down"] is False
        await svc.until("healed", lambda: _eq(svc.synced(), SUBSCRIBERS), 30)
        await svc.until("router online", lambda: _all_online(svc), 10)
        assert (await svc.get("/api/dead-letters"))["dead_letters"] == []
    finally:
        code = await svc.stop()
    assert code == 0, svc.output()

    again = DemoService(env, port)
    try:
        await svc_ready(again)
        tenants = (await again.get("/api/tenants"))["tenants"]
        assert [t["name"] for t in tenants] == ["Demo ISP"]
        [batch] = (await again.get("/api/bouncer/batches"))["batches"]  # the first run's
        assert batch["total"] == SUBSCRIBERS
        assert len(await again.routers()) == 2
        assert (await again.get("/api/subscribers?limit=1"))["total"] == SUBSCRIBERS

        async def refilled() -> bool:
            # Every router holds its subscribers again, with nothing left to change.
            for r in await again.routers():
                p = await again.post(f"/api/routers/{r['id']}/plan")
                if p["changes"] or p["managed_entries"] != p["subscribers"]:
                    return False
            return True

        await again.until("fresh simulators refilled", refilled, 30)
    finally:
        code = await again.stop()
    assert code == 0, again.output()


async def svc_ready(svc: DemoService) -> None:
    async def seeded() -> bool:
        return bool((await svc.get("/api/demo"))["seeded"])

    await svc.until("demo seeded", seeded, 30)


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _all_online(svc: DemoService) -> bool:
    return all(r["online"] is True for r in await svc.routers())


async def _all_reported(svc: DemoService) -> bool:
    return all(r["online"] is True and r["version"] for r in await svc.routers())


async def test_demo_points_the_providers_at_its_simulators(settings: Settings) -> None:
    """Demo settings send Bouncer, SMS and WhatsApp calls to the in-process simulators
    (never a real provider) and shorten the router facts and circuit timings."""
    settings = settings.model_copy(
        update={"demo": settings.demo.model_copy(update={"enabled": True, "routers": 3})}
    )
    async with AsyncExitStack() as stack:
        demo = await Demo.open(settings, stack)
        s = demo.settings
        assert s.bouncer.base_url == demo.bouncer.url
        assert s.bouncer.api_key.get_secret_value() == BOUNCER_KEY
        assert s.sms.url.startswith(demo.gateway.url)
        assert s.whatsapp.base_url.startswith(demo.gateway.url)
        assert s.sync.facts_every_s == settings.demo.facts_every_s
        assert s.sync.circuit_max_s == settings.demo.circuit_max_s
        assert len(demo.routers) == 3
        assert all(r.listening for r in demo.routers)
        status = demo.status()
        assert [r["down"] for r in status["routers"]] == [False] * 3
        await demo.set_outage(2, None)
        assert demo.status()["routers"][2]["down"] is True
        with pytest.raises(IndexError):
            await demo.set_outage(3, True)
    assert not any(r.listening for r in demo.routers)  # stopped with the stack


async def test_demo_adds_nothing_to_a_database_with_other_tenants(stack: Stack) -> None:
    """Demo mode against a database that holds real tenants seeds nothing and says why."""
    settings = stack.deps.settings
    settings = settings.model_copy(
        update={"demo": settings.demo.model_copy(update={"enabled": True, "routers": 1})}
    )
    async with AsyncExitStack() as exits:
        demo = await Demo.open(settings, exits)
        await demo.seed(stack.deps)
        assert demo.refused is not None
        assert "other tenant" in demo.status()["note"]
        assert demo.status()["seeded"] is False
    assert await stack.db.fetchval("SELECT count(*) FROM tenants WHERE name = 'Demo ISP'") == 0
