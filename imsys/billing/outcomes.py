"""What follows a message's new status: its SMS fallback, the combined failure, events.

Called with a row `ledger` moved (a receipt, or a failure at send time), inside the
caller's transaction where there is one, so a crash leaves the receipt unrecorded and
the provider's retry does it all again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from imsys.billing import ledger

if TYPE_CHECKING:
    from imsys.db import Executor
    from imsys.publisher import EventPublisher
    from imsys.streams.job import JobSpec

log = structlog.get_logger("imsys.billing")


async def after_status(
    db: Executor, events: EventPublisher, row: Any, error: str | None, notify: JobSpec[Any]
) -> int:
    """Queue the fallback a failed WhatsApp message may have; returns how many (0 or 1)."""
    nid, status = row["id"], row["status"]
    if status in ("delivered", "read"):
        await events.publish(
            "notification_delivered",
            {"notification_id": nid, "channel": row["channel"], "status": status},
        )
        return 0
    if status != "failed":
        return 0
    queued = 0
    if row["channel"] == "whatsapp":
        queued = len(await ledger.queue_fallback(db, [nid], notify))
    elif row["fallback_of"] is not None:
        await ledger.note_failure(db, nid)
    payload: dict[str, Any] = {
        "notification_id": nid,
        "channel": row["channel"],
        "template": row["template"],
        "error": error or "failed",
    }
    if queued:
        await events.publish("notification_fallback", {**payload, "fallback": "sms"})
    else:
        await events.publish("notification_failed", payload)
    log.info("notification_failed", notification_id=nid, channel=row["channel"],
             fallback=bool(queued), error=error)
    return queued
