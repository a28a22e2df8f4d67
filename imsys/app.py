"""Wiring: build the dependencies, register the domains, run engine and HTTP together."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from contextlib import AsyncExitStack

import aiohttp
import asyncpg
import structlog
from aiohttp import web
from redis.asyncio import Redis

from imsys import intents
from imsys.billing import domain as billing_domain
from imsys.bouncer import domain as bouncer_domain
from imsys.db import connect_pool
from imsys.db import translate_error as translate_db_error
from imsys.demo import Demo
from imsys.deps import Deps
from imsys.events import domain as events_domain
from imsys.http import (
    api_billing,
    api_bouncer,
    api_controls,
    api_network,
    api_sync,
    api_tokens,
    api_webhooks,
    dashboard,
)
from imsys.http.server import build_app, check_listen_safety
from imsys.outbox import OutboxRelay
from imsys.publisher import EventPublisher
from imsys.redisconn import make_redis
from imsys.settings import Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Registry
from imsys.sync import domain as sync_domain
from imsys.systemd import Notifier

log = structlog.get_logger("imsys.app")


def register_domains(deps: Deps) -> None:
    """Each domain registers its handlers and timers with the engine."""
    sync_domain.register(deps)
    events_domain.register(deps)
    billing_domain.register(deps)
    bouncer_domain.register(deps)
    # Redis is a cache of work: put back the jobs of PostgreSQL's intents when it loses them.
    intents.register(deps)


def build_deps(
    settings: Settings, redis: Redis, db: asyncpg.Pool, *, consumer: str | None = None
) -> Deps:
    """The dependencies with every domain registered; the caller closes http and closing."""
    engine = Engine(redis, settings, Registry(), consumer=consumer)
    engine.add_error_translator(translate_db_error)
    deps = Deps(
        settings=settings,
        redis=redis,
        db=db,
        engine=engine,
        http=aiohttp.ClientSession(),
        events=make_events(settings, redis, engine),
    )
    register_domains(deps)
    return deps


def build_http(deps: Deps, demo: Demo | None = None) -> web.Application:
    """The admin server's app with every module's routes (and their OpenAPI declarations:
    a module adds its routes through `imsys.http.openapi.Routes`)."""
    settings = deps.settings
    app = build_app(
        deps.engine,
        deps.redis,
        deps.db,
        settings.http.token.get_secret_value(),
        max_body_bytes=settings.http.max_body_bytes,
    )
    api_network.add_routes(app, deps)
    api_sync.add_routes(app, deps)
    api_controls.add_routes(app, deps)
    api_bouncer.add_routes(app, deps)
    api_billing.add_routes(app, deps)
    api_webhooks.add_routes(app, deps)
    api_tokens.add_routes(app, deps)
    dashboard.add_routes(app, demo)
    return app


def make_events(settings: Settings, redis: Redis, engine: Engine) -> EventPublisher:
    return EventPublisher(redis, engine.keys, retention_hours=settings.events.backend_events_hours)


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run the service until SIGTERM/SIGINT; drain; return (exit 0)."""
    check_listen_safety(settings.http)
    async with AsyncExitStack() as stack:
        # Demo mode: simulators first, and settings pointed at them before anything uses them.
        demo = await Demo.open(settings, stack) if settings.demo.enabled else None
        settings = demo.settings if demo is not None else settings
        redis = make_redis(settings)
        stack.push_async_callback(redis.aclose)
        db = await connect_pool(
            settings.database.url.get_secret_value(),
            min_size=settings.database.pool_min,
            max_size=settings.database.pool_max,
        )
        stack.push_async_callback(db.close)
        deps = build_deps(settings, redis, db)
        stack.push_async_callback(deps.http.close)
        stack.push_async_callback(deps.closing.aclose)
        engine = deps.engine
        if demo is not None:
            demo.launch(deps, stack)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, engine.stop)

        if settings.http.enabled:
            app = build_http(deps, demo)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, settings.http.host, settings.http.port)
            await site.start()
            log.info("http_listening", host=settings.http.host, port=settings.http.port)

        # Objects alive now live for the whole process: keep them out of GC scans.
        gc.freeze()
        relay = OutboxRelay(
            db,
            engine.producer,
            poll_s=settings.sync.outbox_poll_s,
            bulk_backlog=settings.sync.bulk_backlog,
        )
        relay_task = asyncio.create_task(relay.run(engine.stopping))
        run = asyncio.create_task(engine.run())
        # systemd (Type=notify): READY=1, watchdog pings, STOPPING=1; a no-op elsewhere.
        notifier = Notifier.from_environ(os.environ)
        notify = asyncio.create_task(
            notifier.run(engine.ready, engine.stopping, f"running as {engine.consumer}")
        )
        stack.callback(notify.cancel)
        if ready is not None:
            await asyncio.wait(
                [asyncio.create_task(engine.ready.wait()), run], return_when=asyncio.FIRST_COMPLETED
            )
            ready.set()
        await run
        await relay_task
