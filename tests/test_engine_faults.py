"""The engine against an adversary: undecodable bytes, a stalled process, services away."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from imsys.db import translate_error
from imsys.errors import FencedOut, InvalidJob
from imsys.settings import Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Job, JobSpec, Registry
from imsys.streams.keys import GROUP
from tests.test_engine import Item, dead_letters, make_engine, process_all


async def test_undecodable_entries_are_dead_lettered_and_valid_ones_run(
    redis: Redis, settings: Settings
) -> None:
    """Non-UTF-8 bytes in a name or value dead-letter that entry with its reason and raw
    bytes; its batch-mates run, and the stream is left empty."""
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        seen.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    key = engine.keys.stream("billing")
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await redis.xadd(key, {b"type": b"\xff\xfe", b"payload": b"{}"})
    await redis.xadd(key, {b"type": b"item", b"payload": b'{"n": "\xc3\x28"}'})
    await redis.xadd(key, {b"\x80name": b"x", b"type": b"item", b"payload": b'{"n": 3}'})
    await engine.producer.enqueue("billing", "item", {"n": 2})

    await process_all(engine)

    assert sorted(seen) == [1, 2]
    assert await redis.xlen(key) == 0
    assert (await redis.xpending(key, GROUP))["pending"] == 0
    dead = await dead_letters(engine)
    assert len(dead) == 3
    errors = sorted(d["error"] for d in dead)
    assert errors == [
        "InvalidEntry: field name of '\ufffdname' is not UTF-8 text",
        "InvalidEntry: field value of 'payload' is not UTF-8 text",
        "InvalidEntry: field value of 'type' is not UTF-8 text",
    ]
    first = next(d for d in dead if "'type'" in d["error"])
    raw = orjson.loads(first["raw_fields_b64"])
    assert [base64.b64decode(k) + b"=" + base64.b64decode(v) for k, v in raw] == [
        b"type=\xff\xfe",
        b"payload={}",
    ]
    assert first["stream"] == "billing"


async def test_a_running_engine_flows_past_undecodable_entries(
    redis: Redis, settings: Settings
) -> None:
    """With the real loops running, undecodable entries neither wedge reading nor make the
    engine unhealthy; the valid jobs around them all complete."""
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        seen.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    key = engine.keys.stream("billing")
    for n in range(50):
        await engine.producer.enqueue("billing", "item", {"n": n})
        await redis.xadd(key, {b"type": bytes([0xFF, n]), b"payload": b"{}"})
    run = asyncio.create_task(engine.run())
    try:
        async with asyncio.timeout(20):
            while len(seen) < 50 or await redis.xlen(engine.keys.dead) < 50:
                await asyncio.sleep(0.05)
        assert engine.health() == []
    finally:
        engine.stop()
        await run
    assert sorted(seen) == list(range(50))
    assert await redis.xlen(engine.keys.dead) == 50


async def test_recovery_dead_letters_an_undecodable_entry_of_a_dead_process(
    redis: Redis, settings: Settings
) -> None:
    """An undecodable entry left pending by a dead consumer is dead-lettered by recovery
    instead of crashing it, and a valid one next to it is recovered and run."""
    seen: list[int] = []

    async def handle(job: Job[Item]) -> None:
        seen.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    key = engine.keys.stream("billing")
    await redis.xadd(key, {b"type": b"\xfe", b"payload": b"{}"})
    await engine.producer.enqueue("billing", "item", {"n": 7})
    # A consumer that reads both and dies (its reply left as bytes, as the engine reads).
    read = ("XREADGROUP", "GROUP", GROUP, "dead-one", "COUNT", 10, "STREAMS", key, ">")
    await redis.execute_command(*read, NEVER_DECODE=True)
    await asyncio.sleep(settings.engine.claim_idle_s + 0.1)

    consumer = engine.consumers["billing"]
    assert await consumer.recover_once() == 1
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert seen == [7]
    dead = await dead_letters(engine)
    assert [d["error"] for d in dead] == ["InvalidEntry: field value of 'type' is not UTF-8 text"]
    assert await redis.xlen(key) == 0


async def _take_over(redis: Redis, engine: Engine, entry_id: str, thief: str = "thief") -> None:
    """Another process claims the entry, as recovery does after claim_idle_s."""
    await redis.xclaim(engine.keys.stream("billing"), GROUP, thief, 0, [entry_id])


async def test_a_stale_delivery_is_fenced_out_and_settles_nothing(
    redis: Redis, settings: Settings
) -> None:
    """A process that stalled past claim_idle_s while another claimed its entry: the
    next ``ensure_current`` raises FencedOut, the side effect after it never happens, and
    the entry stays the new owner's to settle."""
    effects: list[int] = []
    claimed = asyncio.Event()
    outcome: list[str] = []

    async def handle(job: Job[Item]) -> None:
        await job.ensure_current()  # fresh claim: passes without asking Redis
        await claimed.wait()
        try:
            await job.ensure_current()
        except FencedOut as exc:
            outcome.append(str(exc))
            raise
        effects.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    consumer = engine.consumers["billing"]
    entry = (await engine.producer.enqueue("billing", "item", {"n": 1})).entry_id
    await consumer.dispatch(await consumer.read(10, 10))
    # No heartbeat runs here: the claim goes idle as under SIGSTOP, and recovery elsewhere
    # takes it exactly as XAUTOCLAIM would.
    await asyncio.sleep(settings.engine.claim_idle_s + 0.1)
    key = engine.keys.stream("billing")
    min_idle = int(settings.engine.claim_idle_s * 1000)
    assert await redis.xautoclaim(key, GROUP, "thief", min_idle, justid=True) == [entry]
    claimed.set()
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()

    assert effects == []
    assert "another process claimed it" in outcome[0]
    pending = await redis.xpending_range(key, GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(entry, "thief")]
    assert await dead_letters(engine) == []
    assert await redis.zcard(engine.keys.delayed("billing")) == 0


