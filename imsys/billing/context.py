"""What the billing domain's handlers and timers share, built once from `Deps`."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from imsys.deps import Deps
from imsys.events import ChannelControl
from imsys.providers.email import SmtpClient
from imsys.providers.sms import SmsClient
from imsys.providers.whatsapp import WhatsAppClient
from imsys.publisher import EventPublisher
from imsys.settings import BillingSettings
from imsys.streams.limits import RateLimiter
from imsys.streams.producer import Producer


@dataclass(frozen=True, slots=True)
class BillingContext:
    db: asyncpg.Pool
    cfg: BillingSettings
    producer: Producer
    events: EventPublisher
    # Messages per second per channel, across every process.
    rates: RateLimiter
    # The events domain's channel switch: a stopped channel holds its messages.
    channels: ChannelControl
    sms: SmsClient
    whatsapp: WhatsAppClient
    smtp: SmtpClient

    @classmethod
    def from_deps(cls, deps: Deps) -> BillingContext:
        return cls(
            db=deps.db,
            cfg=deps.settings.billing,
            producer=deps.engine.producer,
            events=deps.events,
            rates=deps.engine.rates,
            channels=ChannelControl.from_deps(deps),
            sms=SmsClient(deps.http, deps.settings.sms),
            whatsapp=WhatsAppClient(deps.http, deps.settings.whatsapp),
            smtp=SmtpClient(deps.settings.smtp),
        )
