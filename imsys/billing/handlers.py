"""``generate_bills``: a tenant's invoices and their messages for one billing period."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import structlog
from pydantic import BaseModel, Field

from imsys.billing import repo
from imsys.billing.context import BillingContext
from imsys.billing.notify import SEND_NOTIFICATION
from imsys.errors import PermanentError
from imsys.streams.job import Job, JobSpec
from imsys.tenants import TenantInactive

log = structlog.get_logger("imsys.billing")

PERIOD = r"^\d{4}-(0[1-9]|1[0-2])$"


class GenerateBills(BaseModel):
    tenant_id: int
    period: str = Field(pattern=PERIOD)


GENERATE_BILLS = JobSpec("billing", "generate_bills", GenerateBills)


def generate_bills_job_id(tenant_id: int, period: str) -> str:
    """One run of a tenant's period waits or runs at a time (and holds its lock)."""
    return f"{GENERATE_BILLS.name}:{tenant_id}:{period}"


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


async def generate_bills(ctx: BillingContext, job: Job[GenerateBills]) -> None:
    p = job.payload
    tenant = await ctx.db.fetchrow(
        "SELECT id, time_zone, active FROM tenants WHERE id = $1", p.tenant_id
    )
    if tenant is None:
        raise PermanentError(f"tenant {p.tenant_id} does not exist")
    if not tenant["active"]:
        raise TenantInactive(p.tenant_id)
    start, end = period_bounds(p.period, tenant["time_zone"])
    cfg = ctx.cfg
    template = await ctx.db.fetchval(
        "SELECT body FROM message_templates WHERE tenant_id = $1 AND template = 'invoice'",
        p.tenant_id,
    )
    await job.progress(0, None, f"billing {p.period}")
    started = time.perf_counter()
    # One set-based statement: invoices, their messages and outbox rows commit together,
    # so a run killed half-way leaves nothing half-done, and a re-run adds nothing.
    async with ctx.db.acquire() as conn, conn.transaction():
        # One run of a tenant's period at a time, and only by the job's current delivery:
        # a stale one raises FencedOut here and bills nothing.
        await repo.lock_billing_run(conn, generate_bills_job_id(p.tenant_id, p.period))
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
            notify=SEND_NOTIFICATION,
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
