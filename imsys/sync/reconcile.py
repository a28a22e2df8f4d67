"""Reconciliation, the expiry sweep and router facts: finding drift, never forcing it.

Reconciliation reads each menu once, diffs against the database and enqueues the same
``sync_subscriber`` job for every drifted subscriber; managed entries the database no
longer knows are removed. The mass-disconnect guard holds the disconnections of a sweep
or reconciliation that would cut off too many of one router's subscribers at once; the
rest of the work (new subscribers, reconnects, package changes) goes ahead. What it holds
is kept on the router row (``guard_held``, per cause) for the dashboard and the API until
an operator confirms, and announced once as the backend event ``router_guard_tripped``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import structlog

from imsys import outbox
from imsys.deps import Deps
from imsys.errors import PermanentError
from imsys.routeros import RouterError
from imsys.routeros.menus import LOGIN_BY_SERVICE
from imsys.streams.job import Job
from imsys.sync import repo, wireless
from imsys.sync.context import SyncContext
from imsys.sync.desired import Plan, parse_marker, plan
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
from imsys.sync.profile_job import align_router_profiles

log = structlog.get_logger("imsys.sync")

# Commands of held changes kept on the router row (the ids are always kept in full).
HELD_SHOWN = 50


@dataclass
class RouterPlan:
    """What reconciliation would do on one router."""

    router_id: int
    managed_entries: int
    subscribers: int
    drifted: list[tuple[int, Plan]] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    # Subscribers with a change of their own on its way (sync_status 'pending'): their
    # job carries it out whatever reconciliation decides, so the guard does not count it.
    intended: set[int] = field(default_factory=set)
    orphans: list[tuple[str, str, str]] = field(default_factory=list)  # (menu, id, name)
    # Subscribers an unmanaged twin still blocks: left alone until they change or the
    # router is adopted (``sync.adopt``).
    blocked: list[int] = field(default_factory=list)
    guard: str | None = None

    def cuts(self) -> list[tuple[int, Plan]]:
        """The drift that would cut a subscriber off, not counting those with a change of
        their own on its way (the guard's business)."""
        return [(sid, p) for sid, p in self.drifted if p.disables and sid not in self.intended]

    def cutting(self) -> int:
        return len(self.cuts()) + len(self.orphans)

    def held(self) -> dict[str, Any]:
        """What a tripped guard holds: the disconnections only (ids in full, commands of
        the first HELD_SHOWN, enough for an operator to judge)."""
        cuts = self.cuts()
        return {
            "reason": self.guard,
            "would_disconnect": self.cutting(),
            "subscribers": max(self.subscribers, self.managed_entries),
            "subscriber_ids": [sid for sid, _ in cuts],
            "changes": [
                {"subscriber_id": sid, "commands": p.describe()} for sid, p in cuts[:HELD_SHOWN]
            ],
            "remove_unknown": [
                {"menu": m, "id": i, "name": n} for m, i, n in self.orphans[:HELD_SHOWN]
            ],
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "router_id": self.router_id,
            "subscribers": self.subscribers,
            "managed_entries": self.managed_entries,
            "changes": [
                {"subscriber_id": sid, "commands": p.describe()} for sid, p in self.drifted
            ],
            "pending_syncs": self.pending,
            "blocked": self.blocked,
            "remove_unknown": [{"menu": m, "id": i, "name": n} for m, i, n in self.orphans],
            "would_disconnect": self.cutting(),
            "guard": self.guard,
        }


def guard_verdict(
    ctx: SyncContext, *, cutting: int, total: int, share: float, overridden: bool
) -> str | None:
    """Why the guard stops this change, or None when it may go ahead."""
    if overridden or cutting <= ctx.settings.sync.guard_min_count:
        return None
    if cutting > share * max(total, 1):
        return (
            f"would cut off {cutting} of {total} subscribers "
            f"(over {share:.0%}); an operator must confirm"
        )
    return None


async def build_plan(ctx: SyncContext, router: Any) -> RouterPlan:
    tag = ctx.settings.sync.comment_tag
    subs = {s.id: s for s in await repo.router_subscribers(ctx.db, router["id"])}
    async with router_session(ctx, router) as ros:
        menus = {menu: await ros.print(menu) for menu in LOGIN_BY_SERVICE.values()}
    found: dict[int, dict[str, list[dict[str, str]]]] = {}
    unmanaged = {
        (menu, str(e.get("name", "")))
        for menu, entries in menus.items()
        for e in entries
        if parse_marker(tag, e.get("comment")) is None
    }
    result = RouterPlan(router["id"], 0, sum(1 for s in subs.values() if s.desired.present))
    for menu, entries in menus.items():
        for entry in entries:
            sid = parse_marker(tag, entry.get("comment"))
            if sid is None:
                continue  # not ours: never touched
            result.managed_entries += 1
            if sid not in subs:
                result.orphans.append((menu, entry[".id"], entry.get("name", "")))
            else:
                found.setdefault(sid, {m: [] for m in LOGIN_BY_SERVICE.values()})[menu].append(
                    entry
                )
    for sid, sub in subs.items():
        if sub.blocked and (sub.desired.menu(), sub.desired.username) in unmanaged:
            result.blocked.append(sid)  # nothing changed since its sync said so
            continue
        if sub.sync_status == "pending":
            result.intended.add(sid)
        managed = found.get(sid, {m: [] for m in LOGIN_BY_SERVICE.values()})
        p = plan(sub.desired, managed, tag)
        if not p.empty:
            result.drifted.append((sid, p))
        elif sub.sync_status != "synced" or sub.kick_required:
            result.pending.append(sid)
    tenant_share = await ctx.db.fetchval(
        "SELECT max_disconnect_share::float FROM tenants WHERE id = $1", router["tenant_id"]
    )
    result.guard = guard_verdict(
        ctx,
        cutting=result.cutting(),
        total=max(result.subscribers, result.managed_entries),
        share=tenant_share,
        overridden=bool(router["guard_overridden"]),
    )
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
    # Profiles first: drifted rates re-set, missing ones added, unused orphans removed.
    await align_router_profiles(ctx, router, job, correlation, "reconciliation")
    result = await build_plan(ctx, router)
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
        audit = Auditor(
            ctx,
            job,
            correlations=[correlation],
            cause="reconciliation",
            tenant_id=router["tenant_id"],
            router_id=router["id"],
            subscriber_id=None,
        )
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
        "SELECT id, grace_period, max_disconnect_share::float AS share FROM tenants WHERE id = $1",
        tenant_id,
    )
    if tenant is None:
        raise PermanentError(f"tenant {tenant_id} does not exist")
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
            ctx,
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
    routers = await ctx.db.fetch("SELECT id FROM routers ORDER BY id")
    for r in routers:
        await ctx.engine.producer.send(
            SYNC_ROUTER, {"router_id": r["id"]}, job_id=reconcile_job_id(r["id"])
        )
    return len(routers)


async def enqueue_expiry(ctx: SyncContext) -> int:
    tenants = await ctx.db.fetch("SELECT id FROM tenants ORDER BY id")
    for t in tenants:
        await ctx.engine.producer.send(
            EXPIRE_TENANT, {"tenant_id": t["id"]}, job_id=expire_job_id(t["id"])
        )
    return len(tenants)
