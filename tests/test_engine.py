"""The engine, one exact step at a time, against real Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

from imsys.errors import Deferred, PermanentError, RetryableError
from imsys.settings import Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry
from imsys.streams.keys import GROUP


class Item(BaseModel):
    n: int


class Secret(BaseModel):
    recipient: str
    otp: str


def make_engine(
    redis: Redis, settings: Settings, handler: Callable[[Job[Item]], Awaitable[None]], **kw: Any
) -> Engine:
    registry = Registry(**kw)
    registry.register("billing", "item", Item, handler)
    return Engine(redis, settings, registry, consumer="test-consumer")


async def process_all(engine: Engine, stream: str = "billing") -> int:
    """Run one-batch steps until the stream has nothing new to read."""
    total = 0
    while n := await engine.consumers[stream].process_once(block_ms=10):
        total += n
    return total


async def dead_letters(engine: Engine) -> list[dict[str, str]]:
    return [d.as_dict() for d in await engine.dead_letters.list()]


async def test_success_acks_and_deletes_entry(redis: Redis, settings: Settings) -> None:
    """A handled job is acknowledged and deleted, leaving the stream empty."""
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        seen.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    for n in range(5):
        await engine.producer.enqueue("billing", "item", {"n": n})
    assert await engine.consumers["billing"].process_once(block_ms=10) == 5
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert await redis.xlen(engine.keys.stream("billing")) == 0
    pending = await redis.xpending(engine.keys.stream("billing"), GROUP)
    assert pending["pending"] == 0
    stats = await redis.hgetall(engine.keys.stats("billing"))
    assert stats["processed"] == "5"


async def test_acks_delete_finished_entries_and_keep_running_and_unread_ones(
    redis: Redis, settings: Settings
) -> None:
    """Finished entries leave the stream whether they sit below the oldest running job
    (trimmed together) or above it (deleted one by one); a running job's entry and the
    unread ones stay, and a second group on the stream keeps the one-by-one path."""
    release = asyncio.Event()

    async def handle(job: Job[Item]) -> None:
        if job.payload.n == 2:
            await release.wait()

    engine = make_engine(redis, settings, handle)
    consumer = engine.consumers["billing"]
    consumer.policy.concurrency, consumer.policy.prefetch = 4, 0
    await engine.prepare()
    key = engine.keys.stream("billing")
    ids = [(await engine.producer.enqueue("billing", "item", {"n": n})).entry_id for n in range(6)]
    await consumer.dispatch(await consumer.read(4, 10))  # 0..3 run; 4 and 5 stay unread
    while len(consumer.running) > 1:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert [eid for eid, _ in await redis.xrange(key)] == [ids[2], ids[4], ids[5]]

    release.set()
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert [eid for eid, _ in await redis.xrange(key)] == [ids[4], ids[5]]

    await redis.xgroup_create(key, "audit", id="0")
    assert await consumer.process_once(block_ms=10) == 2
    assert await redis.xlen(key) == 0
    stats = await redis.hgetall(engine.keys.stats("billing"))
    assert stats["processed"] == "6"


async def test_retry_schedule_and_attempt_counting(redis: Redis, settings: Settings) -> None:
    """A retryable failure goes to the delayed store with attempt+1, then dead after the last."""
    attempts: list[int] = []

    async def handle(job: Job[Item]) -> None:
        attempts.append(job.attempt)
        raise RetryableError("gateway answered 503")

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    consumer = engine.consumers["billing"]
    await engine.producer.enqueue("billing", "item", {"n": 1})
    before = time.time() * 1000
    await consumer.process_once(block_ms=10)
    members = await redis.zrange(engine.keys.delayed("billing"), 0, -1, withscores=True)
    assert len(members) == 1
    member, due = members[0]
    job = orjson.loads(member)
    fields = dict(zip(job["f"][::2], job["f"][1::2], strict=True))
    assert fields["attempt"] == "2"
    assert "gateway answered 503" in fields["last_error"]
    # backoff_base 0.05 s with 20 % jitter
    assert before + 40 - 5 <= due <= time.time() * 1000 + 60
    assert await redis.xlen(engine.keys.stream("billing")) == 0

    for _ in range(2):
        await asyncio.sleep(0.25)
        assert await engine.promote_once() == 1
        await consumer.process_once(block_ms=10)
    assert attempts == [1, 2, 3]
    assert await redis.zcard(engine.keys.delayed("billing")) == 0
    [letter] = await dead_letters(engine)
    assert letter["error"].startswith(
        "attempts exhausted (3/3): RetryableError: gateway answered 503"
    )
    assert letter["stream"] == "billing"
    assert letter["type"] == "item"
    assert letter["attempt"] == "3"
    stats = await redis.hgetall(engine.keys.stats("billing"))
    assert stats["retried"] == "2"
    assert stats["dead"] == "1"


async def test_retry_honours_handler_defer(redis: Redis, settings: Settings) -> None:
    """RetryableError(defer=...) overrides the stream's backoff for that retry."""

    async def handle(job: Job[Item]) -> None:
        raise RetryableError("rate limited", defer=30)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await engine.consumers["billing"].process_once(block_ms=10)
    [(_, due)] = await redis.zrange(engine.keys.delayed("billing"), 0, -1, withscores=True)
    assert 29_000 <= due - time.time() * 1000 <= 30_500


