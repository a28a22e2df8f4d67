"""Reconciliation, the expiry sweep and router facts: finding drift, never forcing it.

Reconciliation reads each menu once (a login menu limited to the fields the diff
compares), diffs against the database (one query) and enqueues the same
``sync_subscriber`` job for every drifted subscriber (one statement); managed entries the
database no longer knows are removed. The pure part, the diff, is ``reconcile_plan``'s.

The mass-disconnect guard holds the disconnections of a sweep or reconciliation that
would cut off too many of one router's subscribers at once; the rest of the work (new
subscribers, reconnects, package changes) goes ahead. What it holds is kept on the router
row (``guard_held``, per cause) for the dashboard and the API until an operator confirms,
and announced once as the backend event ``router_guard_tripped``.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from imsys import outbox
from imsys.deps import Deps
from imsys.errors import PermanentError
from imsys.routeros import RouterError, RouterSession
from imsys.routeros.menus import LOGIN_BY_SERVICE
from imsys.streams.job import Job
from imsys.sync import repo, wireless
from imsys.sync.context import SyncContext
from imsys.sync.desired import Desired
from imsys.sync.handlers import (
    Auditor,
    router_came_online,
    router_session,
    router_target,
    router_went_offline,
)
from imsys.sync.jobs import (
    EXPIRE_TENANT,
    SYNC_ROUTER,
    SYNC_SUBSCRIBER,
    ExpireTenant,
    RouterJob,
    expire_job_id,
    reconcile_job_id,
    sync_job_id,
)
from imsys.sync.profiles import align_profiles, tenant_profiles
from imsys.sync.reconcile_plan import (
    HELD_SHOWN,
    LOGIN_PROPLIST,
    Known,
    RouterPlan,
    diff,
    guard_verdict,
    profiles_in_use,
)
from imsys.tenants import TenantInactive

if TYPE_CHECKING:
    from imsys.db import Executor

log = structlog.get_logger("imsys.sync")

# Every subscriber of one router, deleted ones included (their entries go), with only what
# the diff needs: one query, no per-row work beyond building the intent.
KNOWN = """
SELECT s.id, s.username, s.password, s.service, s.is_suspended OR s.deleted_at IS NOT NULL,
       s.deleted_at IS NULL, p.profile, s.router_password_hash, s.sync_status,
       s.kick_required, s.blocked_version IS NOT DISTINCT FROM s.desired_version
FROM subscribers s JOIN packages p ON p.id = s.package_id
WHERE s.router_id = $1
"""


async def load_known(db: Executor, router_id: int) -> list[Known]:
    rows = await db.fetch(KNOWN, router_id)
    return [
        Known(r[0], Desired(r[0], r[1], r[2], r[3], r[6], r[4], r[5], r[7]), r[8], r[9], r[10])
        for r in rows
    ]


async def read_router(
    ctx: SyncContext, ros: RouterSession, router_id: int
) -> tuple[list[Known], dict[str, list[dict[str, str]]]]:
    """The router's subscribers and its login entries: one query and one print per login
    menu, limited to the fields the diff compares; the query runs while the router
    answers."""
    known = asyncio.ensure_future(load_known(ctx.db, router_id))
    try:
        menus = {
            menu: await ros.print(menu, proplist=list(LOGIN_PROPLIST))
            for menu in LOGIN_BY_SERVICE.values()
        }
    except BaseException:
        known.cancel()
        with contextlib.suppress(BaseException):
            await known
        raise
    return await known, menus


async def verdict(ctx: SyncContext, router: Any, result: RouterPlan) -> str | None:
    """The guard's verdict on ``result`` under the router's tenant's share."""
    share = await ctx.db.fetchval(
        "SELECT max_disconnect_share::float FROM tenants WHERE id = $1", router["tenant_id"]
    )
    return guard_verdict(
        ctx.settings.sync.guard_min_count,
        cutting=result.cutting(),
        total=max(result.subscribers, result.managed_entries),
        share=share,
        overridden=bool(router["guard_overridden"]),
    )


async def build_plan(ctx: SyncContext, router: Any) -> RouterPlan:
    """What reconciliation would do on ``router`` now: reads only."""
    async with router_session(ctx, router) as ros:
        known, menus = await read_router(ctx, ros, router["id"])
    result = diff(router["id"], ctx.settings.sync.comment_tag, known, menus)
    result.guard = await verdict(ctx, router, result)
    return result


