"""``resend_notification``: give a failed message another go (an operator's "send again").

The message goes back to ``queued`` (its error cleared, its attempts kept for the record)
and its ``send_notification`` job is queued in the same transaction, through the outbox.
Only a ``failed`` message is touched: one still queued or already sent is left alone, so
running the job twice, or for the wrong message, sends nothing twice.
"""

from __future__ import annotations

import structlog
from pydantic import BaseModel

from imsys import outbox
from imsys.billing.context import BillingContext
from imsys.billing.notify import SEND_NOTIFICATION, notification_job_id
from imsys.errors import PermanentError
from imsys.streams.job import Job, JobSpec

log = structlog.get_logger("imsys.billing")


class ResendNotification(BaseModel):
    notification_id: int


RESEND_NOTIFICATION = JobSpec("billing", "resend_notification", ResendNotification)


async def resend_notification(ctx: BillingContext, job: Job[ResendNotification]) -> None:
    nid = job.payload.notification_id
    async with ctx.db.acquire() as conn, conn.transaction():
        status = await conn.fetchval(
            "SELECT status FROM notifications WHERE id = $1 FOR UPDATE", nid
        )
        if status is None:
            raise PermanentError(f"notification {nid} does not exist")
        if status != "failed":
            log.info("notification_not_resent", notification_id=nid, status=status)
            return
        # With the row locked: a stale delivery re-queues nothing (FencedOut).
        await job.ensure_current()
        await conn.execute(
            "UPDATE notifications SET status = 'queued', error = NULL, sending_at = NULL,"
            " sending_by = NULL WHERE id = $1",
            nid,
        )
        await outbox.add(
            conn, SEND_NOTIFICATION, {"notification_id": nid}, job_id=notification_job_id(nid)
        )
    log.info("notification_resent", notification_id=nid)