async def test_a_slow_job_that_still_holds_its_claim_stays_current(
    redis: Redis, settings: Settings
) -> None:
    """A job past its fresh-claim window whose claim nobody took is confirmed by Redis
    (and its claim refreshed): ``ensure_current`` passes and the job finishes."""
    effects: list[int] = []

    async def handle(job: Job[Item]) -> None:
        await asyncio.sleep(settings.engine.claim_idle_s * 0.6)
        await job.ensure_current()
        effects.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await process_all(engine)
    assert effects == [1]
    assert await redis.xlen(engine.keys.stream("billing")) == 0


async def test_heartbeat_cancels_a_handler_whose_claim_was_lost_and_the_slot_goes_on(
    redis: Redis, settings: Settings
) -> None:
    """The heartbeat that finds a running job's claim taken cancels that handler at once;
    the slot's task then runs the next entry as usual."""
    started: list[int] = []
    finished: list[int] = []
    cancelled: list[int] = []

    async def handle(job: Job[Item]) -> None:
        started.append(job.payload.n)
        try:
            if job.payload.n == 1:
                await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(job.payload.n)
            raise
        finished.append(job.payload.n)

    engine = make_engine(redis, settings, handle)
    consumer = engine.consumers["billing"]
    consumer.policy.concurrency, consumer.policy.prefetch = 1, 1
    await engine.prepare()
    first = (await engine.producer.enqueue("billing", "item", {"n": 1})).entry_id
    await engine.producer.enqueue("billing", "item", {"n": 2})
    await consumer.dispatch(await consumer.read(2, 10))  # 1 runs, 2 waits in the buffer
    await asyncio.sleep(0.05)
    await _take_over(redis, engine, first)

    lost = await consumer.heartbeat_once()

    assert lost == [first]
    async with asyncio.timeout(5):
        while consumer.running:
            await asyncio.sleep(0.01)
    await consumer.flush()
    assert cancelled == [1]
    assert finished == [2]
    pending = await redis.xpending_range(engine.keys.stream("billing"), GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(first, "thief")]


async def test_a_process_stalled_past_its_claim_does_not_ack_the_new_owners_entry(
    redis: Redis, settings: Settings
) -> None:
    """A job that finishes in a process frozen longer than claim_idle_s (no heartbeat ran)
    is not acknowledged when another process claimed it meanwhile: the entry stays pending
    for the new owner, whose own failure can still retry it."""

    async def handle(job: Job[Item]) -> None:
        # Frozen past the claim: nothing refreshes it (as under SIGSTOP).
        await asyncio.sleep(settings.engine.claim_idle_s * 0.6)

    engine = make_engine(redis, settings, handle)
    consumer = engine.consumers["billing"]
    await engine.prepare()
    stale = (await engine.producer.enqueue("billing", "item", {"n": 1})).entry_id
    fresh = (await engine.producer.enqueue("billing", "item", {"n": 2})).entry_id
    await consumer.dispatch(await consumer.read(10, 10))
    await _take_over(redis, engine, stale)
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()

    pending = await redis.xpending_range(engine.keys.stream("billing"), GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(stale, "thief")]
    assert [eid for eid, _ in await redis.xrange(engine.keys.stream("billing"))] == [stale]
    assert fresh not in {p["message_id"] for p in pending}