async def dry_run(deps: Deps, router: Any) -> RouterPlan:
    """What reconciliation would do on ``router`` now (the admin API's dry run)."""
    ctx = SyncContext.build(deps)
    try:
        return await build_plan(ctx, router)
    finally:
        await ctx.close()


async def trip_guard(
    ctx: SyncContext,
    router_id: int,
    cause: str,
    held: dict[str, Any],
    correlation: str,
) -> None:
    """Record what the guard holds on ``router_id`` for ``cause``; audit, log and publish
    ``router_guard_tripped`` only when that changed (reconciliation runs every few
    minutes: the same held plan is news once)."""
    async with ctx.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT tenant_id, guard_held -> $2::text AS held FROM routers"
            " WHERE id = $1 FOR UPDATE",
            router_id,
            cause,
        )
        if row is None:
            return
        before = orjson.loads(row["held"]) if row["held"] is not None else None
        await conn.execute(
            """
            UPDATE routers SET guard_tripped_at = coalesce(guard_tripped_at, now()),
                guard_reason = $2,
                guard_held = guard_held || jsonb_build_object($3::text, $4::jsonb)
            WHERE id = $1
            """,
            router_id,
            f"{cause}: {held['reason']}",
            cause,
            orjson.dumps(held).decode(),
        )
    if (
        before is not None
        and before.get("subscriber_ids") == held["subscriber_ids"]
        and (before.get("remove_unknown") == held["remove_unknown"])
    ):
        return
    await repo.audit(
        ctx.db,
        correlation_id=correlation,
        cause=cause,
        action="guard_tripped",
        outcome="held",
        router_id=router_id,
        detail={"reason": held["reason"], "would_disconnect": held["would_disconnect"]},
    )
    log.error(
        "mass_disconnect_guard_tripped", router_id=router_id, reason=held["reason"], cause=cause
    )
    await ctx.events.publish(
        "router_guard_tripped",
        {
            "router_id": router_id,
            "tenant_id": row["tenant_id"],
            "cause": cause,
            "reason": held["reason"],
            "would_disconnect": held["would_disconnect"],
            "subscribers": held["subscribers"],
        },
    )


async def release_guard(
    ctx: SyncContext,
    cause: str,
    *,
    router_id: int | None = None,
    tenant_id: int | None = None,
    keep: list[int] | None = None,
) -> None:
    """``cause`` no longer holds anything on the router (or on the tenant's routers but
    ``keep``); a router with nothing held left is no longer tripped."""
    await ctx.db.execute(
        """
        UPDATE routers SET guard_held = guard_held - $1::text,
            guard_tripped_at = CASE WHEN guard_held - $1::text = '{}'::jsonb
                                    THEN NULL ELSE guard_tripped_at END,
            guard_reason = CASE WHEN guard_held - $1::text = '{}'::jsonb
                                THEN NULL ELSE guard_reason END
        WHERE guard_held ? $1::text
          AND ($2::bigint IS NULL OR id = $2) AND ($3::bigint IS NULL OR tenant_id = $3)
          AND NOT (id = ANY($4::bigint[]))
        """,
        cause,
        router_id,
        tenant_id,
        keep or [],
    )


