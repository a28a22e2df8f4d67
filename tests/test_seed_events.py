"""The seed's backend-event names (seed 002): ``email-sent`` besides imsys's own
``otp_sent`` / ``notification_sent`` for an e-mail, and ``whatsapp-connected`` /
``whatsapp-disconnected`` following the Cloud API token (401 from Meta). Real Redis and
PostgreSQL, the events stream run by the engine, the gateway simulator and an SMTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from imsys.publisher import EventPublisher
from imsys.settings import Settings
from imsys.streams.keys import Keys
from tests.events_support import EMAIL, PHONE, EventsStack, events_stack, otp_payload


@pytest.fixture
async def stack(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[EventsStack]:
    async with events_stack(settings, redis, db) as s:
        yield s


async def test_email_otp_publishes_email_sent_too(stack: EventsStack) -> None:
    """An e-mail OTP sent publishes otp_sent and the seed's email-sent naming it; a
    WhatsApp OTP publishes no email-sent."""
    entry = await stack.enqueue("email_otp", otp_payload(recipient=EMAIL))
    await stack.settle(lambda: bool(stack.mail.messages))
    await stack.settle(lambda: True)
    [sent] = await stack.events("otp_sent")
    [email] = await stack.events("email-sent")
    assert email["payload"] == {
        "of": "otp_sent",
        "id": entry,
        "provider_message_id": sent["payload"]["provider_message_id"],
    }
    assert sent["payload"]["entry_id"] == entry
    await stack.enqueue("whatsapp_otp", otp_payload(recipient=PHONE))
    await stack.settle(lambda: len(stack.gateway.messages("whatsapp")) == 1)
    await stack.settle(lambda: True)
    assert len(await stack.events("otp_sent")) == 2
    assert len(await stack.events("email-sent")) == 1


async def test_email_notification_publishes_email_sent(redis: Redis, prefix: str) -> None:
    """notification_sent of an e-mail brings email-sent with the notification id; of an
    SMS, none (the publisher's one place for the seed's alias)."""
    events = EventPublisher(redis, Keys(prefix))
    await events.publish("notification_sent", {
        "notification_id": 41, "channel": "sms", "template": "invoice",
        "provider_message_id": "m1"})
    await events.publish("notification_sent", {
        "notification_id": 42, "channel": "email", "template": "invoice",
        "provider_message_id": "m2"})
    entries = await redis.xrange(Keys(prefix).backend_events)
    assert [f["type"] for _, f in entries] == ["notification_sent", "notification_sent",
                                              "email-sent"]
    alias = '{"of":"notification_sent","id":"42","provider_message_id":"m2"}'
    assert entries[2][1]["payload"] == alias


async def test_events_published_together_bring_their_alias_too(redis: Redis, prefix: str) -> None:
    """publish_many (one pipeline) gives each e-mail notification its email-sent, as
    publish does, and none to other events."""
    events = EventPublisher(redis, Keys(prefix))
    added = await events.publish_many([
        ("subscriber_synced", {"subscriber_id": 1, "router_id": 1, "changed": [],
                               "kicked": False}),
        ("notification_sent", {"notification_id": 43, "channel": "email",
                               "template": "invoice", "provider_message_id": "m3"}),
    ])
    entries = await redis.xrange(Keys(prefix).backend_events)
    assert added == 3
    assert [f["type"] for _, f in entries] == ["subscriber_synced", "notification_sent",
                                              "email-sent"]
    alias = '{"of":"notification_sent","id":"43","provider_message_id":"m3"}'
    assert entries[2][1]["payload"] == alias


async def test_whatsapp_token_changes_publish_connected_and_disconnected(
    stack: EventsStack,
) -> None:
    """The first WhatsApp answer that takes the token publishes whatsapp-connected; a 401
    (the token revoked at Meta) whatsapp-disconnected, once however many sends fail; the
    token valid again, whatsapp-connected again. Never whatsapp-qr."""
    await stack.enqueue("whatsapp_otp", otp_payload(recipient=PHONE))
    await stack.settle(lambda: len(stack.gateway.messages("whatsapp")) == 1)
    await stack.settle(lambda: True)
    assert [e["type"] for e in await stack.events() if e["type"].startswith("whatsapp")] == [
        "whatsapp-connected"
    ]
    good = stack.gateway.whatsapp_token
    stack.gateway.whatsapp_token = "rotated-at-meta"
    for n in range(2):
        await stack.enqueue("whatsapp_otp", otp_payload(recipient=PHONE, otp=f"99887{n}"))

    async def both_dead() -> bool:
        return len(await stack.dead()) == 2

    await stack.settle(both_dead)
    [down] = await stack.events("whatsapp-disconnected")
    assert down["payload"]["phone_number_id"] == "100000000000001"
    assert "401" in down["payload"]["error"]
    assert good not in down["payload"]["error"]
    assert "rotated-at-meta" not in down["payload"]["error"]
    stack.gateway.whatsapp_token = good
    await stack.enqueue("whatsapp_otp", otp_payload(recipient=PHONE, otp="123123"))
    await stack.settle(lambda: len(stack.gateway.messages("whatsapp")) == 2)
    await stack.settle(lambda: True)
    kinds = [e["type"] for e in await stack.events() if e["type"].startswith("whatsapp")]
    assert kinds == ["whatsapp-connected", "whatsapp-disconnected", "whatsapp-connected"]
