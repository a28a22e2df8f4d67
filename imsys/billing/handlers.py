"""Billing jobs: a tenant's bills for a period, a received payment, one notification."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from pydantic import BaseModel, Field

from imsys.billing import payments, repo
from imsys.deps import Deps
from imsys.errors import Deferred, PermanentError, RetryableError
from imsys.events.channels import ChannelControl
from imsys.providers.email import SmtpClient
from imsys.providers.sms import SmsClient
from imsys.providers.whatsapp import WhatsAppClient
from imsys.streams.job import Job

log = structlog.get_logger("imsys.billing")

PERIOD = r"^\d{4}-(0[1-9]|1[0-2])$"
# A claim on a message older than this belongs to a delivery that died mid-call (well past
# any provider timeout): another delivery may send it.
SENDING_LEASE_S = 120.0


class GenerateBills(BaseModel):
    tenant_id: int
    period: str = Field(pattern=PERIOD)


class PaymentReceived(BaseModel):
    payment_id: int


class SendNotification(BaseModel):
    notification_id: int


def period_bounds(period: str, zone: str) -> tuple[datetime, datetime]:
    """A billing period is a calendar month in the tenant's time zone."""
    year, month = (int(x) for x in period.split("-"))
    tz = ZoneInfo(zone)
    start = datetime(year, month, 1, tzinfo=tz)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
    return start, end


def current_period(zone: str, now: float | None = None) -> str:
    at = datetime.fromtimestamp(time.time() if now is None else now, ZoneInfo(zone))
    return f"{at.year:04d}-{at.month:02d}"


async def generate_bills(deps: Deps, job: Job[GenerateBills]) -> None:
    p = job.payload
    tenant = await deps.db.fetchrow("SELECT id, time_zone FROM tenants WHERE id = $1", p.tenant_id)
    if tenant is None:
        raise PermanentError(f"tenant {p.tenant_id} does not exist")
    start, end = period_bounds(p.period, tenant["time_zone"])
    cfg = deps.settings.billing
    template = await deps.db.fetchval(
        "SELECT body FROM message_templates WHERE tenant_id = $1 AND template = 'invoice'",
        p.tenant_id,
    )
    await job.progress(0, None, f"billing {p.period}")
    started = time.perf_counter()
    # One set-based statement: invoices, their messages and outbox rows commit together,
    # so a run killed half-way leaves nothing half-done, and a re-run adds nothing.
    async with deps.db.acquire() as conn, conn.transaction():
        # One run of a tenant's period at a time, and only by the job's current delivery:
        # a stale one raises FencedOut here and bills nothing.
        await repo.lock_billing_run(conn, p.tenant_id, p.period)
        await job.ensure_current()
        row = await repo.generate_bills(
            conn,
            tenant_id=p.tenant_id,
            period=p.period,
            period_start=start,
            period_end=end,
            template=template or cfg.templates["invoice"],
            phone_channel=cfg.phone_channel,
            time_zone=tenant["time_zone"],
        )
    await job.progress(row["invoices"], row["invoices"], f"billed {p.period}")
    log.info(
        "bills_generated",
        tenant_id=p.tenant_id,
        period=p.period,
        invoices=row["invoices"],
        messages=row["messages"],
        ms=round((time.perf_counter() - started) * 1000, 1),
    )


async def payment_received(deps: Deps, job: Job[PaymentReceived]) -> None:
    cfg = deps.settings.billing
    result = await payments.apply_payment(
        deps.db,
        job.payload.payment_id,
        template=cfg.templates["payment_ack"],
        phone_channel=cfg.phone_channel,
        fence=job.ensure_current,
    )
    if result is None:
        exists = await deps.db.fetchval(
            "SELECT 1 FROM payments WHERE id = $1", job.payload.payment_id
        )
        if not exists:
            raise PermanentError(f"payment {job.payload.payment_id} does not exist")
        log.info("payment_already_applied", payment_id=job.payload.payment_id)
        return
    log.info("payment_applied", **result)


class Notifier:
    """The delivery channels, built once from the settings."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.sms = SmsClient(deps.http, deps.settings.sms)
        self.whatsapp = WhatsAppClient(deps.http, deps.settings.whatsapp)
        self.smtp = SmtpClient(deps.settings.smtp)
        self.channels = ChannelControl.from_deps(deps)

    async def deliver(self, note: Any) -> str:
        channel, to, body = note["channel"], note["recipient"], note["body"]
        if channel == "sms":
            return await self.sms.send(to, body)
        if channel == "whatsapp":
            return await self.whatsapp.send_text(to, body)
        subject = f"{note['tenant_name'] or 'Your service'}: {note['template'].replace('_', ' ')}"
        return await self.smtp.send(to, subject, body)

    async def send_notification(self, job: Job[SendNotification]) -> None:
        """Send one message at most once at a time, and only from the job's current delivery.

        The delivery claims the message (row locked, fence checked, claim written, in one
        transaction) before it calls the provider: a stale delivery raises FencedOut there
        and sends nothing; another delivery finds the claim and waits for its outcome.
        """
        deps = self.deps
        nid = job.payload.notification_id
        note = await repo.notification(deps.db, nid)
        if note is None:
            raise PermanentError(f"notification {nid} does not exist")
        if note["status"] != "queued":
            return  # sent (or given up) by an earlier delivery of this job
        channel = note["channel"]
        await self._channel_running(channel)
        await deps.engine.rates.acquire(
            f"notify:{channel}", deps.settings.billing.send_rate_per_s.get(channel, 10.0)
        )
        claimant = f"{job.id}:{job.delivery}"
        claim = await repo.claim_sending(
            deps.db, nid, claimant, lease_s=SENDING_LEASE_S, fence=job.ensure_current
        )
        if claim == "done":
            return
        if claim == "busy":
            raise Deferred(f"notification {nid} is being sent by another delivery", delay=5.0)
        try:
            provider_id = await self.deliver(note)
        except (RetryableError, PermanentError) as exc:
            final = isinstance(exc, PermanentError) or job.attempt >= (
                deps.settings.streams["billing"].max_attempts
            )
            # Only the current delivery records the failure (FencedOut otherwise).
            recorded = await repo.mark_attempt_failed(
                deps.db, nid, str(exc), final=final, claimant=claimant, fence=job.ensure_current
            )
            if final and recorded:
                await deps.events.publish(
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
        await repo.mark_sent(deps.db, nid, provider_id)
        await deps.events.publish(
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

    async def _channel_running(self, channel: str) -> None:
        """Stopped channels hold their messages (service_control): Deferred, no attempt."""
        await self.channels.ensure_running(channel)


def _mask(recipient: str) -> str:
    """Enough of a number or address to find it in the ledger, not enough to misuse."""
    return re.sub(r"(?<=.{4}).(?=.{2})", "*", recipient)
