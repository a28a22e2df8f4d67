"""Fencing in sync: a run whose claim another process took makes no more side effects.

The stale delivery is real: the entry is read by one consumer, claimed by another with
XCLAIM, and the stale run's fence asks XPENDING who owns it now (the check the engine
makes). No router write, no status, no backend event comes from the stale run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from imsys.errors import FencedOut
from imsys.streams.job import Job
from imsys.streams.keys import GROUP
from imsys.sync import batch
from imsys.sync.context import SyncContext
from imsys.sync.handlers import reboot_router, sync_subscriber
from imsys.sync.jobs import RouterJob, SyncSubscriber
from imsys.sync.reconcile import sync_router
from tests.sync_support import Stack

SECRET = "/ppp/secret"

Fence = Callable[[Job[Any]], Awaitable[None]]


async def lost(job: Job[Any]) -> None:
    """A fence whose claim is gone from the start."""
    raise FencedOut(f"entry {job.id} belongs to another process")


def a_job(payload: Any, type_: str, fence: Fence | None, entry_id: str = "0-1") -> Job[Any]:
    return Job(
        stream="sync",
        id=entry_id,
        type=type_,
        payload=payload,
        attempt=1,
        job_id=None,
        enqueued_at=None,
        fields={},
        fence=fence,
    )


def owner_fence(
    stack: Stack, consumer: str, before: Callable[[], Awaitable[None]], at: int = 1
) -> Fence:
    """The engine's check: this consumer still owns the entry at this delivery count.

    ``before`` runs at the ``at``-th check only: the moment the process froze.
    """
    frozen = [before]
    checks = 0

    async def fence(job: Job[Any]) -> None:
        nonlocal checks
        checks += 1
        if frozen and checks == at:
            await frozen.pop()()
        key = stack.engine.keys.stream("sync")
        [pending] = await stack.deps.redis.xpending_range(
            key, GROUP, min=job.id, max=job.id, count=1
        )
        if pending["consumer"] != consumer or pending["times_delivered"] != job.delivery:
            raise FencedOut(f"entry {job.id} was claimed by {pending['consumer']}")

    return fence


async def events(stack: Stack, type_: str, subscriber_id: int) -> int:
    entries = await stack.deps.redis.xrange(stack.deps.events.key)
    return sum(
        1
        for _, f in entries
        if f["type"] == type_ and orjson.loads(f["payload"]).get("subscriber_id") == subscriber_id
    )


async def audit_rows(stack: Stack, subscriber_id: int) -> list[tuple[str, str]]:
    rows = await stack.db.fetch(
        "SELECT action, outcome FROM audit_log WHERE subscriber_id = $1 ORDER BY id",
        subscriber_id,
    )
    return [(r["action"], r["outcome"]) for r in rows]


@pytest.mark.parametrize("freeze_at", ["before_the_add", "before_the_twin_check"])
async def test_stale_run_after_another_claim_writes_nothing_and_no_false_error(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, freeze_at: str
) -> None:
    """A run frozen mid-job while another process claims and syncs the subscriber sends no
    stale add and writes no 'error' over the other's 'synced'."""
    sid = await stack.add_subscriber("stale")
    await stack.relay.relay_once()
    key = stack.engine.keys.stream("sync")
    [(_, [(entry_id, fields)])] = await stack.deps.redis.xreadgroup(
        GROUP, "stale-a", {key: ">"}, count=1
    )
    registry = stack.engine.registry

    async def other_process_takes_over() -> None:
        await stack.deps.redis.xclaim(key, GROUP, "other-b", 0, [entry_id])
        _, job_b = registry.parse("sync", entry_id, fields)
        job_b.delivery = 2
        # Another process: its own router connections and its own batches.
        other = SyncContext.build(stack.deps)
        try:
            await sync_subscriber(other, job_b)
        finally:
            await other.close()

    if freeze_at == "before_the_twin_check":
        # Frozen right after reading the router: the other run's entry then appears
        # after this run looked (a false twin error, or a second add).
        original = batch.find_entries
        frozen = [other_process_takes_over]

        async def read_then_freeze(ros: Any, items: Any, tag: str) -> None:
            await original(ros, items, tag)
            if frozen:  # the other process's own run passes straight through
                await frozen.pop()()

        monkeypatch.setattr(batch, "find_entries", read_then_freeze)
        fence = owner_fence(stack, "stale-a", before=_nothing)
    else:
        # The first check marks it syncing; the second comes right before the add.
        fence = owner_fence(stack, "stale-a", before=other_process_takes_over, at=2)
    _, job_a = registry.parse("sync", entry_id, fields)
    job_a.fence = fence

    with pytest.raises(FencedOut):
        await sync_subscriber(stack.sync, job_a)

    assert [e["name"] for e in stack.sim.items(SECRET)] == ["stale"]
    assert stack.sim.writes[SECRET] == 1
    row = await stack.subscriber(sid)
    assert (row["sync_status"], row["sync_error"]) == ("synced", None)
    assert await audit_rows(stack, sid) == [(f"add {SECRET}", "ok")]
    assert await events(stack, "subscriber_sync_failed", sid) == 0
    assert await events(stack, "subscriber_synced", sid) == 1


