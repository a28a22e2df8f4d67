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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog

from imsys.errors import Deferred, FencedOut, PermanentError, RetryableError
from imsys.publisher import EventType
from imsys.routeros import AlreadyExists, RouterSession, RouterUnavailable
from imsys.routeros.menus import LOGIN_BY_SERVICE
from imsys.routeros.session import Write
from imsys.sync import batch_repo, repo
from imsys.sync.batcher import Pending
from imsys.sync.context import SyncContext
from imsys.sync.desired import Plan, marker, parse_marker, plan, public_fields
from imsys.sync.handlers import (
    Auditor,
    _blocked,
    end_sessions,
    router_session,
)
from imsys.sync.profiles import ensure_profile, names_profile

log = structlog.get_logger("imsys.sync")

# The fields a plan compares, and what finds an entry; nothing else is read.
PROPLIST = [".id", "name", "comment", "profile", "password", "disabled"]
Phase = Literal["remove", "add", "set"]


@dataclass(eq=False)
class Item:
    """One subscriber's run inside the batch."""

    pending: Pending
    sub: repo.SubscriberRow
    entries: dict[str, str] | None  # menu -> the router's .id, as the database knew them
    managed: dict[str, list[dict[str, str]]] = field(
        default_factory=lambda: {m: [] for m in LOGIN_BY_SERVICE.values()}
    )
    steps: Plan | None = None
    twin: dict[str, str] | None = None
    error: Exception | None = None
    kicked: bool = False
    password_digest: str | None = None
    _correlations: list[str] | None = None

    @property
    def job(self) -> Any:
        return self.pending.job

    @property
    def alive(self) -> bool:
        return self.error is None and self.twin is None

    def correlations(self) -> list[str]:
        if self._correlations is None:
            own = self.job.payload.correlation_id or f"job:{self.job.id}"
            self._correlations = list(dict.fromkeys([*self.sub.correlations, own]))
        return self._correlations

    def auditor(self, ctx: SyncContext) -> Auditor:
        return Auditor(
            ctx,
            self.job,
            correlations=self.correlations(),
            cause=self.job.payload.cause,
            tenant_id=self.sub.tenant_id,
            router_id=self.sub.router_id,
            subscriber_id=self.sub.id,
        )

    def learnt(self) -> dict[str, str]:
        """The router's ids of this subscriber's entries, as last seen in this run."""
        return {menu: rows[0][".id"] for menu, rows in self.managed.items() if rows}


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
        await _fence(items)
        current = [i for i in items if i.error is None]
        if current:
            await batch_repo.mark_syncing(conn, [(i.sub.id, i.sub.version) for i in current])
    for i in items:
        if i.error is not None:
            i.pending.fail(i.error)
    return current


async def find_entries(ros: RouterSession, items: list[Item], tag: str) -> None:
    """Every managed entry of the batch's subscribers, and the rows holding the names
    they need: by id and name (looked up), by comment only where the ids are unknown or
    stale."""
    by_id = {i.sub.id: i for i in items}
    unknown = [i for i in items if i.entries is None]
    looked: dict[str, list[dict[str, str]]] = {}
    for menu in LOGIN_BY_SERVICE.values():
        tests: list[tuple[str, str]] = []
        for i in items:
            if i.entries is not None and menu in i.entries:
                tests.append((".id", i.entries[menu]))
            if i.sub.desired.present and i.sub.desired.menu() == menu:
                tests.append(("name", i.sub.desired.username))
        looked[menu] = await ros.print_any(menu, tests, proplist=PROPLIST) if tests else []
    for menu, rows in looked.items():
        _assign(rows, menu, by_id, tag)
    stale = [
        i
        for i in items
        if i.entries is not None
        and any(
            all(row[".id"] != item_id for row in i.managed.get(menu, []))
            for menu, item_id in i.entries.items()
        )
    ]
    if stale:
        log.info("router_entry_ids_stale", router_id=items[0].sub.router_id, count=len(stale))
    rescan = [*unknown, *stale]
    if rescan:
        await _rescan(ros, rescan, tag)
    for i in items:
        i.entries = i.learnt()


async def _rescan(ros: RouterSession, rescan: list[Item], tag: str) -> None:
    """Find these subscribers' entries by comment: one (scanning) print per menu."""
    for i in rescan:
        i.managed = {m: [] for m in LOGIN_BY_SERVICE.values()}
    again = {i.sub.id: i for i in rescan}
    tests = [("comment", marker(tag, i.sub.id)) for i in rescan]
    for menu in LOGIN_BY_SERVICE.values():
        rows = await ros.print_any(menu, tests, proplist=PROPLIST)
        _assign(rows, menu, again, tag)


def _assign(
    rows: list[dict[str, str]], menu: str, items: dict[int, Item], tag: str
) -> None:
    """Give each managed row to its subscriber; a row holding the name a subscriber
    needs in that menu, managed for another or by no one, is that subscriber's twin."""
    wanting: dict[str, Item] = {
        i.sub.desired.username: i
        for i in items.values()
        if i.sub.desired.present and i.sub.desired.menu() == menu
    }
    for row in rows:
        sid = parse_marker(tag, row.get("comment"))
        item = items.get(sid) if sid is not None else None
        if item is not None and all(r[".id"] != row[".id"] for r in item.managed[menu]):
            item.managed[menu].append(row)
        other = wanting.get(row.get("name", ""))
        if other is not None and sid != other.sub.id and other.twin is None:
            other.twin = {"menu": menu, "id": row[".id"], "name": row.get("name", "")}


