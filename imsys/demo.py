"""Demo mode (``[demo] enabled``, what ``make run`` starts): the outside world in-process.

`Demo.open` starts simulated RouterOS routers, the Bouncer simulator and the SMS/WhatsApp
gateway simulator on loopback ports and returns settings pointed at them (nothing in
demo mode reaches a real provider). `Demo.launch` waits for the engine, then creates —
idempotently, through `imsys.network.service` like the admin API, so every change goes
through the outbox — a demo tenant with its routers, packages and subscribers, and keeps
the network alive: subscribers dial in once their secret exists, and a random
subscriber changes now and then so sync work keeps flowing. The dashboard's demo panel
switches a router off and on (`set_outage`) to watch jobs wait and the system heal.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import structlog
from pydantic import SecretStr

from imsys.bouncer import service as bouncer_service
from imsys.deps import Deps
from imsys.network import models, service
from imsys.network.errors import Conflict
from imsys.provider_settings import SmsConfig, WhatsAppConfig
from imsys.routeros import menus
from imsys.settings import Settings
from imsys.sim.bouncer import BouncerSimulator
from imsys.sim.gateway import DEFAULT_WHATSAPP_TOKEN, GatewaySimulator
from imsys.sim.routeros import RouterOSSimulator
from imsys.sync.service import queue_reconciliation, subscriber_changed

log = structlog.get_logger("imsys.demo")

TENANT = "Demo ISP"
ROUTER_USER = "admin"
ROUTER_PASSWORD = "demo-router-pass"  # noqa: S105 - a simulator's published demo login
BOUNCER_KEY = "bouncer-sim-key"
# (name, RouterOS profile, rate limit, price)
PACKAGES = (
    ("Home 10M", "home-10m", "10M/10M", 20),
    ("Business 50M", "biz-50m", "50M/50M", 60),
)
VERSIONS = ("7.16.2 (stable)", "6.49.17 (long-term)")
CORRELATION = "demo"
DIAL_EVERY_S = 2.0


def username(n: int) -> str:
    return f"demo{n + 1:04d}"


class Demo:
    """The simulators of one demo process and the background work that animates them."""

    def __init__(self, settings: Settings) -> None:
        self.cfg = settings.demo
        self.settings = settings
        self.routers = [
            RouterOSSimulator(username=ROUTER_USER, password=ROUTER_PASSWORD)
            for _ in range(self.cfg.routers)
        ]
        self.bouncer = BouncerSimulator(BOUNCER_KEY, queue_seconds=2.0, emails_per_second=50.0)
        self.gateway = GatewaySimulator()
        self.router_ids: list[int] = []
        self.seeded = False
        self.refused: str | None = None
        self._task: asyncio.Task[None] | None = None

    # --- life cycle -------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: Settings, stack: AsyncExitStack) -> Demo:
        """Start the simulators (stopped when ``stack`` closes); ``.settings`` point at them."""
        demo = cls(settings)
        stack.push_async_callback(demo.stop_simulators)
        for i, sim in enumerate(demo.routers):
            for _, profile, _, _ in PACKAGES:
                sim.add_item(menus.PPP_PROFILE, name=profile)
                sim.add_item(menus.HOTSPOT_USER_PROFILE, name=profile)
            sim.set_resource(version=VERSIONS[i % len(VERSIONS)], uptime=f"{3 + i}d{4 * i}h")
            await sim.start("127.0.0.1", 0)
        await demo.bouncer.start("127.0.0.1", 0)
        await demo.gateway.start("127.0.0.1", 0)
        demo.settings = demo.configure(settings)
        log.info(
            "demo_simulators_started",
            routers=[s.port for s in demo.routers],
            bouncer=demo.bouncer.url,
            gateway=demo.gateway.url,
        )
        return demo

    def configure(self, settings: Settings) -> Settings:
        """A copy of ``settings`` whose providers are the simulators, with demo timings."""
        gateway = self.gateway.url
        return settings.model_copy(
            update={
                "bouncer": settings.bouncer.model_copy(
                    update={"base_url": self.bouncer.url, "api_key": SecretStr(BOUNCER_KEY)}
                ),
                # The simulator's published defaults, whatever the file named: a demo never
                # sends a real SMS.
                "sms": SmsConfig(url=f"{gateway}/version1/messaging"),
                "whatsapp": WhatsAppConfig(
                    base_url=f"{gateway}/v21.0", token=SecretStr(DEFAULT_WHATSAPP_TOKEN)
                ),
                "sync": settings.sync.model_copy(
                    update={
                        "facts_every_s": self.cfg.facts_every_s,
                        # Caps every step of the outage schedule.
                        "circuit_max_s": self.cfg.circuit_max_s,
                    }
                ),
            }
        )

    def launch(self, deps: Deps, stack: AsyncExitStack) -> None:
        """Seed once the engine is ready, then animate the network until it stops."""
        self._task = asyncio.create_task(self._run(deps), name="demo")
        # Pushed after the pools: cancelled before they close.
        stack.push_async_callback(self._cancel)

    async def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def stop_simulators(self) -> None:
        for sim in self.routers:
            await sim.stop()
        await self.bouncer.stop()
        await self.gateway.stop()

    async def _run(self, deps: Deps) -> None:
        engine = deps.engine
        ready = asyncio.create_task(engine.ready.wait())
        stopping = asyncio.create_task(engine.stopping.wait())
        await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        if engine.stopping.is_set():
            return
        try:
            await self.seed(deps)
        except Exception:
            log.exception("demo_seed_failed")
            return
        loops = [self._every(engine.stopping, DIAL_EVERY_S, "dial_in", self.dial_in)]
        if self.cfg.churn_every_s > 0:
            loops.append(
                self._every(
                    engine.stopping, self.cfg.churn_every_s, "churn", partial(self.churn, deps.db)
                )
            )
        await asyncio.gather(*loops)

    @staticmethod
    async def _every(
        stopping: asyncio.Event, seconds: float, step: str, fn: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``fn`` every ``seconds`` until ``stopping``; a failing step is logged."""
        while not stopping.is_set():
            try:
                await fn()
            except Exception:
                log.exception("demo_step_failed", step=step)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=seconds)

    # --- the demo tenant --------------------------------------------------------------------

    async def seed(self, deps: Deps) -> None:
        """Create what is missing of the demo tenant; point its routers at this run's ports."""
        db = deps.db
        # A database with real tenants is not a playground: never mix demo data into it.
        others = await db.fetchval("SELECT count(*) FROM tenants WHERE name <> $1", TENANT)
        if others:
            self.refused = (
                f"the database holds {others} other tenant(s): demo data is not added to it "
                "(point IMSYS_DATABASE__URL at a database of its own)"
            )
            log.error("demo_not_seeded", reason=self.refused)
            return
        tenant_id = await db.fetchval("SELECT id FROM tenants WHERE name = $1", TENANT)
        if tenant_id is None:
            tenant = await service.create_tenant(db, models.TenantIn(name=TENANT))
            tenant_id = tenant["id"]
        self.router_ids = [
            await self._router(db, tenant_id, i, sim) for i, sim in enumerate(self.routers)
        ]
        packages = [await self._package(db, tenant_id, *p) for p in PACKAGES]
        # The simulators start empty on every run: reconciliation puts the subscribers
        # that are already synced in the database back on them.
        for router_id in self.router_ids:
            await queue_reconciliation(deps.engine.producer, router_id)
        existing = {
            r["username"]
            for r in await db.fetch(
                "SELECT username FROM subscribers WHERE tenant_id = $1", tenant_id
            )
        }
        now = datetime.now(UTC)
        created = 0
        for n in range(self.cfg.subscribers):
            if username(n) in existing:
                continue
            data = models.SubscriberIn(
                tenant_id=tenant_id,
                router_id=self.router_ids[n % len(self.router_ids)],
                package_id=packages[0] if n % 4 else packages[1],
                username=username(n),
                password=f"pw-{n + 1:04d}",
                service="hotspot" if n % 5 == 4 else "pppoe",
                expires_at=now + timedelta(days=30, hours=n),
                phone=f"+2547{n + 1:08d}",
            )
            try:
                await service.create_subscriber(db, data, CORRELATION, on_change=subscriber_changed)
                created += 1
            except Conflict:
                pass  # another process of the demo got there first
            if self.cfg.create_per_s > 0:
                # Paced, so the dashboard shows them arrive as pending and turn synced.
                await asyncio.sleep(1 / self.cfg.create_per_s)
            if deps.engine.stopping.is_set():
                return
        await self._expire_soon(db, tenant_id, now)
        try:
            await self._user_batch(deps)
        except Exception:
            # The Bouncer panel is a nicety: the demo runs without it.
            log.exception("demo_user_batch_failed")
        self.seeded = True
        log.info("demo_seeded", tenant_id=tenant_id, created=created, routers=self.router_ids)

    async def _router(
        self, db: asyncpg.Pool, tenant_id: int, index: int, sim: RouterOSSimulator
    ) -> int:
        name = f"demo-router-{index + 1}"
        router_id = await db.fetchval(
            "UPDATE routers SET host = '127.0.0.1', port = $3, username = $4, password = $5,"
            " use_tls = false WHERE tenant_id = $1 AND name = $2 RETURNING id",
            tenant_id,
            name,
            sim.port,
            ROUTER_USER,
            ROUTER_PASSWORD,
        )
        if router_id is not None:
            return int(router_id)
        row = await service.create_router(
            db,
            models.RouterIn(
                tenant_id=tenant_id,
                name=name,
                host="127.0.0.1",
                port=sim.port,
                username=ROUTER_USER,
                password=ROUTER_PASSWORD,
            ),
        )
        return int(row["id"])

    async def _package(
        self, db: asyncpg.Pool, tenant_id: int, name: str, profile: str, rate: str, price: int
    ) -> int:
        found = await db.fetchval(
            "SELECT id FROM packages WHERE tenant_id = $1 AND name = $2", tenant_id, name
        )
        if found is not None:
            return int(found)
        row = await service.create_package(
            db,
            models.PackageIn(
                tenant_id=tenant_id,
                name=name,
                profile=profile,
                rate_limit=rate,
                price=price,
                period_days=30,
            ),
        )
        return int(row["id"])

    async def _user_batch(self, deps: Deps) -> None:
        """One Bouncer user batch (the first run only), to watch on its way through the
        Bouncer simulator."""
        if await deps.db.fetchval("SELECT EXISTS (SELECT 1 FROM user_batches)"):
            return
        emails = [f"{username(n)}@example.net" for n in range(min(self.cfg.subscribers, 50))]
        if emails:
            data = bouncer_service.UserBatchIn(check_type="deliverable", emails=emails)
            await bouncer_service.submit(deps.db, deps.settings.bouncer_batching, data)

    async def _expire_soon(self, db: asyncpg.Pool, tenant_id: int, now: datetime) -> None:
        """The first few subscribers expire 2, 3, 4 ... minutes from now (again each run)."""
        for n in range(min(self.cfg.expiring, self.cfg.subscribers)):
            sub_id = await db.fetchval(
                "SELECT id FROM subscribers WHERE tenant_id = $1 AND username = $2"
                " AND deleted_at IS NULL",
                tenant_id,
                username(n),
            )
            if sub_id is None:
                continue
            patch = models.SubscriberPatch(
                expires_at=now + timedelta(minutes=2 + n), is_suspended=False
            )
            await service.update_subscriber(
                db, sub_id, patch, CORRELATION, on_change=subscriber_changed
            )

    # --- animation --------------------------------------------------------------------------

    async def dial_in(self) -> None:
        """Subscribers whose login exists on a router connect (most of them, not all)."""
        for sim in self.routers:
            if not sim.listening:
                continue  # the router is down: nobody gets in
            online = {row["name"] for row in sim.items(menus.PPP_ACTIVE)}
            for secret in sim.items(menus.PPP_SECRET):
                name = secret["name"]
                if name not in online and secret.get("disabled") != "true":
                    if random.random() < 0.5:
                        with contextlib.suppress(ValueError):
                            sim.connect_session(name, uptime=random.uniform(0, 86400))
                elif name in online and random.random() < 0.005:
                    sim.disconnect_session(name)
            online = {row["user"] for row in sim.items(menus.HOTSPOT_ACTIVE)}
            for user in sim.items(menus.HOTSPOT_USER):
                idle = user["name"] not in online and user.get("disabled") != "true"
                if idle and random.random() < 0.5:
                    with contextlib.suppress(ValueError):
                        sim.login_hotspot(user["name"], uptime=random.uniform(0, 3600))

    async def churn(self, db: asyncpg.Pool) -> None:
        """One random demo subscriber (not an expiring one) changes package or suspension."""
        if self.cfg.subscribers <= self.cfg.expiring:
            return
        n = random.randrange(self.cfg.expiring, self.cfg.subscribers)
        row = await db.fetchrow(
            "SELECT s.id, s.package_id, s.is_suspended FROM subscribers s"
            " JOIN tenants t ON t.id = s.tenant_id"
            " WHERE t.name = $1 AND s.username = $2 AND s.deleted_at IS NULL",
            TENANT,
            username(n),
        )
        if row is None:
            return
        if random.random() < 0.2 or row["is_suspended"]:
            patch = models.SubscriberPatch(is_suspended=not row["is_suspended"])
        else:
            other = await db.fetchval(
                "SELECT id FROM packages WHERE tenant_id = (SELECT tenant_id FROM subscribers"
                " WHERE id = $1) AND id <> $2 ORDER BY id LIMIT 1",
                row["id"],
                row["package_id"],
            )
            if other is None:
                return
            patch = models.SubscriberPatch(package_id=other)
        await service.update_subscriber(
            db, row["id"], patch, CORRELATION, on_change=subscriber_changed
        )

    # --- the dashboard's demo panel ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        sent = len(self.gateway.messages())
        return {
            "enabled": True,
            "tenant": TENANT,
            "seeded": self.seeded,
            "routers": [
                {
                    "index": i,
                    "name": f"demo-router-{i + 1}",
                    "router_id": self.router_ids[i] if i < len(self.router_ids) else None,
                    "port": sim.port,
                    "down": not sim.listening,
                }
                for i, sim in enumerate(self.routers)
            ],
            "messages_sent": sent,
            "note": (
                f"Demo not seeded: {self.refused}."
                if self.refused
                else f"{self.cfg.subscribers} demo subscribers on {len(self.routers)} "
                f"simulated routers; {sent} SMS/WhatsApp message(s) delivered to the "
                "gateway simulator."
            ),
        }

    async def set_outage(self, index: int, down: bool | None) -> dict[str, Any]:
        """Take router ``index`` offline (connections drop, new ones are refused) or bring
        it back; ``down=None`` toggles. Raises IndexError for an unknown router."""
        if not 0 <= index < len(self.routers):
            raise IndexError(index)
        sim = self.routers[index]
        if down is None:
            down = sim.listening
        if down:
            await sim.go_down()
        else:
            await sim.come_up()
        log.info("demo_router_outage", router=index, down=down)
        routers: list[dict[str, Any]] = self.status()["routers"]
        return routers[index]