async def sync_router(ctx: SyncContext, job: Job[RouterJob]) -> None:
    router = await repo.load_router(ctx.db, job.payload.router_id)
    if router is None:
        raise PermanentError(f"router {job.payload.router_id} does not exist")
    correlation = job.payload.correlation_id or f"reconcile:{router['id']}:{job.id}"
    tag = ctx.settings.sync.comment_tag
    audit = Auditor(
        ctx,
        job,
        correlations=[correlation],
        cause="reconciliation",
        tenant_id=router["tenant_id"],
        router_id=router["id"],
        subscriber_id=None,
    )
    wanted = await tenant_profiles(ctx.db, router["tenant_id"])
    async with router_session(ctx, router, job) as ros:
        known, menus = await read_router(ctx, ros, router["id"])
        # Profiles before any sync is queued: drifted rates re-set, missing ones added,
        # unused orphans removed (in use: by the logins just read, not read again).
        aligned = await align_profiles(ros, wanted, tag, audit, in_use=profiles_in_use(menus))
    if any(aligned.values()):
        log.info(
            "router_profiles_aligned", router_id=router["id"], cause="reconciliation", **aligned
        )
    result = diff(router["id"], tag, known, menus)
    result.guard = await verdict(ctx, router, result)
    held: set[int] = set()
    orphans = result.orphans
    if result.guard:
        # Hold the disconnections only: adds, reconnects and package changes go ahead.
        await trip_guard(ctx, router["id"], "reconciliation", result.held(), correlation)
        held = {sid for sid, _ in result.cuts()}
        orphans = []
    else:
        await release_guard(ctx, "reconciliation", router_id=router["id"])
    if orphans:
        async with router_session(ctx, router, job) as ros:
            for menu, item_id, name in orphans:
                await audit.run(
                    f"remove {menu}",
                    {"id": item_id, "name": name},
                    partial(ros.remove, menu, item_id),
                )
    drifted = [sid for sid, _ in result.drifted if sid not in held]
    marked = 0
    syncs = drifted + result.pending
    if syncs:
        # The drifted stop showing 'synced' together with the jobs that fix them (one
        # transaction, through the outbox: a kill between the two cannot strand either,
        # and the relay re-publishes a sync that was already running when it arrived).
        async with ctx.db.acquire() as conn, conn.transaction():
            await job.ensure_current()
            marked = await repo.mark_pending(conn, drifted)
            await outbox.add_many(
                conn,
                SYNC_SUBSCRIBER,
                [
                    (
                        {
                            "subscriber_id": sid,
                            "correlation_id": correlation,
                            "cause": "reconciliation",
                        },
                        sync_job_id(sid),
                    )
                    for sid in syncs
                ],
                bulk=True,
            )
    log.info(
        "router_reconciled",
        router_id=router["id"],
        drifted=len(result.drifted),
        marked_pending=marked,
        pending=len(result.pending),
        removed_unknown=len(orphans),
        held=len(held) + len(result.orphans) - len(orphans),
    )


async def expire_tenant(ctx: SyncContext, job: Job[ExpireTenant]) -> None:
    """Suspend the tenant's subscribers whose expiry (plus grace) has passed, per router."""
    tenant_id = job.payload.tenant_id
    tenant = await ctx.db.fetchrow(
        "SELECT id, grace_period, max_disconnect_share::float AS share, active"
        " FROM tenants WHERE id = $1",
        tenant_id,
    )
    if tenant is None:
        raise PermanentError(f"tenant {tenant_id} does not exist")
    if not tenant["active"]:
        raise TenantInactive(tenant_id)
    correlation = f"expire:{tenant_id}:{job.id}"
    rows = await ctx.db.fetch(
        """
        SELECT s.router_id, array_agg(s.id ORDER BY s.id) AS due,
               (SELECT count(*) FROM subscribers a WHERE a.router_id = s.router_id
                  AND a.deleted_at IS NULL) AS total,
               bool_or(r.guard_override_until > now()) AS overridden
        FROM subscribers s JOIN routers r ON r.id = s.router_id
        WHERE s.tenant_id = $1 AND s.deleted_at IS NULL AND NOT s.is_suspended
          AND s.expires_at IS NOT NULL AND s.expires_at + $2::interval <= now()
        GROUP BY s.router_id
        """,
        tenant_id,
        tenant["grace_period"],
    )
    tripped: list[int] = []
    for row in rows:
        reason = guard_verdict(
            ctx.settings.sync.guard_min_count,
            cutting=len(row["due"]),
            total=row["total"],
            share=tenant["share"],
            overridden=bool(row["overridden"]),
        )
        if reason:
            # The sweep only disconnects: all of it on this router waits for an operator.
            held = {
                "reason": reason,
                "would_disconnect": len(row["due"]),
                "subscribers": row["total"],
                "subscriber_ids": list(row["due"]),
                "changes": [
                    {"subscriber_id": sid, "commands": [{"action": "suspend (expired)"}]}
                    for sid in row["due"][:HELD_SHOWN]
                ],
                "remove_unknown": [],
            }
            await trip_guard(ctx, row["router_id"], "sweep", held, correlation)
            tripped.append(row["router_id"])
            continue
        async with ctx.db.acquire() as conn, conn.transaction():
            # Expiry is a UTC instant; the tenant's time zone plays no part here.
            suspended = await conn.fetch(
                """
                UPDATE subscribers SET is_suspended = true, suspension_reason = 'expired',
                    kick_required = true,
                    desired_version = desired_version + 1, sync_status = 'pending',
                    updated_at = now(), pending_correlations = pending_correlations || ARRAY[$3]
                WHERE id = ANY($1::bigint[]) AND NOT is_suspended AND deleted_at IS NULL
                  AND expires_at + $2::interval <= now()
                RETURNING id
                """,
                row["due"],
                tenant["grace_period"],
                correlation,
            )
            await outbox.add_many(
                conn,
                SYNC_SUBSCRIBER,
                [
                    (
                        {"subscriber_id": r["id"], "correlation_id": correlation, "cause": "sweep"},
                        sync_job_id(r["id"]),
                    )
                    for r in suspended
                ],
                bulk=True,
            )
        if suspended:
            log.info(
                "subscribers_expired",
                tenant_id=tenant_id,
                router_id=row["router_id"],
                count=len(suspended),
            )
    await release_guard(ctx, "sweep", tenant_id=tenant_id, keep=tripped)