async def test_permanent_error_dead_letters_at_once(redis: Redis, settings: Settings) -> None:
    """A permanent error skips retries and lands in the dead-letter stream with its reason."""
    calls = 0

    async def handle(job: Job[Item]) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("subscriber 7 does not exist")

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    entry = await engine.producer.enqueue("billing", "item", {"n": 7}, job_id="j7")
    await engine.consumers["billing"].process_once(block_ms=10)
    assert calls == 1
    [letter] = await dead_letters(engine)
    assert letter["original_id"] == entry.entry_id
    assert letter["error"] == "PermanentError: subscriber 7 does not exist"
    assert letter["job_id"] == "j7"
    assert orjson.loads(letter["payload"]) == {"n": 7}
    assert int(letter["failed_at"]) <= time.time() * 1000
    assert await redis.zcard(engine.keys.delayed("billing")) == 0
    # the dedupe mark went with it: the same job_id may be enqueued again
    assert not (await engine.producer.enqueue("billing", "item", {"n": 7}, job_id="j7")).duplicate


async def test_unclassified_exception_is_retried(redis: Redis, settings: Settings) -> None:
    """A bug nobody classified is retried (nothing lost), not dropped."""

    async def handle(job: Job[Item]) -> None:
        raise KeyError("oops")

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await engine.consumers["billing"].process_once(block_ms=10)
    assert await redis.zcard(engine.keys.delayed("billing")) == 1
    assert await engine.dead_letters.count() == 0


async def test_deferred_does_not_spend_an_attempt(redis: Redis, settings: Settings) -> None:
    """Deferred puts the job off with the same attempt number."""

    async def handle(job: Job[Item]) -> None:
        raise Deferred("router 3 is down", delay=0.05)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    consumer = engine.consumers["billing"]
    for _ in range(5):  # more than max_attempts: still never dead
        await consumer.process_once(block_ms=10)
        await asyncio.sleep(0.08)
        assert await engine.promote_once() == 1
    assert await engine.dead_letters.count() == 0
    entries = await redis.xrange(engine.keys.stream("billing"))
    assert entries[0][1]["attempt"] == "1"
    assert (await redis.hgetall(engine.keys.stats("billing")))["deferred"] == "5"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"payload": "{}"}, "entry has no 'type' field"),
        ({"type": "item"}, "entry has no 'payload' field"),
        ({"type": "nope", "payload": "{}"}, "no handler for type 'nope' on stream 'billing'"),
        ({"type": "item", "payload": "not json"}, "invalid payload for item"),
        ({"type": "item", "payload": '{"n": "x"}'}, "invalid payload for item: n: Input should be"),
        ({"type": "item", "payload": "[1, 2]"}, "invalid payload for item"),
        (
            {"type": "item", "payload": '{"n": 1}', "attempt": "two"},
            "field 'attempt' is not an integer",
        ),
    ],
)
async def test_garbage_is_dead_lettered_and_consumer_goes_on(
    redis: Redis, settings: Settings, fields: dict[str, str], reason: str
) -> None:
    """A malformed entry is dead-lettered with a clear reason; the next good job still runs."""
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        seen.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await redis.xadd(engine.keys.stream("billing"), fields)  # type: ignore[arg-type]
    await engine.producer.enqueue("billing", "item", {"n": 42})
    await engine.consumers["billing"].process_once(block_ms=10)
    assert seen == [42]
    [letter] = await dead_letters(engine)
    assert reason in letter["error"]
    assert await redis.xlen(engine.keys.stream("billing")) == 0


