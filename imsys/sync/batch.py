"""One batch of ``sync_subscriber`` jobs for one router, over one connection.

1. Load every subscriber of the batch (one query).
2. Find their entries: one print per login menu for the whole batch, by the `.id`s
   the database keeps (``subscribers.router_entries``) and by name (for twins, and for
   an add whose reply was lost); by comment (a scan) only for subscribers whose ids are
   unknown, or whose kept id turned out stale (a reset renumbered the menu): re-learnt.
3. Plan each subscriber (``desired.plan``), as a single sync would.
4. Send the writes together, tagged, in three waves (removes, adds, sets: a
   subscriber's own commands keep that order; different subscribers' are independent),
   each audited before it is sent (one insert) and completed after (one update).
5. End the sessions that need it, then record everything in one transaction and
   publish the events.

A failure of one subscriber (a trap, a refused fence, a session that survives its kick)
fails that subscriber's job alone; the others' results stand. Losing the router fails
the batch the way it fails a single job: every job deferred, the router shown offline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from imsys.errors import Deferred, FencedOut, PermanentError, RetryableError
from imsys.publisher import EventType
from imsys.routeros import RouterSession, RouterUnavailable
from imsys.sync import batch_repo, repo
from imsys.sync.batch_item import Item, fence_items
from imsys.sync.batch_lookup import find_entries, plan_items
from imsys.sync.batch_writes import apply_waves
from imsys.sync.batcher import Pending
from imsys.sync.context import SyncContext
from imsys.sync.handlers import _blocked, end_sessions, router_session
from imsys.sync.profiles import ensure_profile, names_profile

log = structlog.get_logger("imsys.sync")


async def sync_batch(ctx: SyncContext, router_id: int, batch: Sequence[Pending]) -> None:
    """Run the batch; every job's future is settled on return."""
    started = time.perf_counter()
    subs = await batch_repo.load_subscribers(ctx.db, [p.subscriber_id for p in batch])
    router = await repo.load_router(ctx.db, router_id)
    items: list[Item] = []
    for p in batch:
        sub = subs.get(p.subscriber_id)
        if sub is None:
            p.fail(PermanentError(f"subscriber {p.subscriber_id} does not exist"))
        elif router is None:
            p.fail(PermanentError(f"router {router_id} of subscriber {sub.id} does not exist"))
        elif sub.router_id != router_id:
            p.fail(Deferred(f"subscriber {sub.id} moved to router {sub.router_id}", delay=0))
        else:
            items.append(Item(p, sub, sub.entries))
    if not items:
        return
    items = await _start(ctx, items)
    if not items:
        return
    tag = ctx.settings.sync.comment_tag
    writes = 0
    # Where the batch's time went, for its log line: database before, router, after.
    marks = [time.perf_counter()]
    try:
        async with router_session(ctx, router) as ros:
            await find_entries(ros, items, tag)
            plan_items(items, tag)
            await ensure_profiles(ctx, ros, items, tag)
            writes = await apply_waves(ctx, ros, items)
            await end_all_sessions(ctx, ros, items)
        marks.append(time.perf_counter())
    except Deferred as exc:
        await _forget_uncertain(ctx, items)
        waiting = [(i.sub.id, i.sub.version, i.job.attempt) for i in items]
        await batch_repo.mark_retrying(ctx.db, waiting, str(exc), exc.delay or 0.0)
        for item in items:
            item.pending.fail(exc)
        return
    await settle(ctx, items)
    marks.append(time.perf_counter())
    log.info(
        "sync_batch",
        router_id=router_id,
        subscribers=len(items),
        writes=writes,
        failed=sum(1 for i in items if i.error is not None),
        duration_s=round(marks[-1] - started, 4),
        load_s=round(marks[0] - started, 4),
        router_s=round(marks[1] - marks[0], 4),
        record_s=round(marks[2] - marks[1], 4),
    )


async def _start(ctx: SyncContext, items: list[Item]) -> list[Item]:
    """Mark the subscribers `syncing`, locked and fenced as the final status is: a run
    whose claim another process took writes no status (it fails with FencedOut here)."""
    async with ctx.db.acquire() as conn, conn.transaction():
        await batch_repo.lock_versions(conn, [i.sub.id for i in items])
        await fence_items(items)
        current = [i for i in items if i.error is None]
        if current:
            await batch_repo.mark_syncing(conn, [(i.sub.id, i.sub.version) for i in current])
    for i in items:
        if i.error is not None:
            i.pending.fail(i.error)
    return current