async def router_facts(ctx: SyncContext, router: Any) -> None:
    """Pull one router's facts and its subscribers' sessions; mark it offline if silent."""
    try:
        async with ctx.routers.session(router_target(ctx, router)) as ros:
            res = await ros.resource()
            ppp = await ros.active_ppp(None)
            hs = await ros.active_hotspot(None)
            await wireless.poll_router(ctx.db, ros, router["id"], ppp, hs)
    except RouterError as exc:
        await ctx.circuit.failure(router["id"])
        await router_went_offline(ctx, router["id"], str(exc))
        return
    sessions = [("pppoe", a.get("name", ""), a.get("address"), a.get("uptime")) for a in ppp]
    sessions += [("hotspot", a.get("user", ""), a.get("address"), a.get("uptime")) for a in hs]
    cpu = res.get("cpu-load")
    if router["online"] is not True:
        await router_came_online(ctx, router["id"])
    await ctx.circuit.success(router["id"])
    rebooted = await repo.record_router_facts(
        ctx.db,
        router["id"],
        version=res.get("version"),
        uptime=res.get("uptime"),
        cpu_load=int(cpu) if cpu and cpu.isdigit() else None,
        sessions=sessions,
    )
    if rebooted:
        # A reboot keeps the configuration, a reset or a replacement does not; the
        # reconciliation queued with the facts tells which, now rather than at the timer.
        log.warning(
            "router_restarted",
            router_id=router["id"],
            uptime_before=router["uptime"],
            uptime=res.get("uptime"),
        )


FACTS_AT_ONCE = 20


async def all_router_facts(ctx: SyncContext) -> None:
    routers = await ctx.db.fetch(repo.ROUTER.replace("WHERE id = $1", ""))
    # Each router on its own: a silent one costs its own timeout, not the others'; a
    # bound keeps a network of hundreds of routers from opening hundreds of sockets.
    gate = asyncio.Semaphore(FACTS_AT_ONCE)

    async def one(router: Any) -> None:
        async with gate:
            await router_facts(ctx, router)

    await asyncio.gather(*(one(r) for r in routers))


async def enqueue_reconciliation(ctx: SyncContext) -> int:
    """One sync_router job per router of an active tenant, but those in maintenance."""
    routers = await ctx.db.fetch(
        "SELECT r.id FROM routers r JOIN tenants t ON t.id = r.tenant_id WHERE t.active"
        " AND (r.maintenance_until IS NULL OR r.maintenance_until <= now()) ORDER BY r.id"
    )
    for r in routers:
        await ctx.engine.producer.send(
            SYNC_ROUTER, {"router_id": r["id"]}, job_id=reconcile_job_id(r["id"])
        )
    return len(routers)


async def enqueue_expiry(ctx: SyncContext) -> int:
    """One expire_tenant job per active tenant (the seed's scheduler "finds active
    tenants")."""
    tenants = await ctx.db.fetch("SELECT id FROM tenants WHERE active ORDER BY id")
    for t in tenants:
        await ctx.engine.producer.send(
            EXPIRE_TENANT, {"tenant_id": t["id"]}, job_id=expire_job_id(t["id"])
        )
    return len(tenants)
