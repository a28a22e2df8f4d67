"""Payments: recorded once per provider reference, applied exactly once.

Applying a payment extends the subscriber's paid-up time by the package period, lifts a
suspension the expiry sweep made (an admin's stays until an admin lifts it), queues the
sync and an acknowledgement — in one transaction guarded by ``applied_at``, so a
replayed payment changes nothing and sends nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field

from imsys import outbox
from imsys.billing.context import BillingContext
from imsys.billing.notify import SEND_NOTIFICATION, notification_job_id
from imsys.billing.templates import render
from imsys.errors import PermanentError
from imsys.network.errors import Conflict, Invalid
from imsys.streams.job import Job, JobSpec
from imsys.sync.service import queue_sync
from imsys.tenants import require_active

log = structlog.get_logger("imsys.billing")

# A provider's transaction id, e.g. an M-Pesa receipt (QK82H3XY1Z).
REFERENCE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{3,63}$"


class PaymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    subscriber_id: int
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)
    reference: str = Field(pattern=REFERENCE)


class PaymentReceived(BaseModel):
    payment_id: int


PAYMENT_RECEIVED = JobSpec("billing", "payment_received", PaymentReceived)


def payment_job_id(payment_id: int) -> str:
    return f"{PAYMENT_RECEIVED.name}:{payment_id}"


async def payment_received(ctx: BillingContext, job: Job[PaymentReceived]) -> None:
    tenant_id = await ctx.db.fetchval(
        "SELECT tenant_id FROM payments WHERE id = $1", job.payload.payment_id
    )
    if tenant_id is not None:
        # The payment stays recorded; applying it (expiry, reconnection, the
        # acknowledgement) waits in the dead-letter stream until the tenant is active.
        await require_active(ctx.db, tenant_id)
    result = await apply_payment(
        ctx.db,
        job.payload.payment_id,
        template=ctx.cfg.templates["payment_ack"],
        phone_channel=ctx.cfg.phone_channel,
        fence=job.ensure_current,
    )
    if result is None:
        payment_id = job.payload.payment_id
        if not await ctx.db.fetchval("SELECT 1 FROM payments WHERE id = $1", payment_id):
            raise PermanentError(f"payment {payment_id} does not exist")
        log.info("payment_already_applied", payment_id=payment_id)
        return
    log.info("payment_applied", **result)


async def record_payment(db: asyncpg.Pool, data: PaymentIn) -> tuple[dict[str, Any], bool]:
    """Store a payment once per reference; returns (payment, created)."""
    async with db.acquire() as conn, conn.transaction():
        sub = await conn.fetchrow(
            "SELECT id, tenant_id FROM subscribers WHERE id = $1 AND deleted_at IS NULL",
            data.subscriber_id,
        )
        if sub is None:
            raise Invalid(f"subscriber {data.subscriber_id} does not exist")
        row = await conn.fetchrow(
            """
            INSERT INTO payments (tenant_id, subscriber_id, amount, reference)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (reference) DO NOTHING
            RETURNING *
            """,
            sub["tenant_id"],
            data.subscriber_id,
            data.amount,
            data.reference,
        )
        if row is not None:
            await outbox.add(
                conn,
                PAYMENT_RECEIVED,
                {"payment_id": row["id"]},
                job_id=payment_job_id(row["id"]),
            )
            return dict(row), True
    existing = await db.fetchrow("SELECT * FROM payments WHERE reference = $1", data.reference)
    assert existing is not None
    if existing["subscriber_id"] != data.subscriber_id or existing["amount"] != data.amount:
        # Another tenant's payment is not described: references are unique across tenants,
        # a tenant's token must learn no more than that this one is taken.
        detail = (
            f" (subscriber {existing['subscriber_id']}, amount {existing['amount']})"
            if existing["tenant_id"] == sub["tenant_id"]
            else ""
        )
        raise Conflict(
            f"reference {data.reference!r} is already recorded for another payment{detail}"
        )
    return dict(existing), False


async def apply_payment(
    db: asyncpg.Pool,
    payment_id: int,
    *,
    template: str,
    phone_channel: str,
    fence: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any] | None:
    """Apply once: extend, reconnect, queue sync and acknowledgement. None if done before.

    ``fence`` (the job's ``ensure_current``) runs with the payment row locked, inside the
    transaction that applies it: a delivery that lost its claim raises there and applies
    nothing, and one that claimed the job after us waits for the lock and finds it applied.
    """
    async with db.acquire() as conn, conn.transaction():
        pay = await conn.fetchrow(
            """
            SELECT id, tenant_id, subscriber_id, amount, reference FROM payments
            WHERE id = $1 AND applied_at IS NULL FOR UPDATE
            """,
            payment_id,
        )
        if pay is None:
            return None
        if fence is not None:
            await fence()
        await conn.execute("UPDATE payments SET applied_at = now() WHERE id = $1", payment_id)
        correlation = f"payment:{pay['reference']}"
        sub = await conn.fetchrow(
            """
            UPDATE subscribers s SET
                expires_at = GREATEST(COALESCE(s.expires_at, now()), now())
                             + make_interval(days => p.period_days),
                -- A payment lifts the sweep's suspension, never an admin's.
                is_suspended = s.is_suspended AND s.suspension_reason IS NOT DISTINCT FROM 'admin',
                suspension_reason = CASE WHEN s.suspension_reason = 'admin' THEN 'admin' END,
                desired_version = desired_version + 1,
                sync_status = 'pending', updated_at = now(),
                pending_correlations = pending_correlations || ARRAY[$2]
            FROM packages p, tenants t
            WHERE s.id = $1 AND p.id = s.package_id AND t.id = s.tenant_id
            RETURNING s.id, s.tenant_id, s.username, s.phone, s.email, s.expires_at,
                      p.name AS package, t.time_zone
            """,
            pay["subscriber_id"],
            correlation,
        )
        if sub is None:
            return None
        await conn.execute(
            """
            UPDATE invoices SET status = 'paid' WHERE id = (
                SELECT id FROM invoices WHERE subscriber_id = $1 AND status = 'open'
                ORDER BY due_at LIMIT 1)
            """,
            sub["id"],
        )
        await queue_sync(conn, sub["id"], correlation, "payment")
        recipient = sub["phone"] or sub["email"]
        if recipient:
            tenant_tpl = await conn.fetchval(
                "SELECT body FROM message_templates"
                " WHERE tenant_id = $1 AND template = 'payment_ack'",
                sub["tenant_id"],
            )
            values = {
                "name": sub["username"],
                "package": sub["package"],
                "amount": str(pay["amount"]),
                "reference": pay["reference"],
                "expires_at": _local(sub["expires_at"], sub["time_zone"]),
            }
            body = render(tenant_tpl or template, **values)
            note_id = await conn.fetchval(
                """
                INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient,
                                           template, body, dedupe_key, vars)
                VALUES ($1, $2, $3, $4, 'payment_ack', $5, $6, $7)
                ON CONFLICT (dedupe_key) DO NOTHING RETURNING id
                """,
                sub["tenant_id"],
                sub["id"],
                phone_channel if sub["phone"] else "email",
                recipient,
                body,
                f"payment_ack:{pay['id']}",
                orjson.dumps(values).decode(),
            )
            if note_id is not None:
                await outbox.add(
                    conn,
                    SEND_NOTIFICATION,
                    {"notification_id": note_id},
                    job_id=notification_job_id(note_id),
                )
        return {
            "payment_id": pay["id"],
            "subscriber_id": sub["id"],
            "expires_at": sub["expires_at"],
        }


def _local(at: datetime, zone: str) -> str:
    return at.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")
