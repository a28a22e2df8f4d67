"""What the events domain's handlers share, built once from `Deps` at registration."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from imsys.deps import Deps
from imsys.events.channels import ChannelControl, fair_share
from imsys.events.whatsapp_token import TokenWatch
from imsys.providers.email import SmtpClient
from imsys.providers.whatsapp import WhatsAppClient
from imsys.publisher import EventPublisher
from imsys.settings import EventsSettings
from imsys.streams.fair import FairShare
from imsys.streams.keys import Keys


@dataclass(frozen=True, slots=True)
class EventsContext:
    redis: Redis
    keys: Keys
    cfg: EventsSettings
    events: EventPublisher
    channels: ChannelControl
    whatsapp: WhatsAppClient
    smtp: SmtpClient
    # The channels' send rates, which OTPs take ahead of bulk messages.
    fair: FairShare
    send_rate_per_s: dict[str, float]

    @classmethod
    def from_deps(cls, deps: Deps) -> EventsContext:
        whatsapp = WhatsAppClient(deps.http, deps.settings.whatsapp)
        whatsapp.on_token = TokenWatch(
            deps.redis, deps.engine.keys, deps.events, deps.settings.whatsapp.phone_number_id
        )
        return cls(
            redis=deps.redis,
            keys=deps.engine.keys,
            cfg=deps.settings.events,
            events=deps.events,
            channels=ChannelControl.from_deps(deps),
            whatsapp=whatsapp,
            smtp=SmtpClient(deps.settings.smtp),
            fair=fair_share(deps),
            send_rate_per_s=deps.settings.billing.send_rate_per_s,
        )
