"""Events imsys publishes for the main backend on ``<prefix>:backend-events``.

Each entry carries ``type``, a JSON ``payload`` and ``ts`` (epoch ms). The stream is
trimmed by age (default 24 h), never by count, so it cannot grow without bound; the
backend reads it with a consumer group of its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
import structlog
from redis.asyncio import Redis

from imsys.backend_events import check
from imsys.backoff import REDIS_DOWN
from imsys.logging import redact_text
from imsys.streams.keys import Keys

log = structlog.get_logger("imsys.events")

EventType = Literal[
    "otp_sent",
    "otp_failed",
    "notification_sent",
    "notification_failed",
    "notification_delivered",
    "notification_fallback",
    "channel_out_of_credit",
    "service_status",
    "subscriber_synced",
    "subscriber_sync_failed",
    "router_online",
    "router_offline",
    "router_guard_tripped",
    # The seed's names (seeds/002): `email-sent` mirrors otp_sent / notification_sent of
    # an e-mail; `whatsapp-connected` / `-disconnected` follow the Cloud API token.
    "email-sent",
    "whatsapp-connected",
    "whatsapp-disconnected",
]


def seed_alias(type_: str, payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The seed's ``email-sent`` for an e-mail ``otp_sent`` / ``notification_sent``
    (published besides it, so backends written to either name get it), else None."""
    if type_ not in ("otp_sent", "notification_sent") or payload.get("channel") != "email":
        return None
    ident = payload.get("notification_id", payload.get("entry_id"))
    return {
        "of": type_,
        "id": None if ident is None else str(ident),
        "provider_message_id": payload.get("provider_message_id"),
    }


def off_contract(type_: str, payload: Mapping[str, Any]) -> bool:
    """Log a payload that is not what `imsys.backend_events` declares (published anyway:
    the backend may still use it, and the job's work is done)."""
    problem = check(type_, payload)
    if problem is not None:
        log.error("backend_event_off_contract", type=type_, problem=problem)
    return problem is not None


class EventPublisher:
    def __init__(self, redis: Redis, keys: Keys, *, retention_hours: float = 24.0) -> None:
        self.redis = redis
        self.key = keys.backend_events
        self.retention_ms = int(retention_hours * 3_600_000)

    def _add(self, client: Any, type_: EventType, payload: Mapping[str, Any], now: int) -> Any:
        """XADD one event on ``client`` (the connection, or a pipeline)."""
        off_contract(type_, payload)
        return client.xadd(
            self.key,
            {"type": type_, "payload": orjson.dumps(payload).decode(), "ts": str(now)},
            minid=str(now - self.retention_ms),
            # Exact: "~" only drops whole radix-tree nodes (~100 entries), so a quiet
            # stream would keep day-old events forever. Cutting the head is cheap.
            approximate=False,
        )

    async def publish(self, type_: EventType, payload: Mapping[str, Any]) -> str | None:
        """Add one event; a Redis outage loses the event (logged), never the job."""
        try:
            entry_id = await self._add(self.redis, type_, payload, int(time.time() * 1000))
        except REDIS_DOWN as exc:
            log.warning("backend_event_lost", type=type_, error=redact_text(str(exc)))
            return None
        alias = seed_alias(type_, payload)
        if alias is not None:
            await self.publish("email-sent", alias)
        return str(entry_id)

    async def publish_many(self, events: Sequence[tuple[EventType, Mapping[str, Any]]]) -> int:
        """Add several events (and their seed aliases) in one round trip; how many were
        added. A Redis outage loses them (logged), never the jobs."""
        if not events:
            return 0
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        added = 0
        for type_, payload in events:
            self._add(pipe, type_, payload, now)
            alias = seed_alias(type_, payload)
            if alias is not None:
                self._add(pipe, "email-sent", alias, now)
            added += 1 + (alias is not None)
        try:
            await pipe.execute()
        except REDIS_DOWN as exc:
            log.warning("backend_events_lost", count=added, error=redact_text(str(exc)))
            return 0
        return added
