"""Bouncer faults at batch creation: 429, 402, 5xx, a lost answer, a process dying between
intent and call. Nothing lost, nothing stuck, nothing counted twice."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from imsys.bouncer import repo
from imsys.bouncer.creator import _send, release_stale
from imsys.settings import Settings
from imsys.sim.bouncer import BouncerSimulator
from tests.bouncer_support import BouncerStack, addresses, bouncer_stack


@pytest.fixture
async def bs(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[BouncerStack]:
    async with bouncer_stack(settings, redis, db, capacity=3, batch_size=10) as stack:
        yield stack


async def assert_each_email_once(bs: BouncerStack, emails: list[str]) -> None:
    """Every e-mail is done, in exactly one of our batches, which was downloaded; among the
    Bouncer batches we know of, each e-mail was sent exactly once."""
    rows = await bs.db.fetch(
        "SELECT e.email, e.status, b.status AS batch_status, b.bouncer_batch_id"
        " FROM user_batch_emails e LEFT JOIN bouncer_batches b ON b.id = e.bouncer_batch_id")
    assert sorted(r["email"] for r in rows) == sorted(emails)
    assert {(r["status"], r["batch_status"]) for r in rows} == {("done", "downloaded")}
    known = {r["bouncer_batch_id"] for r in rows}
    sent = [e for b in bs.sim.batches() if b.batch_id in known for e in b.emails]
    assert sorted(sent) == sorted(emails)
    for user_batch in await bs.db.fetch("SELECT * FROM user_batches"):
        assert (user_batch["status"], user_batch["processed"]) == ("completed",
                                                                   user_batch["total"])


Fault = Callable[[BouncerSimulator], None]


@pytest.mark.parametrize(
    ("fault", "http_status", "ends_cycle"),
    [
        (lambda sim: sim.rate_limit_next(endpoint="create"), 429, True),
        (lambda sim: sim.payment_required_next(endpoint="create"), 402, True),
        (lambda sim: sim.server_error_next(endpoint="create"), 500, False),
        (lambda sim: sim.server_error_next(status=503, endpoint="create"), 503, False),
    ],
    ids=["429", "402", "500", "503"],
)
async def test_failed_create_leaves_emails_pending(
    bs: BouncerStack, fault: Fault, http_status: int, ends_cycle: bool
) -> None:
    """A create answered 429/402/5xx puts its e-mails back to pending, not sent again in
    this cycle; 429 and 402 end the cycle, a 5xx lets it go on with the other e-mails;
    in the end each is verified exactly once."""
    emails = addresses("u", 25)
    await bs.submit(emails)
    fault(bs.sim)
    with capture_logs() as logs:
        result = await bs.create()
    [failed] = [e for e in logs if e["event"] == "bouncer_create_failed"]
    assert (failed["http_status"], failed["released"], failed["maybe_charged"]) == (
        http_status, 10, False)
    abandoned = (await bs.batches())[0]
    assert (abandoned["status"], abandoned["bouncer_batch_id"]) == ("abandoned", None)
    assert result.failed == [abandoned["id"]]
    if ends_cycle:
        assert (result.created, result.stopped) == ([], "failed")
        assert (await bs.statuses()) == {"pending": 25}
        assert bs.sim.calls["create"] == 1
    else:
        # The other 15 went out in two batches; the 10 released wait for the next cycle.
        assert (len(result.created), result.stopped) == (2, "slots")
        assert (await bs.statuses()) == {"pending": 10, "assigned": 15}
        assert bs.sim.calls["create"] == 3
    await bs.run_to_end()
    await assert_each_email_once(bs, emails)


async def test_lost_create_answer_loses_and_doubles_nothing(bs: BouncerStack) -> None:
    """Bouncer makes the batch but the answer never arrives: the batch is abandoned (it may
    be charged), its e-mails go out again in a batch we track, and each ends done once."""
    emails = addresses("u", 25)
    await bs.submit(emails)
    bs.sim.lose_create_response()
    with capture_logs() as logs:
        result = await bs.create()
    assert (len(result.failed), len(result.created)) == (1, 2)
    [failed] = [e for e in logs if e["event"] == "bouncer_create_failed"]
    assert (failed["maybe_charged"], failed["released"]) == (True, 10)
    lost = bs.sim.batches()[0]
    assert lost.response_lost
    assert (await bs.statuses()) == {"pending": 10, "assigned": 15}
    await bs.run_to_end()
    await assert_each_email_once(bs, emails)
    # Bouncer holds the lost batch too (charged), but nothing of ours points at it.
    assert bs.sim.creations == 4
    assert len(lost.emails) == 10
    assert await bs.db.fetchval(
        "SELECT count(*) FROM bouncer_batches WHERE bouncer_batch_id = $1", lost.batch_id) == 0


async def test_every_fault_in_one_run(bs: BouncerStack) -> None:
    """429, 402, 500, a lost answer and a failed status call in turn: the work still ends
    with every e-mail verified once in a batch we know."""
    emails = addresses("a", 40) + addresses("b", 33)
    await bs.submit(emails[:40])
    await bs.submit(emails[40:])
    faults: list[Fault] = [
        lambda sim: sim.rate_limit_next(endpoint="create"),
        lambda sim: sim.payment_required_next(endpoint="create"),
        lambda sim: sim.lose_create_response(),
        lambda sim: sim.server_error_next(endpoint="create"),
        lambda sim: sim.server_error_next(endpoint="status"),
    ]
    for fault in faults:
        fault(bs.sim)
        await bs.create()
        bs.sim.complete_all()
        await bs.check()
        await bs.download()
    await bs.run_to_end()
    await assert_each_email_once(bs, emails)
    assert Counter(b["status"] for b in await bs.batches())["abandoned"] == 4


async def test_process_dying_between_intent_and_call(bs: BouncerStack) -> None:
    """An intent whose process died before calling holds its e-mails and its slot until
    creating_timeout_s; then they are released and sent by the next cycle."""
    emails = addresses("u", 10)
    await bs.submit(emails)
    async with bs.db.acquire() as conn:
        claim = await repo.claim_batch(conn, bs.ctx.limiter, "deliverable", capacity=3, size=10)
    assert isinstance(claim, repo.Claimed)
    # ... and the process dies here. The next cycle sees nothing to send, no slot lost yet.
    assert (await bs.create()).stopped == "empty"
    assert (await bs.statuses()) == {"assigned": 10}
    await bs.db.execute(
        "UPDATE bouncer_batches SET created_at = now() - interval '10 minutes' WHERE id = $1",
        claim.id)
    with capture_logs() as logs:
        result = await bs.create()
    assert (result.released, len(result.created)) == (10, 1)
    assert [e["released"] for e in logs if e["event"] == "bouncer_create_given_up"] == [10]
    await bs.run_to_end()
    await assert_each_email_once(bs, emails)
    assert bs.sim.creations == 1


async def test_answer_after_give_up_is_an_orphan_whose_results_are_ignored(
    bs: BouncerStack,
) -> None:
    """A create answered only after its intent was given up is logged as orphaned; its
    e-mails stay pending for a tracked batch, and its results change nothing."""
    emails = addresses("u", 10)
    await bs.submit(emails)
    async with bs.db.acquire() as conn:
        claim = await repo.claim_batch(conn, bs.ctx.limiter, "deliverable", capacity=3, size=10)
    assert isinstance(claim, repo.Claimed)
    await bs.db.execute(
        "UPDATE bouncer_batches SET created_at = now() - interval '10 minutes' WHERE id = $1",
        claim.id)
    assert await release_stale(bs.ctx, "deliverable") == 10
    with capture_logs() as logs:
        assert await _send(bs.ctx, "deliverable", claim) == "failed"
    [orphan] = [e for e in logs if e["event"] == "bouncer_batch_orphaned"]
    [sent] = bs.sim.batches()
    assert orphan["bouncer_batch_id"] == sent.batch_id
    # Its results, should anyone ask for them, are ignored.
    bs.sim.complete_batch(sent.batch_id)
    await bs.engine.producer.enqueue("bouncer", "download_results",
                                     {"bouncer_batch_id": sent.batch_id})
    assert await bs.download() == 1
    assert await bs.db.fetchval("SELECT count(*) FROM email_deliverable_results") == 0
    assert (await bs.statuses()) == {"pending": 10}
    await bs.run_to_end()
    await assert_each_email_once(bs, emails)


async def test_release_and_settle_race_has_one_winner(bs: BouncerStack) -> None:
    """Settling and giving up the same intent: whichever comes first wins, the other is a
    no-op, so the e-mails are either in the batch or pending, never both."""
    await bs.submit(addresses("u", 10))
    async with bs.db.acquire() as conn:
        claim = await repo.claim_batch(conn, bs.ctx.limiter, "deliverable", capacity=3, size=10)
    assert isinstance(claim, repo.Claimed)
    assert await repo.settle_created(bs.db, claim.id, "bouncer-1")
    assert await repo.release(bs.db, claim.id, "late") is None
    assert (await bs.statuses()) == {"assigned": 10}
    async with bs.db.acquire() as conn:
        await bs.submit(addresses("v", 10))
        other = await repo.claim_batch(conn, bs.ctx.limiter, "deliverable", capacity=3, size=10)
    assert isinstance(other, repo.Claimed)
    assert await repo.release(bs.db, other.id, "gave up") == 10
    assert not await repo.settle_created(bs.db, other.id, "bouncer-2")
