"""The billing domain's registration: jobs on the billing stream and their timers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import structlog

from imsys.billing import ledger, repo
from imsys.billing.context import BillingContext
from imsys.billing.handlers import (
    GENERATE_BILLS,
    current_period,
    generate_bills,
    generate_bills_job_id,
    period_bounds,
)
from imsys.billing.notify import SEND_NOTIFICATION, send_notification
from imsys.billing.payments import PAYMENT_RECEIVED, payment_received
from imsys.billing.resend import RESEND_NOTIFICATION, resend_notification
from imsys.deps import Deps

if TYPE_CHECKING:
    from imsys.db import Executor

log = structlog.get_logger("imsys.billing")


async def due_billing_runs(
    db: Executor, *, opened_before: datetime | None = None
) -> list[tuple[int, str]]:
    """(tenant, period) of every tenant whose current period has no finished billing run.

    With ``opened_before``, only periods that opened before that instant.
    """
    # An inactive tenant is not billed (imsys/tenants.py).
    tenants = await db.fetch("SELECT id, time_zone FROM tenants WHERE active")
    periods = {t["id"]: current_period(t["time_zone"]) for t in tenants}
    if opened_before is not None:
        zones = {t["id"]: t["time_zone"] for t in tenants}
        periods = {
            tid: period
            for tid, period in periods.items()
            if period_bounds(period, zones[tid])[0] <= opened_before
        }
    due = await repo.tenants_due_for_bills(db, periods)
    return [(tenant_id, periods[tenant_id]) for tenant_id in due]


async def start_due_billing_runs(ctx: BillingContext) -> int:
    """One generate_bills job per tenant whose current period has no bills yet."""
    due = await due_billing_runs(ctx.db)
    for tenant_id, period in due:
        await ctx.producer.send(
            GENERATE_BILLS,
            {"tenant_id": tenant_id, "period": period},
            job_id=generate_bills_job_id(tenant_id, period),
        )
    return len(due)


async def queue_reminders(ctx: BillingContext) -> int:
    cfg = ctx.cfg
    n = await repo.queue_reminders(
        ctx.db,
        lead_times=sorted(set(cfg.lead_times_days)),
        template=cfg.templates["reminder"],
        phone_channel=cfg.phone_channel,
        notify=SEND_NOTIFICATION,
    )
    if n:
        log.info("reminders_queued", count=n)
    return n


async def queue_overdue_fallbacks(ctx: BillingContext, now: float | None = None) -> int:
    """An SMS for each WhatsApp message neither delivered nor read in its kind's time.

    ``now`` (epoch seconds; the clock when None) is the instant the windows are judged
    at: the timer passes its slot, so a slot fired late or twice decides the same way,
    and `ledger.queue_fallback` makes the SMS once whoever queues it.
    """
    m = ctx.messaging
    at = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    ids = await ledger.overdue_whatsapp(ctx.db, m.fallback_after_s, m.fallback_after("*"), at)
    queued = await ledger.queue_fallback(ctx.db, ids, SEND_NOTIFICATION)
    for row in queued:
        after = m.fallback_after(row["template"])
        await ctx.events.publish("notification_fallback", {
            "notification_id": row["id"], "channel": "whatsapp", "template": row["template"],
            "error": f"whatsapp: not delivered within {after:g} s", "fallback": "sms",
        })
    if queued:
        log.info("notification_fallbacks_queued", count=len(queued),
                 reason="not_delivered_in_time")
    return len(queued)


def register(deps: Deps) -> None:
    ctx = BillingContext.from_deps(deps)
    reg = deps.engine.registry
    reg.add(GENERATE_BILLS, partial(generate_bills, ctx))
    reg.add(PAYMENT_RECEIVED, partial(payment_received, ctx))
    reg.add(SEND_NOTIFICATION, partial(send_notification, ctx))
    reg.add(RESEND_NOTIFICATION, partial(resend_notification, ctx))

    async def bills(_slot: int) -> None:
        await start_due_billing_runs(ctx)

    async def reminders(_slot: int) -> None:
        await queue_reminders(ctx)

    async def fallbacks(slot: int) -> None:
        await queue_overdue_fallbacks(ctx, now=slot / 1000)

    deps.engine.add_timer("billing_runs", bills, every=ctx.cfg.bills_every_s)
    deps.engine.add_timer("expiry_reminders", reminders, every=ctx.cfg.reminders_every_s)
    deps.engine.add_timer(
        "notification_fallback", fallbacks, every=ctx.messaging.fallback_every_s
    )
