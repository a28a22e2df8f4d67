"""The backend-events stream: every kind the issue lists appears with type, JSON payload
and ts; it is trimmed by age; the backend reads it with a consumer group of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import get_args

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from imsys.publisher import EventPublisher, EventType
from imsys.settings import Settings
from imsys.streams.job import now_ms
from imsys.streams.keys import Keys
from tests.events_support import EMAIL, EventsStack, backend_events, events_stack, otp_payload
from tests.sync_support import Stack

SECRET = "/ppp/secret"
HOUR_MS = 3_600_000


async def drive_sync(stack: Stack) -> tuple[int, int]:
    """One subscriber synced, one refused (an unmanaged twin), then the router goes away.

    Returns the ids of the synced subscriber and of the refused one."""
    synced = await stack.add_subscriber("wanjiru")
    await stack.settle()
    stack.sim.add_item(SECRET, name="henry", password="hand", profile="default")
    twin = await stack.add_subscriber("henry")
    await stack.relay.relay_once()
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    await stack.sim.go_down()
    await stack.add_subscriber("otieno")
    await stack.relay.relay_once()
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    return synced, twin


@pytest.fixture
async def ev(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[EventsStack]:
    async with events_stack(settings, redis, db) as stack:
        yield stack


async def test_sync_publishes_its_events(stack: Stack) -> None:
    """A sync driven through the stack publishes router_online, subscriber_synced,
    subscriber_sync_failed and router_offline, each with type, JSON payload and ts."""
    key = stack.engine.keys.backend_events
    assert stack.engine.registry.get("events", "whatsapp_otp") is not None  # app wiring
    sid, twin = await drive_sync(stack)
    events = await backend_events(stack.deps.redis, key)
    by_type = {e["type"]: e for e in events}
    assert [e["type"] for e in events] == [
        "router_online",
        "subscriber_synced",
        "subscriber_sync_failed",
        "router_offline",
    ]
    assert by_type["router_online"]["payload"] == {"router_id": stack.router_id}
    synced = by_type["subscriber_synced"]["payload"]
    assert (synced["subscriber_id"], synced["router_id"]) == (sid, stack.router_id)
    assert synced["changed"]
    failed = by_type["subscriber_sync_failed"]["payload"]
    assert failed["subscriber_id"] == twin
    assert "does not manage" in failed["error"]
    assert by_type["router_offline"]["payload"]["router_id"] == stack.router_id
    for e in events:
        assert now_ms() - 60_000 < e["ts"] <= now_ms()


async def test_every_kind_appears_on_the_stream(ev: EventsStack, stack: Stack) -> None:
    """OTP, service, notification (sent, delivered, fallback, out of credit), guard and
    the seed's e-mail / WhatsApp-token events join the sync ones: every kind of EventType
    appears."""
    await drive_sync(stack)
    await ev.enqueue("whatsapp_otp", otp_payload())
    await ev.enqueue("email_otp", otp_payload(recipient=EMAIL, expires_at=now_ms() - 1))
    await ev.enqueue("service_control", {"action": "status", "service": "sms"})
    await ev.step()
    # The seed's names: email-sent with an e-mail sent; whatsapp-disconnected when Meta
    # refuses the token (whatsapp-connected came with the first WhatsApp answer).
    await ev.enqueue("email_otp", otp_payload(recipient=EMAIL))
    await ev.settle(lambda: bool(ev.mail.messages))
    good, ev.gateway.whatsapp_token = ev.gateway.whatsapp_token, "revoked"

    async def refused() -> bool:
        return bool(await ev.events("whatsapp-disconnected"))

    await ev.enqueue("whatsapp_otp", otp_payload(otp="246810"))
    await ev.settle(refused)
    ev.gateway.whatsapp_token = good
    # Billing publishes these two; their shape is the publisher's.
    await ev.deps.events.publish(
        "notification_sent",
        {"notification_id": 7, "channel": "sms", "template": "invoice", "provider_message_id": "x"},
    )
    await ev.deps.events.publish(
        "notification_failed",
        {"notification_id": 8, "channel": "email", "template": "reminder", "error": "550"},
    )
    # Receipts, fallback and an empty balance publish these (tests/test_messaging.py
    # drives each from the gateway simulator); here, their place on the stream.
    await ev.deps.events.publish(
        "notification_delivered", {"notification_id": 7, "channel": "sms", "status": "delivered"}
    )
    await ev.deps.events.publish(
        "notification_fallback",
        {"notification_id": 9, "channel": "whatsapp", "template": "reminder",
         "error": "131047", "fallback": "sms"},
    )
    await ev.deps.events.publish(
        "channel_out_of_credit",
        {"channel": "sms", "tenant_id": stack.tenant_id, "account": None,
         "error": "InsufficientBalance"},
    )
    # Sync publishes this when its guard holds disconnections (tests/test_guard.py trips it).
    await ev.deps.events.publish(
        "router_guard_tripped",
        {"router_id": stack.router_id, "tenant_id": stack.tenant_id, "cause": "sweep",
         "reason": "would cut off 6 of 8", "would_disconnect": 6, "subscribers": 8},
    )
    events = await ev.events()
    assert {e["type"] for e in events} == set(get_args(EventType))
    assert all(isinstance(e["payload"], dict) for e in events)
    [note] = [e for e in events if e["type"] == "notification_sent"]
    assert note["payload"] == {
        "notification_id": 7,
        "channel": "sms",
        "template": "invoice",
        "provider_message_id": "x",
    }


async def test_old_entries_are_trimmed_by_age(redis: Redis, prefix: str) -> None:
    """Entries older than the retention go when the next event is published."""
    keys = Keys(prefix)
    now = now_ms()
    for type_, age_h in (("x", 25), ("y", 23)):
        fields = {"type": type_, "payload": "{}", "ts": str(now - age_h * HOUR_MS)}
        await redis.xadd(keys.backend_events, fields, id=f"{now - age_h * HOUR_MS}-0")
    default = EventPublisher(redis, keys)
    await default.publish("service_status", {"service": "sms"})
    assert [f["type"] for _, f in await redis.xrange(keys.backend_events)] == [
        "y",
        "service_status",
    ]
    tiny = EventPublisher(redis, keys, retention_hours=1 / 3600)  # one second
    await tiny.publish("service_status", {"service": "email"})
    entries = await redis.xrange(keys.backend_events)
    assert [orjson.loads(f["payload"]) for _, f in entries] == [
        {"service": "sms"},
        {"service": "email"},
    ]


async def test_backend_reads_with_its_own_consumer_group(redis: Redis, prefix: str) -> None:
    """XGROUP CREATE backend + XREADGROUP: the backend reads each event once and acks it."""
    keys = Keys(prefix)
    publisher = EventPublisher(redis, keys)
    await redis.xgroup_create(keys.backend_events, "backend", id="0", mkstream=True)
    first = await publisher.publish("otp_sent", {"channel": "whatsapp", "recipient": "+2547"})
    second = await publisher.publish("service_status", {"service": "sms", "state": "running"})
    reply = await redis.xreadgroup("backend", "api-1", {keys.backend_events: ">"}, count=10)
    [(_, entries)] = reply
    assert [eid for eid, _ in entries] == [first, second]
    assert entries[0][1]["type"] == "otp_sent"
    assert orjson.loads(entries[1][1]["payload"]) == {"service": "sms", "state": "running"}
    assert await redis.xack(keys.backend_events, "backend", first, second) == 2
    again = await redis.xreadgroup("backend", "api-2", {keys.backend_events: ">"}, count=10)
    assert again == []


async def test_redis_outage_loses_the_event_not_the_caller() -> None:
    """With Redis away, publish returns None instead of failing the job that called it."""
    down = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        publisher = EventPublisher(down, Keys("nowhere"))
        assert await publisher.publish("otp_sent", {"channel": "email"}) is None
    finally:
        await down.aclose()
