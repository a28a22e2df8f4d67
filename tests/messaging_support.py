"""A billing stack whose providers are gateway simulators that call back a real webhook
server: receipts, inbound messages, templates and balances as the vendors have them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import SecretStr
from redis.asyncio import Redis

from imsys.http import api_webhooks
from imsys.http.server import build_app
from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from tests.sync_support import Stack, make_stack
from tests.test_billing import BillingStack

APP_SECRET = "meta-app-secret"
VERIFY_TOKEN = "meta-verify-token"
AT_TOKEN = "at-hook-token"


def point_at(settings: Settings, gateway: GatewaySimulator) -> Settings:
    return settings.model_copy(
        update={
            "sms": settings.sms.model_copy(
                update={
                    "url": f"{gateway.url}/version1/messaging",
                    "timeout": 3.0,
                    "webhook_token": SecretStr(AT_TOKEN),
                }
            ),
            "whatsapp": settings.whatsapp.model_copy(
                update={
                    "base_url": f"{gateway.url}/v21.0",
                    "timeout": 3.0,
                    "app_secret": SecretStr(APP_SECRET),
                    "verify_token": SecretStr(VERIFY_TOKEN),
                }
            ),
            "billing": settings.billing.model_copy(
                update={
                    "send_rate_per_s": {"sms": 2000.0, "whatsapp": 2000.0, "email": 2000.0},
                    "phone_channel": "whatsapp",
                }
            ),
            "events": settings.events.model_copy(update={"channel_hold_s": 0.1}),
            "streams": {
                **settings.streams,
                "billing": settings.streams["billing"].model_copy(
                    update={"backoff_base": 0.05, "concurrency": 50}
                ),
            },
        }
    )


class MessagingStack(BillingStack):
    def __init__(self, stack: Stack, gateway: GatewaySimulator, url: str) -> None:
        super().__init__(stack, gateway)
        self.url = url

    async def quiet(self, timeout: float = 120.0) -> None:
        """Send everything, let every receipt arrive, send what receipts queued; repeat."""
        async with asyncio.timeout(timeout):
            for _ in range(5):
                await self.settle(timeout=timeout)
                await self.gateway.callbacks.idle()
            await self.settle(timeout=timeout)

    async def run_until(self, done: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
        """Relay, promote and run billing jobs until ``done()`` (for held work, which
        never settles)."""
        s = self.stack
        async with asyncio.timeout(timeout):
            while not await done():
                await s.relay.relay_once()
                await s.engine.promote_once()
                ran = await s.engine.consumers["billing"].process_once(block_ms=5)
                if not ran:
                    await asyncio.sleep(0.02)

    async def notify(self, n: int, *, channel: str, start: int = 0,
                     tenant_id: int | None = None, template: str = "reminder") -> list[int]:
        """``n`` queued messages with their jobs through the outbox, as billing makes them."""
        tid = tenant_id or self.stack.tenant_id
        rows = await self.stack.db.fetch(
            """
            WITH note AS (
                INSERT INTO notifications (tenant_id, channel, recipient, template, body,
                                           dedupe_key, vars)
                SELECT $1::bigint, $2, '+2547' || lpad(i::text, 8, '0'), $5, 'Hi c' || i,
                       'test:' || $1::bigint || ':' || $2 || ':' || i,
                       jsonb_build_object('name', 'c' || i, 'package', 'basic',
                                          'expires_at', '2030-01-01 00:00', 'days', '1')
                FROM generate_series($3::int, $3::int + $4::int - 1) AS i
                RETURNING id
            ), q AS (
                INSERT INTO outbox (stream, type, payload, job_id)
                SELECT 'billing', 'send_notification', jsonb_build_object('notification_id', id),
                       'send_notification:' || id FROM note RETURNING 1
            )
            SELECT id FROM note ORDER BY id
            """,
            tid, channel, start, n, template,
        )
        return [r["id"] for r in rows]

    async def dead(self) -> list[Any]:
        return await self.stack.engine.dead_letters.list()

    async def ledger(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        rows = await self.stack.db.fetch(
            "SELECT id, status, status_code, status_at, error, provider_message_id, sent_as,"
            " fallback_id, fallback_of, channel FROM notifications WHERE id = ANY($1::bigint[])",
            ids,
        )
        return {r["id"]: dict(r) for r in rows}


async def open_stack(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str,
    gateway: GatewaySimulator, *, port: int = 0, repoint: bool = True,
) -> tuple[MessagingStack, Any, Any, web.AppRunner]:
    if repoint:
        settings = point_at(settings, gateway)
    stack, http, pool = await make_stack(settings, redis, db, prefix)
    app = build_app(stack.engine, stack.deps.redis, stack.db, "test-token")
    api_webhooks.add_routes(app, stack.deps)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    gateway.receipts.whatsapp_url = f"{url}/webhooks/whatsapp"
    gateway.receipts.app_secret = APP_SECRET
    gateway.receipts.africastalking_url = f"{url}/webhooks/africastalking?token={AT_TOKEN}"
    gateway.receipts.delay = 0.01
    return MessagingStack(stack, gateway, url), http, pool, runner
