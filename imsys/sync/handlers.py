"""Router sync jobs: align one subscriber, reconcile one router, reboot one router.

Level-triggered: each run reads the desired state and the router, and applies only the
difference, so a retry after a lost reply changes nothing and raises nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import structlog

from imsys.errors import Deferred, FencedOut, PermanentError, RetryableError
from imsys.routeros import RouterAuthError, RouterSession, RouterTarget, RouterUnavailable
from imsys.routeros.menus import HOTSPOT_ACTIVE, PPP_ACTIVE, SYSTEM_REBOOT
from imsys.streams.job import Job
from imsys.sync import maintenance, repo
from imsys.sync.context import SyncContext
from imsys.sync.jobs import RouterJob, SyncSubscriber
from imsys.tenants import require_active

log = structlog.get_logger("imsys.sync")

T = TypeVar("T")


class SessionSurvived(RetryableError):
    """A kicked session is still there: the change has not taken effect."""


def router_target(ctx: SyncContext, row: Any) -> RouterTarget:
    return RouterTarget(
        router_id=row["id"],
        host=row["host"],
        port=row["port"],
        username=row["username"],
        password=row["password"],
        use_tls=row["use_tls"],
        tls_fingerprint=row["tls_fingerprint"],
        tls_ca=row["tls_ca"],
        tls_verify=row["tls_verify"],
        max_concurrency=row["max_concurrency"],
        timeout=ctx.settings.sync.router_timeout_s,
    )


@asynccontextmanager
async def router_session(
    ctx: SyncContext, router: Any, job: Job[Any] | None = None
) -> AsyncIterator[RouterSession]:
    """A session to ``router`` under its cross-process limit and its circuit breaker.

    A router in maintenance (``sync/maintenance.py``) defers the job at once, and an
    unreachable router opens its circuit and defers the job (no attempt spent). With
    ``job``, every write is refused in the very step it would be sent once the job's
    claim is no longer provably this process's (``Job.check_claim``).
    """
    router_id = router["id"]
    # A router in maintenance is left alone: its jobs wait, no attempt spent.
    maintenance.check(router)
    # An inactive tenant's routers are not touched: TenantInactive (a dead letter naming
    # the tenant for a job, a 409 for the admin API).
    await require_active(ctx.db, router["tenant_id"])
    await ctx.circuit.check(router_id)
    try:
        async with (
            ctx.engine.limiter.slot(f"router:{router_id}", router["max_concurrency"]),
            ctx.routers.session(router_target(ctx, router)) as ros,
        ):
            if job is not None:
                ros.guard = job.check_claim
            yield ros
    except RouterUnavailable as exc:
        cooldown = await ctx.circuit.failure(router_id)
        await router_went_offline(ctx, router_id, str(exc))
        raise Deferred(f"{exc}; waiting {cooldown:.0f}s for the router", delay=cooldown) from exc
    except RouterAuthError as exc:
        # Wrong credentials or an untrusted certificate fail every job of the router the
        # same way: hold them (no attempt spent, nothing dead-lettered) with the router
        # shown offline and why, until an operator fixes its settings.
        cooldown = await ctx.circuit.failure(router_id)
        reason = f"{exc}; fix the router's settings (PATCH /api/routers/{router_id})"
        await router_went_offline(ctx, router_id, reason)
        raise Deferred(f"{reason}; trying again in {cooldown:.0f}s", delay=cooldown) from exc
    await ctx.circuit.success(router_id)
    if router["online"] is not True:
        await router_came_online(ctx, router_id)


async def router_went_offline(ctx: SyncContext, router_id: int, error: str) -> None:
    if await repo.set_router_online(ctx.db, router_id, False, error):
        log.warning("router_offline", router_id=router_id, error=error)
        await ctx.events.publish("router_offline", {"router_id": router_id, "error": error})


async def router_came_online(ctx: SyncContext, router_id: int) -> None:
    """Record the router reachable; back from offline, it is reconciled at once (queued
    with the change by ``set_router_online``): it may have come back empty."""
    if await repo.set_router_online(ctx.db, router_id, True):
        log.info("router_online", router_id=router_id)
        await ctx.events.publish("router_online", {"router_id": router_id})


class Auditor:
    """Audits each router command before sending it, for each cause it carries out.

    One row per command and correlation, written as ``unknown outcome`` before the
    command and completed after it: a kill in between leaves the row, never a change
    nobody recorded. Before each command the job's delivery is checked (fencing): a run
    whose claim another process took sends nothing more.
    """

    def __init__(
        self,
        ctx: SyncContext,
        job: Job[Any],
        *,
        correlations: list[str],
        cause: str,
        tenant_id: int | None,
        router_id: int,
        subscriber_id: int | None,
    ) -> None:
        self.ctx = ctx
        self.job = job
        self.correlations = correlations
        self.cause = cause
        self.tenant_id = tenant_id
        self.router_id = router_id
        self.subscriber_id = subscriber_id

    async def run(
        self, action: str, detail: dict[str, Any], command: Callable[[], Awaitable[T]]
    ) -> T:
        """Write the intent, check the fence, send ``command``, complete the rows.

        The fence comes last before the command: while the claim is fresh it passes
        without awaiting anything, so nothing stands between it and the write.
        """
        ids = await repo.audit_intent(
            self.ctx.db,
            correlations=self.correlations,
            cause=self.cause,
            action=action,
            tenant_id=self.tenant_id,
            router_id=self.router_id,
            subscriber_id=self.subscriber_id,
            detail=detail,
        )
        try:
            await self.job.ensure_current()
            result = await command()
        except Exception as exc:
            outcome = audit_outcome(exc)
            if outcome is None:
                await repo.audit_withdraw(self.ctx.db, ids)
            else:
                await repo.audit_outcome(self.ctx.db, ids, outcome)
            raise
        await repo.audit_outcome(self.ctx.db, ids, "ok")
        return result


def audit_outcome(result: object) -> str | None:
    """What the audit log says of a command that returned ``result`` or raised it; None
    for a command never sent (a refused fence): its intent rows are withdrawn."""
    if isinstance(result, FencedOut):
        return None
    if isinstance(result, RouterUnavailable):
        prefix = "unknown: connection lost after sending" if result.maybe_applied else "failed"
        return f"{prefix}: {result}"
    if isinstance(result, Exception):
        return f"failed: {result}"
    return "ok"


async def end_sessions(ros: RouterSession, username: str, audit: Auditor) -> None:
    """Kick the subscriber's live sessions, then check that those sessions really ended.

    Checked by session `.id`, not by name: a CPE redials within seconds of a kick, and
    its fresh session (a new `.id`) already has the new state, so it is success.
    """
    kicked = await audit.run(
        f"remove {PPP_ACTIVE}", {"name": username}, partial(ros.kick_ppp, username)
    )
    kicked += await audit.run(
        f"remove {HOTSPOT_ACTIVE}", {"user": username}, partial(ros.kick_hotspot, username)
    )
    if not kicked:
        return
    gone = set(kicked)
    active = [*await ros.active_ppp(username), *await ros.active_hotspot(username)]
    survivors = [row[".id"] for row in active if row.get(".id") in gone]
    if survivors:
        raise SessionSurvived(
            f"{len(survivors)} session(s) of {username!r} still active after the kick; "
            "the change has not taken effect"
        )
    log.info("sessions_ended", username=username, count=len(kicked), redialled=len(active))


async def sync_subscriber(ctx: SyncContext, job: Job[SyncSubscriber]) -> None:
    """Align one subscriber's router entry, in a batch with the other jobs of its router
    that this process is running (``sync/batch.py``); the outcome is this job's own."""
    await ctx.batcher.run(job)


