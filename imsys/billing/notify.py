"""``send_notification``: one queued message of the ledger, sent at most once at a time."""

from __future__ import annotations

import re
from typing import Any

import structlog
from pydantic import BaseModel

from imsys.billing import repo
from imsys.billing.context import BillingContext
from imsys.errors import Deferred, PermanentError, RetryableError
from imsys.streams.job import Job, JobSpec

log = structlog.get_logger("imsys.billing")

# A claim on a message older than this belongs to a delivery that died mid-call (well past
# any provider timeout): another delivery may send it.
SENDING_LEASE_S = 120.0


class SendNotification(BaseModel):
    notification_id: int


SEND_NOTIFICATION = JobSpec("billing", "send_notification", SendNotification)


# The bills and reminders SQL (repo.py) builds the same id from the spec's name: a job
# per message, so one still waiting is never doubled by a re-publication (intents.py).
def notification_job_id(notification_id: int) -> str:
    return f"{SEND_NOTIFICATION.name}:{notification_id}"


async def deliver(ctx: BillingContext, note: Any) -> str:
    channel, to, body = note["channel"], note["recipient"], note["body"]
    if channel == "sms":
        return await ctx.sms.send(to, body)
    if channel == "whatsapp":
        return await ctx.whatsapp.send_text(to, body)
    subject = f"{note['tenant_name'] or 'Your service'}: {note['template'].replace('_', ' ')}"
    return await ctx.smtp.send(to, subject, body)


async def send_notification(ctx: BillingContext, job: Job[SendNotification]) -> None:
    """Send one message at most once at a time, and only from the job's current delivery.

    The delivery claims the message (row locked, fence checked, claim written, in one
    transaction) before it calls the provider: a stale delivery raises FencedOut there
    and sends nothing; another delivery finds the claim and waits for its outcome.
    """
    nid = job.payload.notification_id
    note = await repo.notification(ctx.db, nid)
    if note is None:
        raise PermanentError(f"notification {nid} does not exist")
    if note["status"] != "queued":
        return  # sent (or given up) by an earlier delivery of this job
    channel = note["channel"]
    # Stopped channels hold their messages (service_control): Deferred, no attempt.
    await ctx.channels.ensure_running(channel)
    await ctx.rates.acquire(f"notify:{channel}", ctx.cfg.send_rate_per_s.get(channel, 10.0))
    claimant = f"{job.id}:{job.delivery}"
    claim = await repo.claim_sending(
        ctx.db, nid, claimant, lease_s=SENDING_LEASE_S, fence=job.ensure_current
    )
    if claim == "done":
        return
    if claim == "busy":
        raise Deferred(f"notification {nid} is being sent by another delivery", delay=5.0)
    try:
        provider_id = await deliver(ctx, note)
    except (RetryableError, PermanentError) as exc:
        final = isinstance(exc, PermanentError) or job.last_attempt
        # Only the current delivery records the failure (FencedOut otherwise).
        recorded = await repo.mark_attempt_failed(
            ctx.db, nid, str(exc), final=final, claimant=claimant, fence=job.ensure_current
        )
        if final and recorded:
            await ctx.events.publish(
                "notification_failed",
                {
                    "notification_id": nid,
                    "channel": channel,
                    "template": note["template"],
                    "error": str(exc),
                },
            )
        raise
    # Recorded even by a delivery fenced out meanwhile: the provider has the message,
    # and leaving it 'queued' would only get it sent a second time.
    await repo.mark_sent(ctx.db, nid, provider_id)
    await ctx.events.publish(
        "notification_sent",
        {
            "notification_id": nid,
            "channel": channel,
            "template": note["template"],
            "provider_message_id": provider_id,
        },
    )
    log.info(
        "notification_sent",
        notification_id=nid,
        channel=channel,
        template=note["template"],
        to=_mask(note["recipient"]),
    )


def _mask(recipient: str) -> str:
    """Enough of a number or address to find it in the ledger, not enough to misuse."""
    return re.sub(r"(?<=.{4}).(?=.{2})", "*", recipient)