async def test_huge_payload_is_dead_lettered_truncated(redis: Redis, settings: Settings) -> None:
    """An oversized payload is refused with its size, and the dead letter keeps only a prefix."""

    async def handle(job: Job[Item]) -> None:
        raise AssertionError("must not run")

    engine = make_engine(redis, settings, handle, max_payload_bytes=100_000)
    await engine.prepare()
    huge = '{"n": 1, "pad": "' + "x" * 2_000_000 + '"}'
    await redis.xadd(engine.keys.stream("billing"), {"type": "item", "payload": huge})
    await engine.consumers["billing"].process_once(block_ms=10)
    [letter] = await dead_letters(engine)
    assert f"payload is {len(huge)} bytes, over the 100000 limit" in letter["error"]
    assert letter["payload_bytes"] == str(len(huge))
    assert len(letter["payload"]) == 65_536


async def test_secret_payload_fields_are_masked_in_dead_letters(
    redis: Redis, settings: Settings
) -> None:
    """A registered secret field (an OTP) never reaches the dead-letter stream."""
    registry = Registry()

    async def handle(job: Job[Secret]) -> None:
        raise PermanentError("recipient refused")

    registry.register("events", "otp", Secret, handle, secret_fields=("otp",))
    engine = Engine(redis, settings, registry)
    await engine.prepare()
    await engine.producer.enqueue("events", "otp", {"recipient": "+254700000001", "otp": "493817"})
    await engine.consumers["events"].process_once(block_ms=10)
    [letter] = await dead_letters(engine)
    assert "493817" not in orjson.dumps(letter).decode()
    assert orjson.loads(letter["payload"]) == {"recipient": "+254700000001", "otp": "***"}


async def test_replay_and_purge(redis: Redis, settings: Settings) -> None:
    """A replayed dead letter runs again as attempt 1; purge empties the dead-letter stream."""
    fail = True
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        if fail:
            raise PermanentError("bad")
        seen.append(job.attempt)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    consumer = engine.consumers["billing"]
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await engine.producer.enqueue("billing", "item", {"n": 2})
    await consumer.process_once(block_ms=10)
    letters = await engine.dead_letters.list()
    assert len(letters) == 2
    fail = False
    new_id = await engine.dead_letters.replay(letters[0].id)
    assert new_id is not None
    assert await engine.dead_letters.replay(letters[0].id) is None  # gone once replayed
    await consumer.process_once(block_ms=10)
    assert seen == [1]
    assert await engine.dead_letters.count() == 1
    assert await engine.dead_letters.purge() == 1
    assert await engine.dead_letters.count() == 0


async def test_dead_letters_trimmed_by_age_not_count(redis: Redis, settings: Settings) -> None:
    """Dead letters older than the retention go; fresh ones stay, however many."""

    async def handle(job: Job[Item]) -> None:
        raise PermanentError("bad")

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    old_ms = int(time.time() * 1000) - 8 * 86_400_000
    await redis.xadd(engine.keys.dead, {"stream": "billing", "error": "old"}, id=f"{old_ms}-0")
    for n in range(30):
        await engine.producer.enqueue("billing", "item", {"n": n})
    assert await process_all(engine) == 30
    letters = await dead_letters(engine)
    assert len(letters) == 30
    assert all(d["error"] != "old" for d in letters)


