"""The billing domain's registration: jobs on the billing stream and their timers."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING

import structlog

from imsys.billing import repo
from imsys.billing.handlers import (
    GenerateBills,
    Notifier,
    PaymentReceived,
    SendNotification,
    current_period,
    generate_bills,
    payment_received,
    period_bounds,
)
from imsys.deps import Deps

if TYPE_CHECKING:
    from imsys.db import Executor

log = structlog.get_logger("imsys.billing")


def generate_bills_job_id(tenant_id: int, period: str) -> str:
    return f"generate_bills:{tenant_id}:{period}"


async def due_billing_runs(
    db: Executor, *, opened_before: datetime | None = None
) -> list[tuple[int, str]]:
    """(tenant, period) of every tenant whose current period has no finished billing run.

    With ``opened_before``, only periods that opened before that instant.
    """
    tenants = await db.fetch("SELECT id, time_zone FROM tenants")
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


async def start_due_billing_runs(deps: Deps) -> int:
    """One generate_bills job per tenant whose current period has no bills yet."""
    due = await due_billing_runs(deps.db)
    for tenant_id, period in due:
        await deps.engine.producer.enqueue(
            "billing",
            "generate_bills",
            {"tenant_id": tenant_id, "period": period},
            job_id=generate_bills_job_id(tenant_id, period),
        )
    return len(due)


async def queue_reminders(deps: Deps) -> int:
    cfg = deps.settings.billing
    n = await repo.queue_reminders(
        deps.db,
        lead_times=sorted(set(cfg.lead_times_days)),
        template=cfg.templates["reminder"],
        phone_channel=cfg.phone_channel,
    )
    if n:
        log.info("reminders_queued", count=n)
    return n


def register(deps: Deps) -> None:
    reg = deps.engine.registry
    notifier = Notifier(deps)
    reg.register("billing", "generate_bills", GenerateBills, partial(generate_bills, deps))
    reg.register("billing", "payment_received", PaymentReceived, partial(payment_received, deps))
    reg.register("billing", "send_notification", SendNotification, notifier.send_notification)
    cfg = deps.settings.billing

    async def bills(_slot: int) -> None:
        await start_due_billing_runs(deps)

    async def reminders(_slot: int) -> None:
        await queue_reminders(deps)

    deps.engine.add_timer("billing_runs", bills, every=cfg.bills_every_s)
    deps.engine.add_timer("expiry_reminders", reminders, every=cfg.reminders_every_s)
