"""The greedy batch creator: FIFO packing, capacity, rate limit, and concurrent creators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from imsys.bouncer import repo
from imsys.bouncer.context import BouncerContext
from imsys.bouncer.creator import create_batches
from imsys.bouncer.ratelimit import RateLimiter
from imsys.settings import Settings
from tests.bouncer_support import BouncerStack, addresses, bouncer_stack

StackFactory = Callable[..., AbstractAsyncContextManager[BouncerStack]]


@pytest.fixture
def make(settings: Settings, redis: Redis, db: asyncpg.Pool) -> StackFactory:
    def factory(**batching: Any) -> AbstractAsyncContextManager[BouncerStack]:
        return bouncer_stack(settings, redis, db, **batching)

    return factory


@pytest.fixture
async def bs(make: StackFactory) -> AsyncIterator[BouncerStack]:
    async with make(capacity=15, batch_size=10) as stack:
        yield stack


async def open_batches(bs: BouncerStack) -> int:
    return int(await bs.db.fetchval(
        "SELECT count(*) FROM bouncer_batches WHERE status IN ('creating', 'processing')"
    ))


def sent_emails(bs: BouncerStack) -> list[str]:
    return [e for b in bs.sim.batches() for e in b.emails]


async def test_seed_worked_example(make: StackFactory) -> None:
    """Capacity 3, John 5k, Alice 2k, Bob 6k, Carol 7k, Dave 10k, Erin 20k: one cycle makes
    three full 10k batches in FIFO order, Bob split 3k/3k; Erin's 20k wait."""
    async with make(capacity=3, batch_size=10_000) as bs:
        sizes = {"john": 5000, "alice": 2000, "bob": 6000, "carol": 7000, "dave": 10_000,
                 "erin": 20_000}
        ids = {name: await bs.submit(addresses(name, n)) for name, n in sizes.items()}
        result = await bs.create()
        assert len(result.created) == 3
        assert result.emails == 30_000
        first, second, third = result.created
        assert await bs.composition(first) == [(ids["john"], 5000), (ids["alice"], 2000),
                                               (ids["bob"], 3000)]
        assert await bs.composition(second) == [(ids["bob"], 3000), (ids["carol"], 7000)]
        assert await bs.composition(third) == [(ids["dave"], 10_000)]
        # Within a user batch, submission order: Bob's first 3k went in the first batch.
        bob_first = await bs.db.fetch(
            "SELECT email FROM user_batch_emails WHERE bouncer_batch_id = $1 AND"
            " user_batch_id = $2 ORDER BY id", first, ids["bob"])
        assert [r["email"] for r in bob_first] == addresses("bob", 3000)
        # Bouncer got three batches of 10k, every e-mail named with our batch id.
        sent = bs.sim.batches()
        assert [b.quantity for b in sent] == [10_000] * 3
        assert {n for b in sent for n in b.names} == {f"imsys:{i}" for i in result.created}
        assert (await bs.statuses())["pending"] == 20_000
        assert (await bs.user_batch(ids["erin"]))["status"] == "queued"
        assert (await bs.user_batch(ids["bob"]))["status"] == "processing"
        # The next cycle finds no free slot.
        again = await bs.create()
        assert (again.created, again.stopped) == ([], "capacity")


async def test_fifo_follows_created_at_not_id(bs: BouncerStack) -> None:
    """A user batch created earlier goes first even when its id is higher."""
    late = await bs.submit(addresses("late", 10))
    early = await bs.submit(addresses("early", 10))
    await bs.db.execute(
        "UPDATE user_batches SET created_at = created_at - interval '1 hour' WHERE id = $1", early
    )
    first = (await bs.create()).created[0]
    assert await bs.composition(first) == [(early, 10)]
    assert await bs.composition(first + 1) == [(late, 10)]


async def test_capacity_of_15_is_respected(bs: BouncerStack) -> None:
    """With 20 batches' worth pending, 15 are created; none more until one finishes."""
    await bs.submit(addresses("u", 200))
    result = await bs.create()
    assert (len(result.created), result.stopped) == (15, "slots")
    assert await open_batches(bs) == 15
    assert (await bs.create()).stopped == "capacity"
    assert bs.sim.calls["create"] == 15
    # Two finish and are stored: exactly two slots free up.
    for b in bs.sim.batches()[:2]:
        bs.sim.complete_batch(b.batch_id)
    assert len((await bs.check()).completed) == 2
    assert await bs.download() == 2
    result = await bs.create()
    assert (len(result.created), result.stopped) == (2, "capacity")
    assert await open_batches(bs) == 15
    assert (await bs.statuses())["pending"] == 30


async def test_capacity_is_per_check_type(bs: BouncerStack) -> None:
    """Deliverable and catch-all batches each have their own 15 slots."""
    await bs.submit(addresses("d", 200))
    await bs.submit(addresses("c", 200), check_type="catchall")
    assert len((await bs.create("deliverable")).created) == 15
    assert len((await bs.create("catchall")).created) == 15
    assert len(bs.sim.batches()) == 30


async def test_empty_queue_makes_no_call(bs: BouncerStack) -> None:
    """Nothing pending: the cycle stops at once, calls nothing and records no call."""
    result = await bs.create()
    assert (result.created, result.stopped) == ([], "empty")
    assert bs.sim.calls == {}
    assert await bs.calls_last_minute() == 0
    assert await bs.db.fetchval("SELECT count(*) FROM bouncer_batches") == 0


