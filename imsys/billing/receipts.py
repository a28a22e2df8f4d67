"""Verified webhook contents into the ledger: receipts, and inbound messages' windows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from imsys.billing import ledger, outcomes
from imsys.billing.notify import SEND_NOTIFICATION

if TYPE_CHECKING:
    import asyncpg

    from imsys.billing.ledger import Receipt
    from imsys.billing.webhooks import Inbound
    from imsys.publisher import EventPublisher

log = structlog.get_logger("imsys.billing")


async def take(
    db: asyncpg.Pool,
    events: EventPublisher,
    receipts: Sequence[Receipt],
    inbound: Sequence[Inbound] = (),
) -> dict[str, int]:
    """Apply each receipt in a transaction of its own (receipt stored, status moved,
    fallback queued: all or nothing, so the provider's retry redoes a lost one).

    Returns counts: ``applied`` (a message moved), ``replayed`` (seen before),
    ``unchanged`` (known status, nothing to move, or no such message yet), ``windows``.
    """
    counts: Counter[str] = Counter()
    for item in inbound:
        await ledger.open_window(db, item.phone_number_id, item.wa_id, item.at)
        counts["windows"] += 1
    for receipt in receipts:
        async with db.acquire() as conn, conn.transaction():
            fresh = await ledger.record_receipt(conn, receipt)
            row = await ledger.apply_receipts(conn, receipt.channel, receipt.provider_message_id)
            if row is not None:
                await outcomes.after_status(conn, events, row, receipt.reason, SEND_NOTIFICATION)
        counts["applied" if row is not None else "replayed" if not fresh else "unchanged"] += 1
    if receipts or inbound:
        log.info("receipts_taken", **counts)
    return dict(counts)
