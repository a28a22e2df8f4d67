"""A batch's writes: removes, adds, then sets of every live subscriber, each wave sent
together as tagged commands, audited in one statement before and one after."""

from __future__ import annotations

from typing import Any, Literal

from imsys.errors import FencedOut, RetryableError
from imsys.routeros import AlreadyExists, RouterSession, RouterUnavailable
from imsys.routeros.session import Write
from imsys.sync import batch_repo
from imsys.sync.batch_item import Item, fence_items
from imsys.sync.context import SyncContext
from imsys.sync.desired import public_fields
from imsys.sync.handlers import audit_outcome

Phase = Literal["remove", "add", "set"]


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
        await fence_items(forget)
        await batch_repo.forget_passwords(ctx.db, [i.sub.id for i in forget if i.alive])
    phases: tuple[Phase, ...] = ("remove", "add", "set")
    for phase in phases:
        planned = [(i, w) for i in items if i.alive for w in _writes(i, phase)]
        if not planned:
            continue
        await fence_items(list({id(i): i for i, _ in planned}.values()))
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
            outcomes.append((row_ids, audit_outcome(result)))
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