async def test_rate_limit_stops_creation_at_180(bs: BouncerStack) -> None:
    """With 175 calls in the last minute, five batches are created and the cycle stops."""
    await bs.submit(addresses("u", 200))
    await bs.prefill_rate(175)
    result = await bs.create()
    assert (len(result.created), result.stopped) == (5, "rate_limit")
    assert bs.sim.calls["create"] == 5
    assert await bs.calls_last_minute() == 180
    assert (await bs.create()).created == []
    assert bs.sim.calls["create"] == 5


async def test_status_checks_may_use_the_room_up_to_200(bs: BouncerStack) -> None:
    """Creation stops at 180; status checks go on up to 200 and then stop too."""
    await bs.submit(addresses("u", 200))
    await bs.prefill_rate(170)
    assert len((await bs.create()).created) == 10
    assert await bs.calls_last_minute() == 180
    checked = await bs.check()
    assert checked.checked == 10
    assert await bs.calls_last_minute() == 190
    await bs.prefill_rate(5)
    checked = await bs.check()
    assert (checked.checked, checked.stopped) == (5, "rate_limit")
    assert await bs.calls_last_minute() == 200
    assert bs.sim.calls["status"] == 15


async def test_only_the_last_minute_counts(bs: BouncerStack) -> None:
    """Calls older than a minute do not count against the limit."""
    await bs.submit(addresses("u", 200))
    await bs.prefill_rate(400, age_s=61)
    assert len((await bs.create()).created) == 15


async def test_creation_limit_of_60_per_minute(bs: BouncerStack) -> None:
    """Bouncer's own 60 creations a minute: with 58 made, two more are created."""
    await bs.submit(addresses("u", 200))
    await bs.prefill_rate(58, request_type="create")
    result = await bs.create()
    assert (len(result.created), result.stopped) == (2, "rate_limit")


async def test_rate_limit_holds_under_concurrent_load(bs: BouncerStack,
                                                      database_url: str) -> None:
    """Four creators and four status checkers at once, on their own connections, never
    record more than 180 calls for creation, nor make more calls than recorded."""
    await bs.submit(addresses("u", 2000))
    await bs.submit(addresses("c", 2000), check_type="catchall")
    await bs.prefill_rate(160)
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in range(4)]
    try:
        contexts = [
            BouncerContext(pool, bs.ctx.producer, bs.ctx.client, bs.ctx.cfg,
                           RateLimiter(pool, bs.ctx.cfg))
            for pool in pools
        ]
        await asyncio.gather(*(create_batches(c, t) for c in contexts
                               for t in ("deliverable", "catchall")))
        assert await bs.calls_last_minute() == 180
        assert sum(bs.sim.calls.values()) == 20
        await bs.prefill_rate(15)
        from imsys.bouncer.status import check_batches

        await asyncio.gather(*(check_batches(c, "deliverable") for c in contexts))
        assert await bs.calls_last_minute() == 200
        assert sum(bs.sim.calls.values()) == 25
    finally:
        for pool in pools:
            await pool.close()


async def test_two_creators_never_share_an_email(bs: BouncerStack, database_url: str) -> None:
    """Two creators running at once, each with its own connections, put every e-mail in
    at most one batch and together keep within the capacity."""
    await bs.submit(addresses("a", 200))
    await bs.submit(addresses("b", 250))
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in range(2)]
    try:
        contexts = [
            BouncerContext(pool, bs.ctx.producer, bs.ctx.client, bs.ctx.cfg,
                           RateLimiter(pool, bs.ctx.cfg))
            for pool in pools
        ]
        made = [0, 0]
        for _ in range(3):
            results = await asyncio.gather(*(create_batches(c, "deliverable")
                                             for c in contexts))
            made = [m + len(r.created) for m, r in zip(made, results, strict=True)]
            assert sum(len(r.created) for r in results) == 15
            assert await open_batches(bs) == 15
            bs.sim.complete_all()
            await bs.check()
            await bs.download()
        # Both really ran at once, each taking its share.
        assert min(made) > 0
        sent = sent_emails(bs)
        assert len(sent) == len(set(sent)) == 450
        rows = await bs.db.fetch("SELECT bouncer_batch_id, count(*) AS n FROM user_batch_emails"
                                 " GROUP BY 1")
        assert all(r["n"] == 10 for r in rows)
        assert (await bs.statuses())["done"] == 450
    finally:
        for pool in pools:
            await pool.close()


async def test_pick_skips_rows_another_transaction_holds(bs: BouncerStack,
                                                         database_url: str) -> None:
    """The pick takes rows FOR UPDATE SKIP LOCKED: a second pick while the first is still
    open takes the next rows at once, never the same ones, never waiting."""
    await bs.submit(addresses("u", 30))
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        picked: list[set[str]] = []
        transactions = [c.transaction() for c in conns]
        for conn, tr in zip(conns, transactions, strict=True):
            await tr.start()
            batch_id = await conn.fetchval(
                "INSERT INTO bouncer_batches (check_type, quantity) VALUES ('deliverable', 0)"
                " RETURNING id")
            rows = await asyncio.wait_for(conn.fetch(repo.PICK, "deliverable", 10, batch_id, []), 2)
            picked.append({r["email"] for r in rows})
        assert len(picked[0]) == len(picked[1]) == 10
        assert not picked[0] & picked[1]
        assert picked[0] == set(addresses("u", 10))
        for tr in transactions:
            await tr.commit()
    finally:
        for conn in conns:
            await conn.close()
