"""The creator cycle after a failed create (seed 004): "Continue with next batch if
individual API call fails", "Do NOT retry failed batch creation attempts in same cycle",
"Failed bouncer batch creation leaves user batches as 'queued' for retry". Real
PostgreSQL and Redis, the Bouncer simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from imsys.bouncer import repo
from imsys.bouncer.creator import _send
from imsys.settings import Settings
from tests.bouncer_support import BouncerStack, addresses, bouncer_stack


@pytest.fixture
async def bs(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[BouncerStack]:
    async with bouncer_stack(settings, redis, db, capacity=3, batch_size=10) as stack:
        yield stack


def sent_emails(bs: BouncerStack) -> set[str]:
    """Every address Bouncer received, over every batch created at it."""
    return {e for b in bs.sim.batches() for e in b.emails}


async def test_failed_create_goes_on_with_other_emails(bs: BouncerStack) -> None:
    """After a create fails (5xx), the same cycle packs the next pending e-mails (another
    user batch) into the free slots, never the ones it just released; the failed user
    batch is 'queued' again, the sent one 'processing'; the next cycle sends the rest."""
    first = addresses("first", 10)
    second = addresses("second", 15)
    first_id = await bs.submit(first)
    second_id = await bs.submit(second)
    bs.sim.server_error_next(endpoint="create")
    result = await bs.create()
    assert (len(result.failed), len(result.created), result.stopped) == (1, 2, "slots")
    # The failed one was the oldest e-mails; Bouncer got the second user batch only.
    assert sent_emails(bs) == set(second)
    assert bs.sim.calls["create"] == 3
    assert (await bs.user_batch(first_id))["status"] == "queued"
    assert (await bs.user_batch(second_id))["status"] == "processing"
    # Next cycle: a free slot again once Bouncer finished those two; the released go out.
    bs.sim.complete_all()
    await bs.check()
    await bs.download()
    nxt = await bs.create()
    assert (len(nxt.created), nxt.failed) == (1, [])
    assert sent_emails(bs) == set(first) | set(second)
    await bs.run_to_end()
    assert (await bs.user_batch(first_id))["status"] == "completed"


async def test_released_emails_are_not_packed_again_in_the_same_cycle(bs: BouncerStack) -> None:
    """With nothing else pending, a failed create ends the cycle as empty: its e-mails are
    not sent a second time in that cycle (one call), and go out in the next one."""
    emails = addresses("u", 10)
    user_batch = await bs.submit(emails)
    bs.sim.server_error_next(endpoint="create")
    result = await bs.create()
    assert (result.created, len(result.failed), result.stopped) == ([], 1, "empty")
    assert bs.sim.calls["create"] == 1
    assert (await bs.statuses()) == {"pending": 10}
    assert (await bs.user_batch(user_batch))["status"] == "queued"
    again = await bs.create()
    assert (len(again.created), again.failed) == (1, [])
    assert sent_emails(bs) == set(emails)


@pytest.mark.parametrize(
    "fault",
    ["rate_limit_next", "payment_required_next"],
    ids=["429", "402"],
)
async def test_account_wide_failure_ends_the_cycle(bs: BouncerStack, fault: str) -> None:
    """429 (rate limited) and 402 (no credit) would fail every further create: the cycle
    stops after one call, and every user batch is still 'queued'."""
    ids = [await bs.submit(addresses(owner, 10)) for owner in ("a", "b")]
    getattr(bs.sim, fault)(endpoint="create")
    result = await bs.create()
    assert (result.created, len(result.failed), result.stopped) == ([], 1, "failed")
    assert bs.sim.calls["create"] == 1
    assert [(await bs.user_batch(i))["status"] for i in ids] == ["queued", "queued"]


async def test_unreachable_bouncer_ends_the_cycle(bs: BouncerStack) -> None:
    """Bouncer not reachable at all (connection refused): one attempt, the cycle stops,
    user batches stay 'queued'."""
    ids = [await bs.submit(addresses(owner, 10)) for owner in ("a", "b")]
    await bs.sim.stop()
    result = await bs.create()
    assert (result.created, len(result.failed), result.stopped) == ([], 1, "failed")
    assert [(await bs.user_batch(i))["status"] for i in ids] == ["queued", "queued"]
    assert (await bs.statuses()) == {"pending": 20}


async def test_user_batch_with_emails_at_bouncer_stays_processing(bs: BouncerStack) -> None:
    """A failed create of the rest of a user batch whose first e-mails are at Bouncer
    leaves it 'processing' (it is), its released e-mails pending."""
    user_batch = await bs.submit(addresses("u", 15))
    async with bs.db.acquire() as conn:
        claim = await repo.claim_batch(conn, bs.ctx.limiter, "deliverable", capacity=3, size=10)
    assert isinstance(claim, repo.Claimed)
    assert await _send(bs.ctx, "deliverable", claim) == "created"
    bs.sim.server_error_next(endpoint="create")
    result = await bs.create()
    assert (result.created, len(result.failed)) == ([], 1)
    assert (await bs.user_batch(user_batch))["status"] == "processing"
    assert (await bs.statuses()) == {"pending": 5, "assigned": 10}
