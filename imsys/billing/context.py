"""What the billing domain's handlers and timers share, built once from `Deps`."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from imsys.deps import Deps
from imsys.events.channels import ChannelControl, fair_share
from imsys.providers.accounts import Accounts
from imsys.publisher import EventPublisher
from imsys.settings import BillingSettings, MessagingSettings
from imsys.streams.fair import FairShare
from imsys.streams.producer import Producer


@dataclass(frozen=True, slots=True)
class BillingContext:
    db: asyncpg.Pool
    cfg: BillingSettings
    producer: Producer
    events: EventPublisher
    # Messages per second per channel and account, across every process, shared
    # fairly between tenants (imsys/streams/fair.py).
    fair: FairShare
    # The events domain's channel switch: a stopped channel holds its messages.
    channels: ChannelControl
    # The global provider account and each tenant's own.
    accounts: Accounts
    messaging: MessagingSettings

    @classmethod
    def from_deps(cls, deps: Deps) -> BillingContext:
        return cls(
            db=deps.db,
            cfg=deps.settings.billing,
            producer=deps.engine.producer,
            events=deps.events,
            fair=fair_share(deps),
            channels=ChannelControl.from_deps(deps),
            accounts=build_accounts(deps),
            messaging=deps.settings.messaging,
        )


def build_accounts(deps: Deps) -> Accounts:
    st = deps.settings
    return Accounts(deps.http, st.sms, st.whatsapp, st.smtp, st.messaging.accounts)