def blocked_reason(router_id: int, twin: dict[str, str]) -> str:
    return (
        f"{twin['menu']} already has an entry named {twin['name']!r} that imsys does not "
        f"manage; adopt router {router_id} (POST /api/routers/{router_id}/adopt) to take it "
        "over, or remove the entry on the router"
    )


async def _blocked(
    ctx: SyncContext, job: Job[SyncSubscriber], sub: repo.SubscriberRow, twin: dict[str, str]
) -> None:
    """An unmanaged twin blocks the subscriber: a state, not a failure to retry.

    The job completes (no retry, no dead letter); the subscriber shows ``error`` with the
    remedy, and reconciliation leaves it alone until it changes or its router is adopted.
    The backend hears of it once per desired version.
    """
    reason = blocked_reason(sub.router_id, twin)
    first = await repo.mark_blocked(ctx.db, sub, reason, fence=job.ensure_current)
    if first is None:
        raise Deferred(f"subscriber {sub.id} changed during its sync", delay=0.05)
    if not first:
        return
    await ctx.events.publish(
        "subscriber_sync_failed",
        {
            "subscriber_id": sub.id,
            "router_id": sub.router_id,
            "error": reason,
            "attempt": job.attempt,
            "blocked_by": twin,
            "remedy": f"adopt router {sub.router_id}",
        },
    )
    log.warning(
        "subscriber_blocked", subscriber_id=sub.id, router_id=sub.router_id, blocked_by=twin
    )


async def reboot_router(ctx: SyncContext, job: Job[RouterJob]) -> None:
    router = await repo.load_router(ctx.db, job.payload.router_id)
    if router is None:
        raise PermanentError(f"router {job.payload.router_id} does not exist")
    correlation = job.payload.correlation_id or f"job:{job.id}"
    audit = Auditor(
        ctx,
        job,
        correlations=[correlation],
        cause="api",
        tenant_id=router["tenant_id"],
        router_id=router["id"],
        subscriber_id=None,
    )
    async with router_session(ctx, router) as ros:
        await audit.run(SYSTEM_REBOOT, {}, ros.reboot)
    # Its jobs wait while it boots instead of failing against it.
    await ctx.circuit.failure(router["id"])
    await router_went_offline(ctx, router["id"], "rebooting")
    log.info("router_rebooted", router_id=router["id"])
