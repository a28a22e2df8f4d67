"""The WhatsApp Cloud API's "session" as the seed's backend events name it.

The seed's worker ran a WhatsApp Web session (a QR code to scan, then connected until
logged out): ``whatsapp-qr``, ``whatsapp-connected``, ``whatsapp-disconnected``. The Cloud
API has no session and no QR code; what can come and go is its access token. So imsys
publishes ``whatsapp-disconnected`` when Meta refuses the token (HTTP 401: expired,
revoked) and ``whatsapp-connected`` when it takes it again (or for the first time), once
per change across every process: the state lives in Redis, and ``SET ... GET`` tells
exactly one caller that it changed. ``whatsapp-qr`` is never published.
"""

from __future__ import annotations

import structlog
from redis.asyncio import Redis

from imsys.backoff import REDIS_DOWN
from imsys.logging import redact_text
from imsys.publisher import EventPublisher
from imsys.streams.keys import Keys

log = structlog.get_logger("imsys.events")


class TokenWatch:
    """``WhatsAppClient.on_token`` for one business number: publishes the changes."""

    def __init__(
        self, redis: Redis, keys: Keys, events: EventPublisher, phone_number_id: str
    ) -> None:
        self.redis = redis
        self.events = events
        self.phone_number_id = phone_number_id
        self.key = f"{keys.prefix}:whatsapp:{phone_number_id}:token"

    async def __call__(self, valid: bool, error: str | None) -> None:
        state = "valid" if valid else "invalid"
        try:
            before = await self.redis.set(self.key, state, get=True)
        except REDIS_DOWN as exc:
            # The message's own outcome matters more than this event: never fail a send.
            log.warning("whatsapp_token_state_lost", error=redact_text(str(exc)))
            return
        if before == state:
            return
        if valid:
            log.info("whatsapp_connected", phone_number_id=self.phone_number_id)
            await self.events.publish(
                "whatsapp-connected", {"phone_number_id": self.phone_number_id}
            )
        else:
            log.warning("whatsapp_disconnected", phone_number_id=self.phone_number_id,
                        error=error)
            await self.events.publish(
                "whatsapp-disconnected",
                {"phone_number_id": self.phone_number_id, "error": error or "token refused"},
            )