async def test_history_is_bounded(redis: Redis, settings: Settings) -> None:
    """Finished jobs are recorded (type, job id, outcome, duration), only the last N kept."""
    settings.engine.history_max = 5

    async def handle(job: Job[Item]) -> None:
        if job.payload.n == 99:
            raise PermanentError("no")

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    for n in range(8):
        await engine.producer.enqueue("billing", "item", {"n": n}, job_id=f"j{n}")
    await engine.consumers["billing"].process_once(block_ms=10)
    await engine.producer.enqueue("billing", "item", {"n": 99})
    await engine.consumers["billing"].process_once(block_ms=10)
    history = await redis.xrange(engine.keys.history)
    assert len(history) == 5
    assert history[-1][1]["outcome"] == "dead"
    done = history[0][1]
    assert done["outcome"] == "done"
    assert done["type"] == "item"
    assert done["job_id"].startswith("j")
    assert float(done["ms"]) >= 0


async def test_job_id_dedupe_at_enqueue(redis: Redis, settings: Settings) -> None:
    """A second job with a live job_id is dropped; once the first is done the id is free."""
    runs = 0

    async def handle(job: Job[Item]) -> None:
        nonlocal runs
        runs += 1

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    first = await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-1")
    second = await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-1")
    assert not first.duplicate
    assert second.duplicate
    assert not second.running
    await engine.consumers["billing"].process_once(block_ms=10)
    assert runs == 1
    third = await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-1")
    assert not third.duplicate


