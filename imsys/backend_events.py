"""The payload of every backend event, declared once: the contract of
``<prefix>:backend-events`` (`imsys.publisher`).

Each kind has a pydantic model here, in `EVENTS`. The publisher checks every payload
against its model before it adds the entry (`check`): a payload that left the contract
is logged as ``backend_event_off_contract`` and still published (an event is never
dropped for it). ``python -m imsys schema`` prints these models as JSON Schema, and
``tests/test_contract.py`` holds them to `imsys.publisher.EventType`, to every
``events.publish(...)`` call in the code and to the README's table.

Adding an event: its model and one `EVENTS` line here, its name in ``EventType``, a row
in README's backend-events table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict

from imsys.validation import describe


class Payload(BaseModel):
    """Every key the code sends is declared: a new one must be added here."""

    model_config = ConfigDict(extra="forbid")


class OtpIdentity(Payload):
    """What lets the backend match an OTP event to its request; never the code."""

    channel: Literal["whatsapp", "email"]
    recipient: str
    user_name: str
    job_id: str | None
    entry_id: str
    attempt: int
    expires_at: int


class OtpSent(OtpIdentity):
    provider_message_id: str | None
    sent_at: int
    delivered_in_ms: int | None


class OtpFailed(OtpIdentity):
    reason: Literal["expired", "rejected", "attempts_exhausted"]
    error: str


class NotificationSent(Payload):
    notification_id: int
    channel: str
    template: str
    provider_message_id: str | None


class NotificationFailed(Payload):
    notification_id: int
    channel: str
    template: str
    error: str


class NotificationDelivered(Payload):
    notification_id: int
    channel: str
    status: Literal["delivered", "read"]


class NotificationFallback(Payload):
    notification_id: int
    channel: str
    template: str
    error: str
    fallback: Literal["sms"]


class ChannelOutOfCredit(Payload):
    channel: Literal["sms", "whatsapp", "email"]
    tenant_id: int | None
    account: str | None
    error: str


class ServiceStatus(Payload):
    service: Literal["sms", "whatsapp", "email"]
    state: Literal["running", "stopped"]
    since: int | None
    by: str | None
    changed: bool
    action: Literal["start", "stop", "restart", "status"]
    job_id: str | None
    # Tenants the channel is stopped for, out of credit: {tenant_id, since, reason}.
    out_of_credit: list[dict[str, Any]] = []


class SubscriberSynced(Payload):
    subscriber_id: int
    router_id: int
    changed: list[str]
    kicked: bool


class SubscriberSyncFailed(Payload):
    subscriber_id: int
    router_id: int
    error: str
    attempt: int
    # retrying: another attempt comes at next_attempt_at; error: none will (dead-lettered,
    # a permanent failure, or blocked). Absent on events from before these states.
    status: Literal["retrying", "error"] | None = None
    next_attempt_at: str | None = None
    # Only when an unmanaged entry holds the name (the subscriber is blocked).
    blocked_by: dict[str, str] | None = None
    remedy: str | None = None


class RouterOnline(Payload):
    router_id: int


class RouterOffline(Payload):
    router_id: int
    error: str


class RouterGuardTripped(Payload):
    router_id: int
    tenant_id: int
    cause: Literal["reconciliation", "sweep"]
    reason: str
    would_disconnect: int
    subscribers: int


class EmailSent(Payload):
    """The seed's name for an e-mail that went out: which imsys event it mirrors and
    that event's id (the OTP job's entry id, or the notification id)."""

    of: Literal["otp_sent", "notification_sent"]
    id: str | None
    provider_message_id: str | None


class WhatsAppConnected(Payload):
    phone_number_id: str


class WhatsAppDisconnected(Payload):
    phone_number_id: str
    error: str


@dataclass(frozen=True, slots=True)
class EventSpec:
    name: str  # the entry's ``type`` field
    model: type[BaseModel]
    when: str  # when imsys publishes it (the schema's description)


EVENTS: dict[str, EventSpec] = {
    e.name: e
    for e in (
        EventSpec("otp_sent", OtpSent, "a one-time password reached its provider"),
        EventSpec("otp_failed", OtpFailed, "a one-time password was not sent, for good"),
        EventSpec("notification_sent", NotificationSent, "the provider accepted a message"),
        EventSpec("notification_failed", NotificationFailed, "a message failed for good"),
        EventSpec(
            "notification_delivered",
            NotificationDelivered,
            "a receipt says a message was delivered or read",
        ),
        EventSpec(
            "notification_fallback",
            NotificationFallback,
            "a WhatsApp message failed and goes again by SMS",
        ),
        EventSpec(
            "channel_out_of_credit",
            ChannelOutOfCredit,
            "a provider said a tenant's account has no credit: the channel stops for it",
        ),
        EventSpec("service_status", ServiceStatus, "a service_control job ran"),
        EventSpec("subscriber_synced", SubscriberSynced, "a subscriber's router entry matches"),
        EventSpec(
            "subscriber_sync_failed",
            SubscriberSyncFailed,
            "a sync attempt failed, or an unmanaged entry blocks the subscriber",
        ),
        EventSpec("router_online", RouterOnline, "a router answers again"),
        EventSpec("router_offline", RouterOffline, "a router stopped answering"),
        EventSpec(
            "router_guard_tripped",
            RouterGuardTripped,
            "the mass-disconnect guard holds a router's disconnections",
        ),
        EventSpec(
            "email-sent",
            EmailSent,
            "an e-mail went out (the seed's name; besides otp_sent / notification_sent)",
        ),
        EventSpec(
            "whatsapp-connected",
            WhatsAppConnected,
            "Meta takes the WhatsApp Cloud API token again (or for the first time)",
        ),
        EventSpec(
            "whatsapp-disconnected",
            WhatsAppDisconnected,
            "Meta refused the WhatsApp Cloud API token (401): messages fail until fixed",
        ),
    )
}


def check(type_: str, payload: Mapping[str, Any]) -> str | None:
    """Why ``payload`` is not what `EVENTS` declares for ``type_``, or None when it is."""
    spec = EVENTS.get(type_)
    if spec is None:
        return f"no payload model declared for {type_!r} (imsys.backend_events.EVENTS)"
    try:
        spec.model.model_validate(payload)
    except pydantic.ValidationError as exc:
        return describe(exc, whole="payload")
    return None
