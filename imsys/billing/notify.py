"""``send_notification``: one queued message of the ledger, sent at most once at a time."""

from __future__ import annotations

import re
from typing import Any

import orjson
import structlog
from pydantic import BaseModel

from imsys.billing import ledger, outcomes, repo
from imsys.billing.context import BillingContext
from imsys.errors import Deferred, PermanentError, RetryableError
from imsys.events.channels import send_key
from imsys.providers.errors import OutOfCredits, ProviderRejected
from imsys.streams.job import Job, JobSpec
from imsys.tenants import require_active

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


async def _turn(ctx: BillingContext, note: Any) -> None:
    """Wait for the message's turn at its channel's rate on its account: tenants that
    send at once share it evenly, and OTPs (imsys/events/otp.py) go first."""
    channel = note["channel"]
    rate = ctx.cfg.send_rate_per_s.get(channel, 10.0)
    await ctx.fair.turn(send_key(channel, note["account"]), f"n:{note['id']}",
                        f"t:{note['tenant_id'] or 0}", rate)


async def deliver(ctx: BillingContext, note: Any) -> tuple[str, str, str | None]:
    """Send through the tenant's account; (provider's id, provider, how it went)."""
    clients = ctx.accounts.get(note["account"])
    channel, to, body = note["channel"], note["recipient"], note["body"]
    if channel == "sms":
        return await clients.sms.send(to, body), clients.sms.provider, None
    if channel == "whatsapp":
        wa = clients.whatsapp
        # Free-form text only inside the customer's 24-hour window; a template otherwise.
        if await ledger.in_window(ctx.db, wa.phone_number_id, to):
            return await wa.send_text(to, body), "whatsapp", "text"
        name, language, params = await _template(ctx, note)
        values = orjson.loads(note["vars"] or "{}")
        args = [str(values.get(p) or "-") for p in params]
        return await wa.send_template(to, name, language, args), "whatsapp", name
    subject = f"{note['tenant_name'] or 'Your service'}: {note['template'].replace('_', ' ')}"
    return await clients.smtp.send(to, subject, body), "smtp", None


async def _template(ctx: BillingContext, note: Any) -> tuple[str, str, list[str]]:
    kind = note["template"]
    row = await ledger.whatsapp_template(ctx.db, note["tenant_id"], kind)
    if row is not None:
        return row["name"], row["language"], list(row["params"])
    default = ctx.messaging.whatsapp_templates.get(kind)
    if default is None:
        raise ProviderRejected(
            "whatsapp", "not sent", code="no_template",
            detail=f"the customer's 24-hour window is closed and no template is set for {kind!r}",
        )
    return default.name, default.language, list(default.params)


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
    channel, tenant_id = note["channel"], note["tenant_id"]
    if tenant_id is not None:
        await require_active(ctx.db, tenant_id)  # an inactive tenant is sent nothing
    # Stopped channels hold their messages (service_control, or the tenant's account out
    # of credit): Deferred, no attempt.
    await ctx.channels.ensure_running(channel, tenant_id)
    await _turn(ctx, note)
    claimant = f"{job.id}:{job.delivery}"
    claim = await repo.claim_sending(
        ctx.db, nid, claimant, lease_s=SENDING_LEASE_S, fence=job.ensure_current
    )
    if claim == "done":
        return
    if claim == "busy":
        raise Deferred(f"notification {nid} is being sent by another delivery", delay=5.0)
    try:
        provider_id, provider, sent_as = await deliver(ctx, note)
    except OutOfCredits as exc:
        await _out_of_credit(ctx, note, claimant, exc)
        raise Deferred(f"{channel} out of credit for tenant {tenant_id}: held",
                       delay=ctx.channels.hold_s) from None
    except (RetryableError, PermanentError) as exc:
        final = isinstance(exc, PermanentError) or job.last_attempt
        # Only the current delivery records the failure (FencedOut otherwise).
        recorded = await repo.mark_attempt_failed(
            ctx.db, nid, f"{channel}: {exc}", final=final, claimant=claimant,
            fence=job.ensure_current,
        )
        if final and recorded:
            row = {**dict(note), "status": "failed"}
            if await outcomes.after_status(ctx.db, ctx.events, row, str(exc), SEND_NOTIFICATION):
                return  # handed to its SMS fallback: nothing to dead-letter
        raise
    # Recorded even by a delivery fenced out meanwhile: the provider has the message,
    # and leaving it 'queued' would only get it sent a second time.
    moved = await ledger.mark_sent(ctx.db, nid, provider_id, provider, sent_as)
    await ctx.events.publish(
        "notification_sent",
        {
            "notification_id": nid,
            "channel": channel,
            "template": note["template"],
            "provider_message_id": provider_id,
        },
    )
    if moved is not None:  # a receipt had arrived before the id was written
        await outcomes.after_status(ctx.db, ctx.events, moved, moved["status"], SEND_NOTIFICATION)
    log.info(
        "notification_sent",
        notification_id=nid,
        channel=channel,
        template=note["template"],
        sent_as=sent_as,
        account=note["account"],
        to=_mask(note["recipient"]),
    )


async def _out_of_credit(ctx: BillingContext, note: Any, claimant: str, exc: Exception) -> None:
    """Stop the channel for the tenant, once; the message waits, its claim released."""
    await repo.release_claim(ctx.db, note["id"], claimant)
    channel, tenant_id = note["channel"], note["tenant_id"]
    if await ctx.channels.out_of_credit(channel, tenant_id, str(exc)):
        await ctx.events.publish(
            "channel_out_of_credit",
            {"channel": channel, "tenant_id": tenant_id, "account": note["account"],
             "error": str(exc)},
        )
        log.warning("channel_out_of_credit", channel=channel, tenant_id=tenant_id,
                    account=note["account"], error=str(exc))


def _mask(recipient: str) -> str:
    """Enough of a number or address to find it in the ledger, not enough to misuse."""
    return re.sub(r"(?<=.{4}).(?=.{2})", "*", recipient)