async def test_job_id_dedupe_while_retry_waits(redis: Redis, settings: Settings) -> None:
    """A job waiting in the delayed store still counts as live for its job_id."""

    async def handle(job: Job[Item]) -> None:
        raise RetryableError("later")

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-2")
    await engine.consumers["billing"].process_once(block_ms=10)
    assert await redis.zcard(engine.keys.delayed("billing")) == 1
    assert (await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-2")).duplicate


async def test_duplicate_of_a_running_job_says_so(redis: Redis, settings: Settings) -> None:
    """Enqueueing the job_id of a job already running reports it as running."""
    release = asyncio.Event()

    async def handle(job: Job[Item]) -> None:
        await release.wait()

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-3")
    consumer = engine.consumers["billing"]
    await consumer.dispatch(await consumer.read(1, 10))
    again = await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-3")
    assert again.duplicate
    assert again.running
    release.set()
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert not (
        await engine.producer.enqueue("billing", "item", {"n": 1}, job_id="sub-3")
    ).duplicate


async def test_job_id_dedupe_for_raw_producers(redis: Redis, settings: Settings) -> None:
    """Entries XADDed directly with the same job_id run once while one is live."""
    runs = 0

    async def handle(job: Job[Item]) -> None:
        nonlocal runs
        runs += 1

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    for _ in range(3):
        await redis.xadd(
            engine.keys.stream("billing"),
            {"type": "item", "payload": '{"n": 1}', "job_id": "raw-1"},
        )
    await engine.consumers["billing"].process_once(block_ms=10)
    assert runs == 1
    assert await redis.xlen(engine.keys.stream("billing")) == 0
    assert (await redis.hgetall(engine.keys.stats("billing")))["deduplicated"] == "2"


async def test_delayed_enqueue_runs_later(redis: Redis, settings: Settings) -> None:
    """A job enqueued with a delay waits in the delayed store until it is due."""
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        seen.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    result = await engine.producer.enqueue("billing", "item", {"n": 5}, delay=0.3)
    assert result.entry_id == "delayed"
    assert await engine.promote_once() == 0
    assert await redis.xlen(engine.keys.stream("billing")) == 0
    await asyncio.sleep(0.35)
    assert await engine.promote_once() == 1
    await engine.consumers["billing"].process_once(block_ms=10)
    assert seen == [5]


async def test_recovery_claims_idle_entries_of_a_dead_consumer(
    redis: Redis, settings: Settings
) -> None:
    """An entry left pending by a consumer that vanished is claimed and run after claim_idle."""
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        seen.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    key = engine.keys.stream("billing")
    for n in range(250):  # more than one XAUTOCLAIM page: the cursor must be followed
        await engine.producer.enqueue("billing", "item", {"n": n})
    await redis.xreadgroup(GROUP, "ghost", {key: ">"}, count=250)
    consumer = engine.consumers["billing"]
    consumer.policy.concurrency = 300
    assert await engine.recover_once() == 0  # not idle long enough yet
    await asyncio.sleep(settings.engine.claim_idle_s + 0.1)
    assert await engine.recover_once() == 250
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert sorted(seen) == list(range(250))
    assert await redis.xlen(key) == 0


async def test_poison_message_is_dead_lettered_by_delivery_count(
    redis: Redis, settings: Settings
) -> None:
    """An entry whose processes kept dying (delivery count over the cap) is dead-lettered."""

    async def handle(job: Job[Item]) -> None:
        raise AssertionError("a poison message must not run again")

    settings.engine.max_deliveries = 3
    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    key = engine.keys.stream("billing")
    entry = await engine.producer.enqueue("billing", "item", {"n": 1})
    await redis.xreadgroup(GROUP, "ghost-1", {key: ">"}, count=1)  # delivery 1
    for ghost in ("ghost-2", "ghost-3"):  # each claim is a delivery that died
        await redis.xclaim(key, GROUP, ghost, 0, [entry.entry_id])
    await asyncio.sleep(settings.engine.claim_idle_s + 0.1)
    assert await engine.recover_once() == 0
    [letter] = await dead_letters(engine)
    assert "delivered 4 times" in letter["error"]
    assert letter["error"].startswith("PoisonMessage")
    assert await redis.xlen(key) == 0


async def test_heartbeat_keeps_a_long_job_from_being_claimed(
    redis: Redis, settings: Settings
) -> None:
    """While a job runs past claim_idle, its heartbeat stops another process claiming it."""
    runs = 0
    release = asyncio.Event()

    async def handle(job: Job[Item]) -> None:
        nonlocal runs
        runs += 1
        await release.wait()

    engine = make_engine(redis, settings, handle)
    other = make_engine(redis, settings, handle)
    other.consumer = "other"
    for c in other.consumers.values():
        c.consumer = "other"
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    consumer = engine.consumers["billing"]
    entries = await consumer.read(1, 10)
    await consumer.dispatch(entries)
    deadline = time.monotonic() + settings.engine.claim_idle_s * 2.5
    while time.monotonic() < deadline:
        await engine.heartbeat_once()
        assert await other.recover_once() == 0
        await asyncio.sleep(settings.engine.heartbeat_s)
    release.set()
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert runs == 1
    assert await redis.xlen(engine.keys.stream("billing")) == 0


async def test_heartbeat_keeps_read_ahead_entries_and_drops_ones_taken_over(
    redis: Redis, settings: Settings
) -> None:
    """Read-ahead entries waiting behind a long job keep their claim; one that another
    process took anyway (this one stalled) leaves the buffer and runs only there."""
    ran: list[int] = []
    release = asyncio.Event()

    async def handle(job: Job[Item]) -> None:
        ran.append(job.payload.n)
        if job.payload.n == 1:
            await release.wait()

    engine = make_engine(redis, settings, handle)
    other = make_engine(redis, settings, handle)
    for c in other.consumers.values():
        c.consumer = "other"
    consumer = engine.consumers["billing"]
    consumer.policy.concurrency, consumer.policy.prefetch = 1, 2
    await engine.prepare()
    for n in (1, 2, 3):
        await engine.producer.enqueue("billing", "item", {"n": n})
    await consumer.dispatch(await consumer.read(3, 10))
    assert [f["payload"] for _, f in consumer._buffer] == ['{"n":2}', '{"n":3}']

    deadline = time.monotonic() + settings.engine.claim_idle_s * 2.5
    while time.monotonic() < deadline:
        assert await consumer.heartbeat_once() == []
        assert await other.recover_once() == 0  # neither the running nor the buffered
        await asyncio.sleep(settings.engine.heartbeat_s)

    # A stall past claim_idle: the other process claims the last read-ahead entry.
    key = engine.keys.stream("billing")
    third = consumer._buffer[-1][0]
    await redis.xclaim(key, GROUP, "other", 0, [third], justid=True)
    assert await consumer.heartbeat_once() == []  # no running job was lost
    assert [f["payload"] for _, f in consumer._buffer] == ['{"n":2}']

    release.set()
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert ran == [1, 2]  # 3 is the other process's now
    pending = await redis.xpending_range(key, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(third, "other")]


async def test_a_freed_slot_takes_the_next_read_ahead_entry_in_order(
    redis: Redis, settings: Settings
) -> None:
    """With one slot and read-ahead, jobs run one at a time, in stream order, and every
    one is acknowledged; the slot goes straight on to the next buffered entry."""
    running = 0
    seen: list[tuple[int, int]] = []

    async def handle(job: Job[Item]) -> None:
        nonlocal running
        running += 1
        seen.append((job.payload.n, running))
        await asyncio.sleep(0.005)
        running -= 1

    engine = make_engine(redis, settings, handle)
    consumer = engine.consumers["billing"]
    consumer.policy.concurrency, consumer.policy.prefetch = 1, 5
    await engine.prepare()
    for n in range(6):
        await engine.producer.enqueue("billing", "item", {"n": n})
    assert await consumer.process_once(count=6, block_ms=10) == 6
    assert seen == [(n, 1) for n in range(6)]
    assert await redis.xlen(engine.keys.stream("billing")) == 0
    assert consumer.running == {}
    assert not consumer._buffer


async def test_progress_is_published_while_running(redis: Redis, settings: Settings) -> None:
    """A long job's progress shows in the engine's progress view and is cleared at the end."""
    seen: dict[str, Any] = {}
    engine_ref: list[Engine] = []

    async def handle(job: Job[Item]) -> None:
        await job.progress(3, 10, "downloading")
        seen.update(await engine_ref[0].progress())

    engine = make_engine(redis, settings, handle)
    engine_ref.append(engine)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await engine.consumers["billing"].process_once(block_ms=10)
    [row] = seen["billing"]
    assert (row["done"], row["total"], row["note"], row["type"]) == (3, 10, "downloading", "item")
    assert (await engine.progress())["billing"] == []


async def test_key_limiter_caps_concurrency(redis: Redis, settings: Settings) -> None:
    """At most `limit` holders of one key at once; a saturated key defers the job."""
    engine = make_engine(redis, settings, lambda job: asyncio.sleep(0))
    current = 0
    peak = 0

    async def hold() -> None:
        nonlocal current, peak
        async with engine.limiter.slot("router:9", 2, wait=5):
            current += 1
            peak = max(peak, current)
            await asyncio.sleep(0.05)
            current -= 1

    await asyncio.gather(*(hold() for _ in range(6)))
    assert peak == 2
    async with engine.limiter.slot("router:9", 1), engine.limiter.slot("router:8", 1):
        with pytest.raises(Deferred, match="concurrency limit 1 reached for router:9"):
            async with engine.limiter.slot("router:9", 1, wait=0.05):
                pass


async def test_timer_fires_once_per_slot_and_survives_failures(
    redis: Redis, settings: Settings
) -> None:
    """Two runners on one timer fire each slot once; a failing tick does not stop the timer."""
    fired: list[int] = []

    async def tick(slot: int) -> None:
        fired.append(slot)
        if len(fired) == 1:
            raise RuntimeError("first tick fails")

    a = make_engine(redis, settings, lambda job: asyncio.sleep(0))
    b = make_engine(redis, settings, lambda job: asyncio.sleep(0))
    timer = a.add_timer("t", tick, every=0.2)
    stop = asyncio.Event()
    runners = [asyncio.create_task(e.timer_runner.run(timer, stop)) for e in (a, b)]
    await asyncio.sleep(1.1)
    stop.set()
    await asyncio.gather(*runners)
    assert len(fired) == len(set(fired))
    assert len(fired) >= 4
    assert all(s2 - s1 == 200 for s1, s2 in itertools.pairwise(fired))


async def test_graceful_stop_drains_running_jobs(redis: Redis, settings: Settings) -> None:
    """stop() lets running jobs finish within the grace period and acks them."""
    finished: list[int] = []
    started = asyncio.Event()

    async def handle(job: Job[Item]) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    run = asyncio.create_task(engine.run())
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await asyncio.wait_for(started.wait(), 5)
    engine.stop()
    await asyncio.wait_for(run, 10)
    assert finished == [1]
    assert await redis.xlen(engine.keys.stream("billing")) == 0


async def test_stop_releases_read_ahead_and_leaves_overdue_jobs_pending(
    redis: Redis, settings: Settings
) -> None:
    """Past the grace period a running job is cancelled and stays pending for recovery."""
    settings.engine.grace_period_s = 0.2
    started = asyncio.Event()

    async def handle(job: Job[Item]) -> None:
        started.set()
        await asyncio.sleep(30)

    engine = make_engine(redis, settings, handle)
    policy = engine.consumers["billing"].policy
    policy.concurrency, policy.prefetch = 1, 1
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await engine.producer.enqueue("billing", "item", {"n": 2}, job_id="second")
    run = asyncio.create_task(engine.run())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.1)
    assert len(engine.consumers["billing"]._buffer) == 1
    engine.stop()
    await asyncio.wait_for(run, 10)
    key = engine.keys.stream("billing")
    pending = await redis.xpending_range(key, GROUP, min="-", max="+", count=10)
    assert len(pending) == 1  # the cancelled job, left for recovery
    entries = await redis.xrange(key)
    assert len(entries) == 2
    released = [e for e in entries if e[0] != pending[0]["message_id"]]
    assert orjson.loads(released[0][1]["payload"]) == {"n": 2}  # back on the stream, unowned
    assert (await engine.producer.enqueue("billing", "item", {"n": 2}, job_id="second")).duplicate


