"""The per-router profile job: a package's profile, with its rate, on each router of its
tenant (see ``imsys.sync.profiles``)."""

from __future__ import annotations

import asyncpg
import structlog

from imsys.errors import PermanentError
from imsys.streams.job import Job
from imsys.sync import repo
from imsys.sync.context import SyncContext
from imsys.sync.handlers import Auditor, router_session
from imsys.sync.jobs import RouterJob
from imsys.sync.profiles import align_profiles, tenant_profiles

log = structlog.get_logger("imsys.sync")


async def align_router_profiles(
    ctx: SyncContext, router: asyncpg.Record, job: Job[RouterJob], correlation: str, cause: str
) -> None:
    """Align every package profile of the router's tenant on the router (reconciliation
    and ``sync_profiles`` both come here)."""
    wanted = await tenant_profiles(ctx.db, router["tenant_id"])
    audit = Auditor(
        ctx,
        job,
        correlations=[correlation],
        cause=cause,
        tenant_id=router["tenant_id"],
        router_id=router["id"],
        subscriber_id=None,
    )
    async with router_session(ctx, router, job) as ros:
        done = await align_profiles(ros, wanted, ctx.settings.sync.comment_tag, audit)
    if any(done.values()):
        log.info("router_profiles_aligned", router_id=router["id"], cause=cause, **done)


async def sync_profiles(ctx: SyncContext, job: Job[RouterJob]) -> None:
    router = await repo.load_router(ctx.db, job.payload.router_id)
    if router is None:
        raise PermanentError(f"router {job.payload.router_id} does not exist")
    correlation = job.payload.correlation_id or f"job:{job.id}"
    await align_router_profiles(ctx, router, job, correlation, "package")
