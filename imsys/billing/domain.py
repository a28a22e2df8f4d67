"""The billing domain's registration: jobs on the billing stream and their timers."""

from __future__ import annotations

from functools import partial

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
)
from imsys.deps import Deps

log = structlog.get_logger("imsys.billing")


async def start_due_billing_runs(deps: Deps) -> int:
    """One generate_bills job per tenant whose current period has no bills yet."""
    tenants = await deps.db.fetch("SELECT id, time_zone FROM tenants")
    periods = {t["id"]: current_period(t["time_zone"]) for t in tenants}
    due = await repo.tenants_due_for_bills(deps.db, periods)
    for tenant_id in due:
        period = periods[tenant_id]
        await deps.engine.producer.enqueue(
            "billing",
            "generate_bills",
            {"tenant_id": tenant_id, "period": period},
            job_id=f"generate_bills:{tenant_id}:{period}",
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