async def test_recovery_of_our_own_running_entry_moves_its_fence_along(
    redis: Redis, settings: Settings
) -> None:
    """When this process's own recovery re-claims an entry it still runs (its loop stalled
    past claim_idle_s), the running job holds the new delivery and stays current."""
    release = asyncio.Event()
    checks: list[str] = []

    async def handle(job: Job[Item]) -> None:
        await release.wait()
        await job.ensure_current()
        checks.append(f"current at delivery {job.delivery}")

    engine = make_engine(redis, settings, handle)
    consumer = engine.consumers["billing"]
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await consumer.dispatch(await consumer.read(10, 10))
    await asyncio.sleep(settings.engine.claim_idle_s + 0.1)
    assert await consumer.recover_once() == 1  # handed back, not started twice
    release.set()
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert checks == ["current at delivery 2"]
    assert await redis.xlen(engine.keys.stream("billing")) == 0


async def _attempt_after(
    redis: Redis, settings: Settings, error: BaseException
) -> tuple[Engine, list[Any]]:
    async def handle(job: Job[Item]) -> None:
        raise error

    engine = make_engine(redis, settings, handle)
    engine.add_error_translator(translate_error)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await process_all(engine)
    delayed = await redis.zrange(engine.keys.delayed("billing"), 0, -1)
    return engine, [orjson.loads(m) for m in delayed]


async def test_postgres_away_defers_without_spending_an_attempt(
    redis: Redis, settings: Settings
) -> None:
    """A handler that fails because PostgreSQL is down or restarting waits for it without
    spending an attempt, however many times that happens."""
    for error in (
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ):
        engine, delayed = await _attempt_after(redis, settings, error)
        assert len(delayed) == 1, error
        fields = dict(zip(delayed[0]["f"][::2], delayed[0]["f"][1::2], strict=True))
        assert fields["attempt"] == "1"
        assert fields["last_error"].startswith("Unavailable: PostgreSQL unavailable")
        assert await dead_letters(engine) == []
        stats = await redis.hgetall(engine.keys.stats("billing"))
        assert stats.get("deferred") == "1"
        assert "retried" not in stats
        await redis.delete(engine.keys.delayed("billing"), engine.keys.stats("billing"))


async def test_redis_errors_inside_a_handler_defer_without_spending_an_attempt(
    redis: Redis, settings: Settings
) -> None:
    """A handler's own Redis call failing (Redis away) defers the job, attempt unchanged."""
    _, delayed = await _attempt_after(redis, settings, RedisConnectionError("reset"))
    fields = dict(zip(delayed[0]["f"][::2], delayed[0]["f"][1::2], strict=True))
    assert fields["attempt"] == "1"
    assert fields["last_error"].startswith("Unavailable: Redis unavailable")


async def test_a_value_postgres_refuses_is_dead_lettered_at_once(
    redis: Redis, settings: Settings
) -> None:
    """An id beyond 64 bits (asyncpg DataError) would fail every retry: dead at once."""
    pool = await asyncpg.connect(settings.database.url.get_secret_value())
    try:
        await pool.fetchval("SELECT $1::bigint", 2**70)
    except asyncpg.DataError as exc:
        error: BaseException = exc
    finally:
        await pool.close()
    engine, delayed = await _attempt_after(redis, settings, error)
    assert delayed == []
    dead = await dead_letters(engine)
    assert len(dead) == 1
    assert dead[0]["error"].startswith("PermanentError: invalid value: invalid input")
    assert "out of int64 range" in dead[0]["error"]


async def test_a_loop_that_keeps_failing_makes_the_engine_unhealthy(
    redis: Redis, settings: Settings
) -> None:
    """A periodic loop failing three times in a row shows in ``health()`` with its reason;
    one success clears it."""
    failures = 0

    async def flaky() -> None:
        nonlocal failures
        failures += 1
        if failures <= 3:
            raise RuntimeError(f"boom {failures}")

    async def handle(job: Job[Item]) -> None:
        pass

    engine = make_engine(redis, settings, handle)
    task = asyncio.create_task(engine._every("flaky", 0.01, flaky))
    try:
        async with asyncio.timeout(5):
            while failures < 3:
                await asyncio.sleep(0.005)
        assert engine.health() == ["loop flaky failed 3 times in a row: RuntimeError: boom 3"]
        async with asyncio.timeout(5):
            while engine.health():
                await asyncio.sleep(0.005)
    finally:
        engine.stop()
        await task
    assert failures >= 4


async def test_a_new_redis_server_makes_every_stream_republish(
    redis: Redis, settings: Settings
) -> None:
    """A Redis whose run_id changed (restart, failover) runs the group hooks for every
    stream, since acknowledged writes may be gone; the same server runs none."""
    called: list[str] = []

    async def hook(stream: str) -> None:
        called.append(stream)

    async def handle(job: Job[Item]) -> None:
        pass

    engine = make_engine(redis, settings, handle)
    engine.on_group_created(hook)
    assert await engine.check_redis_server() is False  # first look: nothing to compare
    assert await engine.check_redis_server() is False
    assert called == []
    engine._redis_run_id = "0" * 40  # as if the server we knew had been another
    assert await engine.check_redis_server() is True
    assert sorted(called) == sorted(engine.consumers)