async def _nothing() -> None:
    return None


async def test_fenced_out_before_the_first_write_changes_nothing(stack: Stack) -> None:
    """A sync whose claim is gone sends no router write, writes no status, audit row or event."""
    sid = await stack.add_subscriber("fenced")
    job = a_job(SyncSubscriber(subscriber_id=sid), "sync_subscriber", lost)
    with pytest.raises(FencedOut):
        await sync_subscriber(stack.sync, job)
    assert stack.sim.items(SECRET) == []
    assert sum(stack.sim.writes.values()) == 0
    assert (await stack.subscriber(sid))["sync_status"] == "pending"
    assert await audit_rows(stack, sid) == []
    assert await events(stack, "subscriber_sync_failed", sid) == 0


async def test_fenced_out_at_the_status_write_marks_nothing(stack: Stack) -> None:
    """A run whose claim is lost after its router write leaves the status as it set it
    when it started (`syncing`: the run that holds the job now writes the outcome) and
    publishes no 'subscriber_synced' (the current run will say it)."""
    sid = await stack.add_subscriber("late")
    checks = 0

    async def lost_after_the_add(job: Job[Any]) -> None:
        nonlocal checks
        checks += 1
        if checks > 2:
            raise FencedOut("claimed by another process after the add")

    job = a_job(SyncSubscriber(subscriber_id=sid), "sync_subscriber", lost_after_the_add)
    with pytest.raises(FencedOut):
        await sync_subscriber(stack.sync, job)
    assert checks == 3  # marking it syncing, before the add, inside the status transaction
    assert [e["name"] for e in stack.sim.items(SECRET)] == ["late"]
    assert (await stack.subscriber(sid))["sync_status"] == "syncing"
    assert await events(stack, "subscriber_synced", sid) == 0


async def test_fenced_out_at_the_error_write_marks_no_error(stack: Stack) -> None:
    """A failing run whose claim is gone writes no 'error' and publishes no failure."""
    stack.sim.add_item(SECRET, name="twin", password="hand", profile="default")
    sid = await stack.add_subscriber("twin")
    job = a_job(SyncSubscriber(subscriber_id=sid), "sync_subscriber", lost)
    with pytest.raises(FencedOut):
        await sync_subscriber(stack.sync, job)
    row = await stack.subscriber(sid)
    assert (row["sync_status"], row["sync_error"]) == ("pending", None)
    assert await events(stack, "subscriber_sync_failed", sid) == 0


async def test_fenced_reconciliation_removes_nothing_and_marks_nothing(stack: Stack) -> None:
    """A stale reconciliation removes no unknown entry, marks no subscriber pending and
    queues nothing."""
    sid = await stack.add_subscriber("drift")
    await stack.settle()
    stack.sim.state.execute(SECRET, "remove", {".id": stack.secrets()["drift"][".id"]}, [])
    stack.sim.add_item(SECRET, name="ghost", password="x", profile="basic", comment="imsys:sub=0")
    job = a_job(RouterJob(router_id=stack.router_id), "sync_router", lost)
    with pytest.raises(FencedOut):
        await sync_router(stack.sync, job)
    assert list(stack.secrets()) == ["ghost"]
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
    assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_fenced_reconciliation_without_orphans_marks_nothing(stack: Stack) -> None:
    """The pending marks and queued syncs of reconciliation are fenced too."""
    sid = await stack.add_subscriber("drift2")
    await stack.settle()
    stack.sim.state.execute(SECRET, "remove", {".id": stack.secrets()["drift2"][".id"]}, [])
    job = a_job(RouterJob(router_id=stack.router_id), "sync_router", lost)
    with pytest.raises(FencedOut):
        await sync_router(stack.sync, job)
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
    assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_fenced_reboot_sends_no_reboot(stack: Stack) -> None:
    """A stale reboot_router run does not reboot the router."""
    boots = stack.sim.boots
    job = a_job(RouterJob(router_id=stack.router_id), "reboot_router", lost)
    with pytest.raises(FencedOut):
        await reboot_router(stack.sync, job)
    assert stack.sim.boots == boots
    assert not any("/system/reboot" in " ".join(c.words) for c in stack.sim.commands)
