"""The events domain in the test's process: real Redis and PostgreSQL, the engine, the
gateway simulator for WhatsApp and a real aiosmtpd server for e-mail. Stepped exactly."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiosmtpd.controller import Controller
from redis.asyncio import Redis

from imsys.deps import Deps
from imsys.events import domain as events_domain
from imsys.events.channels import ChannelControl
from imsys.provider_settings import SmtpConfig, WhatsAppConfig
from imsys.publisher import EventPublisher
from imsys.settings import EventsSettings, Settings
from imsys.sim.gateway import GatewaySimulator
from imsys.streams.deadletters import DeadLetter
from imsys.streams.engine import Engine
from imsys.streams.job import Registry, now_ms

CODE = "480913"
PHONE = "+254700000123"
EMAIL = "ann@example.com"


def otp_payload(**overrides: Any) -> dict[str, Any]:
    """A valid OTP payload (WhatsApp recipient), valid for five minutes."""
    return {
        "recipient": PHONE,
        "otp": CODE,
        "user_name": "Ann Wanjiru",
        "expires_at": now_ms() + 300_000,
        **overrides,
    }


@dataclass
class MailRecorder:
    """An aiosmtpd handler keeping every accepted message."""

    messages: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    # Set to answer DATA with this reply instead of accepting (e.g. "451 ...").
    data_reply: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply is not None:
            return self.data_reply
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EventsStack:
    deps: Deps
    gateway: GatewaySimulator
    mail: MailRecorder
    channels: ChannelControl

    @property
    def engine(self) -> Engine:
        return self.deps.engine

    @property
    def redis(self) -> Redis:
        return self.deps.redis

    async def enqueue(self, type_: str, payload: dict[str, Any] | str, **kw: Any) -> str:
        entry_id = (await self.engine.producer.enqueue("events", type_, payload, **kw)).entry_id
        assert entry_id is not None
        return entry_id

    async def step(self) -> int:
        """Promote due retries, then run one batch of the events stream to the end."""
        await self.engine.promote_once()
        return await self.engine.consumers["events"].process_once(block_ms=5)

    async def settle(
        self, until: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0
    ) -> None:
        """Step until ``until()`` holds (retries are due only after their backoff)."""
        deadline = time.monotonic() + timeout
        while True:
            done = until()
            if done if isinstance(done, bool) else await done:
                return
            if time.monotonic() > deadline:
                raise AssertionError("events work did not settle in time")
            if not await self.step():
                await asyncio.sleep(0.02)

    async def waiting(self) -> list[dict[str, str]]:
        """Fields of the events jobs waiting in the stream or the delayed store."""
        keys = self.engine.keys
        out = [f for _, f in await self.redis.xrange(keys.stream("events"))]
        for member in await self.redis.zrange(keys.delayed("events"), 0, -1):
            flat = orjson.loads(member)["f"]
            out.append(dict(zip(flat[::2], flat[1::2], strict=True)))
        return out

    async def dead(self) -> list[DeadLetter]:
        return await self.engine.dead_letters.list(stream="events")

    async def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        return await backend_events(self.redis, self.engine.keys.backend_events, type_)


async def backend_events(redis: Redis, key: str, type_: str | None = None) -> list[dict[str, Any]]:
    """Entries of the backend-events stream, oldest first, with the payload decoded."""
    out = []
    for entry_id, fields in await redis.xrange(key):
        assert set(fields) == {"type", "payload", "ts"}, fields
        if type_ is None or fields["type"] == type_:
            out.append(
                {
                    "id": entry_id,
                    "type": fields["type"],
                    "ts": int(fields["ts"]),
                    "payload": orjson.loads(fields["payload"]),
                }
            )
    return out


def events_settings(
    settings: Settings, gateway_url: str, smtp_port: int, **events: Any
) -> Settings:
    """The test's settings with WhatsApp on the simulator and SMTP on aiosmtpd."""
    return settings.model_copy(
        update={
            "whatsapp": WhatsAppConfig(
                base_url=f"{gateway_url}/v21.0", timeout=2.0, connect_timeout=1.0
            ),
            "smtp": SmtpConfig(
                host="127.0.0.1",
                port=smtp_port,
                starttls=False,
                timeout=5.0,
                sender="ISP <otp@isp.example>",
                local_hostname="imsys.test",
            ),
            "events": EventsSettings(**{"channel_hold_s": 0.05, **events}),
        }
    )


@asynccontextmanager
async def events_stack(
    settings: Settings, redis: Redis, db: asyncpg.Pool, *, consumer: str = "ev", **events: Any
) -> AsyncIterator[EventsStack]:
    gateway = GatewaySimulator()
    await gateway.start()
    mail = MailRecorder()
    smtp_port = free_port()
    controller = Controller(mail, hostname="127.0.0.1", port=smtp_port)
    await asyncio.to_thread(controller.start)
    settings = events_settings(settings, gateway.url, smtp_port, **events)
    engine = Engine(redis, settings, Registry(), consumer=f"{settings.redis.prefix}-{consumer}")
    http = aiohttp.ClientSession()
    deps = Deps(
        settings=settings,
        redis=redis,
        db=db,
        engine=engine,
        http=http,
        events=EventPublisher(redis, engine.keys),
    )
    events_domain.register(deps)
    await engine.prepare()
    try:
        yield EventsStack(deps, gateway, mail, ChannelControl.from_deps(deps))
    finally:
        await http.close()
        await deps.closing.aclose()
        await asyncio.to_thread(controller.stop)
        await gateway.stop()