async def test_after_a_stall_the_claim_needs_confirming_before_a_write(
    redis: Redis, settings: Settings
) -> None:
    """Once the process was stopped (SIGCONT marks it), ``check_claim`` refuses until
    ``ensure_current`` confirmed the claim with Redis again; then it passes."""
    outcomes: list[str] = []

    async def handle(job: Job[Item]) -> None:
        job.check_claim()
        outcomes.append("fresh")
        engine.consumers["billing"].stalled()
        try:
            job.check_claim()
        except FencedOut:
            outcomes.append("refused after the stall")
        await job.ensure_current()
        job.check_claim()
        outcomes.append("confirmed")

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await process_all(engine)
    assert outcomes == ["fresh", "refused after the stall", "confirmed"]
    assert await redis.xlen(engine.keys.stream("billing")) == 0


async def test_a_job_fenced_out_by_a_stall_nobody_used_runs_again(
    redis: Redis, settings: Settings
) -> None:
    """A FencedOut from a stall while the entry is still this process's moves it back to
    the stream without spending an attempt (the retry script checks ownership), and it
    runs to the end."""
    runs: list[int] = []

    async def handle(job: Job[Item]) -> None:
        runs.append(job.attempt)
        if len(runs) == 1:
            engine.consumers["billing"].stalled()
            job.check_claim()

    engine = make_engine(redis, settings, handle)
    await engine.prepare()
    await engine.producer.enqueue("billing", "item", {"n": 1})
    await process_all(engine)
    await engine.promote_once()
    await process_all(engine)
    assert runs == [1, 1]
    assert await dead_letters(engine) == []
    assert await redis.xlen(engine.keys.stream("billing")) == 0


async def test_a_handler_past_its_timeout_is_retried_then_dead_lettered_while_others_flow(
    redis: Redis, settings: Settings
) -> None:
    """A handler that never returns is cancelled at its job type's timeout; the attempt
    counts (the job knows its last one), the retry times out too, and the job ends
    dead-lettered with reason timeout, while the other jobs on the stream run meanwhile
    and the slot comes free."""
    done: list[int] = []
    hung: list[tuple[int, bool]] = []

    async def hang(job: Job[Item]) -> None:
        hung.append((job.attempt, job.last_attempt))
        await asyncio.Event().wait()  # never returns

    async def quick(job: Job[Item]) -> None:
        done.append(job.payload.n)

    registry = Registry()
    registry.add(JobSpec("billing", "hang", Item, max_attempts=2, timeout_s=0.3), hang)
    registry.add(JobSpec("billing", "item", Item), quick)
    engine = Engine(redis, settings, registry, consumer="test-consumer")
    engine.consumers["billing"].policy.concurrency = 1  # the hung job holds the only slot
    await engine.prepare()
    await engine.producer.send(registry.spec("billing", "hang"), {"n": 0})
    for n in range(1, 4):
        await engine.producer.send(registry.spec("billing", "item"), Item(n=n))
    run = asyncio.create_task(engine.run())
    try:
        async with asyncio.timeout(15):
            while await redis.xlen(engine.keys.dead) < 1 or len(done) < 3:
                await asyncio.sleep(0.05)
    finally:
        engine.stop()
        await run
    assert hung == [(1, False), (2, True)]
    assert sorted(done) == [1, 2, 3]
    (dead,) = await dead_letters(engine)
    assert dead["type"] == "hang"
    assert dead["error"] == (
        "attempts exhausted (2/2): JobTimeout: timeout: still running after 0.3s, cancelled"
    )
    assert engine.consumers["billing"].running == {}


async def test_a_producer_gets_a_clear_error_for_an_invalid_payload(
    redis: Redis, settings: Settings
) -> None:
    """``send`` validates the payload against the job type's model before enqueueing."""

    async def quick(job: Job[Item]) -> None:
        pass

    registry = Registry()
    spec = JobSpec("billing", "item", Item)
    registry.add(spec, quick)
    engine = Engine(redis, settings, registry, consumer="test-consumer")
    await engine.prepare()
    with pytest.raises(InvalidJob, match="invalid payload for item: n: Input should be a valid"):
        await engine.producer.send(spec, {"n": "many"})
    assert await redis.xlen(engine.keys.stream("billing")) == 0
    sent = await engine.producer.send(spec, {"n": 4})
    (entry,) = await redis.xrange(engine.keys.stream("billing"))
    assert entry[0] == sent.entry_id
    assert (entry[1]["type"], entry[1]["payload"]) == ("item", '{"n":4}')