async def ensure_profiles(
    ctx: SyncContext, ros: RouterSession, items: list[Item], tag: str
) -> None:
    """The profile of every package a login is about to name, once per profile."""
    done: dict[tuple[str, str], Exception | None] = {}
    for i in items:
        desired = i.sub.desired
        if not i.alive or not desired.present or i.steps is None:
            continue
        if not (i.sub.kick_required or names_profile(i.steps)):
            continue
        key = (desired.service, desired.profile)
        if key not in done:
            ros.guard = i.job.check_claim
            try:
                await ensure_profile(ctx.db, ros, i.sub.id, desired.service, tag, i.auditor(ctx))
                done[key] = None
            except RouterUnavailable:
                raise
            except (PermanentError, RetryableError, FencedOut) as exc:
                done[key] = exc
            finally:
                ros.guard = None
        i.error = done[key]


async def end_all_sessions(ctx: SyncContext, ros: RouterSession, items: list[Item]) -> None:
    """Kick the sessions of the subscribers whose change needs it, one by one."""
    for i in items:
        if not i.alive or not (i.sub.kick_required or i.sub.desired.disabled):
            continue
        ros.guard = i.job.check_claim
        try:
            await end_sessions(ros, i.sub.desired.username, i.auditor(ctx))
            i.kicked = True
        except RouterUnavailable:
            raise
        except (PermanentError, RetryableError, FencedOut) as exc:
            i.error = exc
        finally:
            ros.guard = None


async def _forget_uncertain(ctx: SyncContext, items: list[Item]) -> None:
    """After losing the router mid-batch: ids may be wrong where a write was maybe
    applied; the next sync looks for those entries by comment."""
    uncertain = [
        i.sub.id
        for i in items
        if isinstance(i.error, RouterUnavailable) and i.error.maybe_applied
    ]
    if uncertain:
        await batch_repo.forget_entries(ctx.db, uncertain)


def retry_in(ctx: SyncContext, i: Item) -> float | None:
    """Seconds until the failed subscriber's job runs again, or None when it will not
    (a permanent failure, or its last attempt: the error stands). The delay is fixed
    here and handed to the engine with the error, so the time shown is the time used."""
    err = i.error
    if not isinstance(err, RetryableError) or i.job.last_attempt:
        return None
    if err.defer is None:
        err.defer = ctx.settings.streams["sync"].retry_delay(i.job.attempt)
    return err.defer


async def settle(ctx: SyncContext, items: list[Item]) -> None:
    """Record the batch (one transaction), publish its events, settle every job."""
    for i in items:
        if i.error is not None or i.twin is None:
            continue
        try:
            await _blocked(ctx, i.job, i.sub, i.twin)
            i.pending.succeed()
        except Exception as exc:
            i.pending.fail(exc)
    rest = [i for i in items if i.twin is None or i.error is not None]
    for i in rest:
        if isinstance(i.error, FencedOut):
            i.pending.fail(i.error)
    rest = [i for i in rest if not isinstance(i.error, FencedOut)]
    if not rest:
        return
    async with ctx.db.acquire() as conn, conn.transaction():
        await batch_repo.lock_versions(conn, [i.sub.id for i in rest])
        await fence_items(rest)
        for i in rest:
            if isinstance(i.error, FencedOut):
                i.pending.fail(i.error)
        rest = [i for i in rest if not isinstance(i.error, FencedOut)]
        current = await batch_repo.record(
            conn,
            [
                batch_repo.Outcome(
                    subscriber_id=i.sub.id,
                    version=i.sub.version,
                    error=None if i.error is None else str(i.error),
                    kicked=i.kicked,
                    entries=i.entries,
                    password_digest=i.password_digest,
                    attempt=i.job.attempt,
                    retry_in=retry_in(ctx, i),
                )
                for i in rest
            ],
        )
    events: list[tuple[EventType, dict[str, Any]]] = []
    for i in rest:
        if i.error is not None:
            delay = retry_in(ctx, i)
            next_at = None if delay is None else datetime.now(UTC) + timedelta(seconds=delay)
            events.append(
                (
                    "subscriber_sync_failed",
                    {
                        "subscriber_id": i.sub.id,
                        "router_id": i.sub.router_id,
                        "error": str(i.error),
                        "attempt": i.job.attempt,
                        "status": "error" if delay is None else "retrying",
                        "next_attempt_at": None if next_at is None else next_at.isoformat(),
                    },
                )
            )
            i.pending.fail(i.error)
        elif i.sub.id not in current:
            i.pending.fail(Deferred(f"subscriber {i.sub.id} changed during its sync", delay=0.05))
        else:
            changed = [d["action"] for d in i.steps.describe()] if i.steps else []
            events.append(("subscriber_synced", {
                "subscriber_id": i.sub.id,
                "router_id": i.sub.router_id,
                "changed": changed,
                "kicked": i.kicked,
            }))
            # The batch's own line (sync_batch) is the info one; this is for tracing.
            log.debug(
                "subscriber_synced",
                subscriber_id=i.sub.id,
                router_id=i.sub.router_id,
                changed=changed,
                kicked=i.kicked,
            )
            i.pending.succeed()
    await ctx.events.publish_many(events)