async def test_startup_warns_when_redis_would_lose_jobs(redis: Redis, settings: Settings) -> None:
    """Start-up names each Redis setting that can lose or evict queued jobs."""
    engine = make_engine(redis, settings, lambda job: asyncio.sleep(0))
    cfg = await redis.config_get("appendonly")
    cfg.update(await redis.config_get("maxmemory-policy"))
    warnings = await engine.check_redis_durability()
    assert any("appendonly" in w for w in warnings) == (cfg["appendonly"] != "yes")
    assert any("maxmemory-policy" in w for w in warnings) == (
        cfg["maxmemory-policy"] != "noeviction"
    )


async def test_prune_removes_only_idle_consumers_without_pending(
    redis: Redis, settings: Settings
) -> None:
    """Old consumers with nothing pending are deleted; one that owns entries never is."""
    engine = make_engine(redis, settings, lambda job: asyncio.sleep(0))
    await engine.prepare()
    key = engine.keys.stream("billing")
    await redis.xgroup_createconsumer(key, GROUP, "empty-old")
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await redis.xreadgroup(GROUP, "owner-old", {key: ">"}, count=1)
    import imsys.streams.engine as engine_module

    original = engine_module.STALE_CONSUMER_MS
    engine_module.STALE_CONSUMER_MS = 0
    try:
        await asyncio.sleep(0.01)
        assert await engine.prune_consumers() == 1
    finally:
        engine_module.STALE_CONSUMER_MS = original
    names = {c["name"] for c in await redis.xinfo_consumers(key, GROUP)}
    assert names == {"owner-old"}


async def test_group_loss_under_a_running_job(redis: Redis, settings: Settings) -> None:
    """If the group vanishes while a job runs, its ack does no harm and reading recreates it."""
    release = asyncio.Event()

    async def handle(job: Job[Item]) -> None:
        await release.wait()

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    consumer = engine.consumers["billing"]
    await consumer.dispatch(await consumer.read(1, 10))
    await redis.delete(engine.keys.stream("billing"))  # what a Redis restart looks like
    release.set()
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert await redis.exists(engine.keys.stream("billing")) == 0
    reader = asyncio.create_task(consumer.read_loop())
    try:
        for _ in range(100):
            if await redis.exists(engine.keys.stream("billing")):
                break
            await asyncio.sleep(0.02)
        groups = await redis.xinfo_groups(engine.keys.stream("billing"))
        assert [g["name"] for g in groups] == [GROUP]
    finally:
        consumer.stop_reading()
        await asyncio.wait_for(reader, 5)
