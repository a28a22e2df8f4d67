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
from imsys.routeros.menus import HOTSPOT_ACTIVE, LOGIN_BY_SERVICE, PPP_ACTIVE, SYSTEM_REBOOT
from imsys.streams.job import Job
from imsys.sync import repo
from imsys.sync.context import SyncContext
from imsys.sync.desired import Plan, marker, plan, public_fields
from imsys.sync.jobs import RouterJob, SyncSubscriber
from imsys.sync.profiles import ensure_profile, names_profile
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

    An unreachable router opens its circuit and defers the job (no attempt spent). With
    ``job``, every write is refused in the very step it would be sent once the job's
    claim is no longer provably this process's (``Job.check_claim``).
    """
    router_id = router["id"]
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


async def read_managed(
    ros: RouterSession, tag: str, subscriber_id: int
) -> dict[str, list[dict[str, str]]]:
    """The entries imsys manages for one subscriber, in each menu."""
    mark = marker(tag, subscriber_id)
    return {
        menu: await ros.print(menu, where={"comment": mark}) for menu in LOGIN_BY_SERVICE.values()
    }


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
        except FencedOut:
            await repo.audit_withdraw(self.ctx.db, ids)  # nothing was sent
            raise
        except RouterUnavailable as exc:
            outcome = "unknown: connection lost after sending" if exc.maybe_applied else "failed"
            await repo.audit_outcome(self.ctx.db, ids, f"{outcome}: {exc}")
            raise
        except Exception as exc:
            await repo.audit_outcome(self.ctx.db, ids, f"failed: {exc}")
            raise
        await repo.audit_outcome(self.ctx.db, ids, "ok")
        return result


async def apply_plan(ros: RouterSession, p: Plan, audit: Auditor) -> None:
    """The removes in every menu, then the adds, then the sets."""
    for c in p.changes:
        for item_id in c.remove:
            await audit.run(
                f"remove {c.menu}", {"id": item_id}, partial(ros.remove, c.menu, item_id)
            )
    for c in p.changes:
        if c.add is not None:
            await audit.run(f"add {c.menu}", public_fields(c.add), partial(ros.add, c.menu, c.add))
    for c in p.changes:
        if c.set and c.set_id is not None:
            await audit.run(
                f"set {c.menu}",
                {"id": c.set_id, **public_fields(c.set)},
                partial(ros.set, c.menu, c.set_id, c.set),
            )


async def _apply_recording_password(
    ctx: SyncContext,
    job: Job[SyncSubscriber],
    sub: repo.SubscriberRow,
    ros: RouterSession,
    steps: Plan,
    audit: Auditor,
) -> None:
    """``apply_plan``, keeping the digest of the password the entry holds up to date.

    Cleared before a write that sends the password (its reply may be lost, and then the
    router may hold either), recorded once the plan is applied.
    """
    if steps.writes_password and sub.desired.written_password is not None:
        await repo.set_written_password(ctx.db, sub.id, None, fence=job.ensure_current)
    await apply_plan(ros, steps, audit)
    if steps.password_digest is not None:
        await repo.set_written_password(
            ctx.db, sub.id, steps.password_digest, fence=job.ensure_current
        )


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
    p = job.payload
    sub = await repo.load_subscriber(ctx.db, p.subscriber_id)
    if sub is None:
        raise PermanentError(f"subscriber {p.subscriber_id} does not exist")
    router = await repo.load_router(ctx.db, sub.router_id)
    if router is None:
        raise PermanentError(f"router {sub.router_id} of subscriber {sub.id} does not exist")
    tag = ctx.settings.sync.comment_tag
    correlations = list(dict.fromkeys([*sub.correlations, p.correlation_id or f"job:{job.id}"]))
    audit = Auditor(
        ctx,
        job,
        correlations=correlations,
        cause=p.cause,
        tenant_id=sub.tenant_id,
        router_id=sub.router_id,
        subscriber_id=sub.id,
    )
    kicked = False
    twin: dict[str, str] | None = None
    try:
        async with router_session(ctx, router, job) as ros:
            managed = await read_managed(ros, tag, sub.id)
            steps = plan(sub.desired, managed, tag)
            if any(c.add is not None for c in steps.changes):
                twin = await _unmanaged_twin(ros, steps)  # blocked: no write at all
            if twin is None and sub.desired.present and (sub.kick_required or names_profile(steps)):
                # A login that names its package's profile (new, or a new package), or a
                # session about to restart, needs that profile there with its rate first.
                await ensure_profile(ctx.db, ros, sub.id, sub.desired.service, tag, audit)
            if twin is None:
                await _apply_recording_password(ctx, job, sub, ros, steps, audit)
                if sub.kick_required or sub.desired.disabled:
                    await end_sessions(ros, sub.desired.username, audit)
                    kicked = True
    except Deferred:
        raise
    except (PermanentError, RetryableError) as exc:
        # Fenced: a stale run (its claim taken while it stalled) writes no status and
        # publishes nothing; its error may be an artefact of the other run's work.
        await repo.mark_error(ctx.db, sub, str(exc), fence=job.ensure_current)
        await ctx.events.publish(
            "subscriber_sync_failed",
            {
                "subscriber_id": sub.id,
                "router_id": sub.router_id,
                "error": str(exc),
                "attempt": job.attempt,
            },
        )
        raise
    if twin is not None:
        await _blocked(ctx, job, sub, twin)
        return
    if not await repo.mark_synced(ctx.db, sub, kicked=kicked, fence=job.ensure_current):
        # The desired state changed while we worked: go again with the new one.
        raise Deferred(f"subscriber {sub.id} changed during its sync", delay=0.05)
    changed = [d["action"] for d in steps.describe()]
    await ctx.events.publish(
        "subscriber_synced",
        {"subscriber_id": sub.id, "router_id": sub.router_id, "changed": changed, "kicked": kicked},
    )
    log.info(
        "subscriber_synced",
        subscriber_id=sub.id,
        router_id=sub.router_id,
        changed=changed,
        kicked=kicked,
    )


async def _unmanaged_twin(ros: RouterSession, steps: Plan) -> dict[str, str] | None:
    """The entry (menu, id, name) that holds the name an add needs, or None."""
    for c in steps.changes:
        if c.add is None:
            continue
        twins = await ros.print(c.menu, where={"name": c.add["name"]})
        if twins:
            return {"menu": c.menu, "id": twins[0][".id"], "name": c.add["name"]}
    return None


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