def plan_items(items: list[Item], tag: str) -> None:
    """Each subscriber's plan; a twin only blocks a subscriber whose plan adds an entry
    with its name (an existing managed entry is set, not added)."""
    for i in items:
        i.steps = plan(i.sub.desired, i.managed, tag)
        if i.twin is not None and not any(c.add is not None for c in i.steps.changes):
            i.twin = None


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


def _writes(i: Item, phase: Phase) -> list[tuple[Write, str, dict[str, Any]]]:
    """The item's writes of one phase, with their audit action and detail."""
    out: list[tuple[Write, str, dict[str, Any]]] = []
    guard = i.job.check_claim
    assert i.steps is not None
    for c in i.steps.changes:
        if phase == "remove":
            for item_id in c.remove:
                w = Write("remove", c.menu, item_id=item_id, guard=guard)
                out.append((w, f"remove {c.menu}", {"id": item_id}))
        elif phase == "add" and c.add is not None:
            w = Write("add", c.menu, c.add, guard=guard)
            out.append((w, f"add {c.menu}", public_fields(c.add)))
        elif phase == "set" and c.set and c.set_id is not None:
            w = Write("set", c.menu, c.set, item_id=c.set_id, guard=guard)
            out.append((w, f"set {c.menu}", {"id": c.set_id, **public_fields(c.set)}))
    return out


async def apply_waves(ctx: SyncContext, ros: RouterSession, items: list[Item]) -> int:
    """Removes, adds, then sets of every live subscriber, each wave sent together.
    Returns the writes sent."""
    sent = 0
    forget = [
        i
        for i in items
        if i.alive
        and i.steps is not None
        and i.steps.writes_password
        and i.sub.desired.written_password is not None
    ]
    if forget:
        await _fence(forget)
        await batch_repo.forget_passwords(ctx.db, [i.sub.id for i in forget if i.alive])
    phases: tuple[Phase, ...] = ("remove", "add", "set")
    for phase in phases:
        planned = [(i, w) for i in items if i.alive for w in _writes(i, phase)]
        if not planned:
            continue
        await _fence(list({id(i): i for i, _ in planned}.values()))
        planned = [(i, w) for i, w in planned if i.alive]
        if not planned:
            continue
        intents = [
            batch_repo.Intent(
                i.correlations(), i.job.payload.cause, i.sub.tenant_id, i.sub.router_id,
                i.sub.id, action, detail,
            )
            for i, (_, action, detail) in planned
        ]
        ids = await batch_repo.audit_intents(ctx.db, intents)
        results = await ros.write_many([w for _, (w, _, _) in planned])
        outcomes: list[tuple[list[int], str | None]] = []
        lost: RouterUnavailable | None = None
        for (i, (w, _, _)), row_ids, result in zip(planned, ids, results, strict=True):
            outcomes.append((row_ids, _outcome(result)))
            if isinstance(result, FencedOut):
                i.error = result
            elif isinstance(result, RouterUnavailable):
                lost = lost or result
                i.error = result
            elif isinstance(result, AlreadyExists) and w.action == "add":
                # The read found no entry with that name a moment ago: one appeared
                # meanwhile (a hand edit, a router script). The next run reads again
                # and decides (managed, or a twin that blocks).
                i.error = i.error or RetryableError(
                    f"{result}; the entry appeared after this sync read the router"
                )
            elif isinstance(result, Exception):
                i.error = i.error or result
            else:
                sent += 1
                _learn(i, w, result)
        await batch_repo.audit_outcomes(ctx.db, outcomes)
        if lost is not None:
            raise lost  # the router is gone: router_session defers every job
    for i in items:
        if i.alive and i.steps is not None and i.steps.password_digest is not None:
            i.password_digest = i.steps.password_digest
    return sent


def _outcome(result: str | Exception) -> str | None:
    if isinstance(result, FencedOut):
        return None  # never sent: the row goes
    if isinstance(result, RouterUnavailable):
        prefix = "unknown: connection lost after sending" if result.maybe_applied else "failed"
        return f"{prefix}: {result}"
    if isinstance(result, Exception):
        return f"failed: {result}"
    return "ok"


def _learn(i: Item, w: Write, result: str) -> None:
    """Keep the ids of the managed entries up to date with what was just written."""
    if i.entries is None:
        return
    if w.action == "add" and result:
        i.entries[w.menu] = result
    elif w.action == "remove" and i.entries.get(w.menu) == w.item_id:
        rest = [r[".id"] for r in i.managed.get(w.menu, []) if r[".id"] != w.item_id]
        if rest:
            i.entries[w.menu] = rest[0]
        else:
            i.entries.pop(w.menu, None)


async def _fence(items: list[Item]) -> None:
    """Check each job's claim before its writes; a job that lost it sends nothing."""
    for i in items:
        try:
            await i.job.ensure_current()
        except FencedOut as exc:
            i.error = exc


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
        await _fence(rest)
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
