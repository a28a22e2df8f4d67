"""Pausing a stream: it accepts jobs and runs none, in every engine on the prefix, and lets
running jobs finish; resuming runs the waiting ones. Real Redis, real engines."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis

from imsys.settings import Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry
from imsys.streams.keys import GROUP, Keys
from tests.conftest import ROOT, subprocess_env
from tests.test_engine_processes import FAST, producer, workers

STREAM = "billing"


class Item(BaseModel):
    n: int


async def wait_for(
    check: Callable[[], Awaitable[Any]], timeout: float = 20.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.02)


class Recorder:
    """A handler that records each job it starts; job ``hold`` waits for ``release``."""

    def __init__(self, hold: int | None = None) -> None:
        self.started: list[int] = []
        self.hold = hold
        self.release = asyncio.Event()

    async def __call__(self, job: Job[Item]) -> None:
        self.started.append(job.payload.n)
        if job.payload.n == self.hold:
            await self.release.wait()


def make_engine(redis: Redis, settings: Settings, handler: Recorder, name: str) -> Engine:
    registry = Registry()
    registry.register(STREAM, "item", Item, handler)
    return Engine(redis, settings, registry, consumer=name)


@contextlib.asynccontextmanager
async def running(*engines: Engine) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(e.run()) for e in engines]
    try:
        for e in engines:
            await asyncio.wait_for(e.ready.wait(), 20)
        yield
    finally:
        for e in engines:
            e.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def processed(redis: Redis, engine: Engine) -> int:
    return int(await redis.hget(engine.keys.stats(STREAM), "processed") or 0)


async def heartbeats(redis: Redis, keys: Keys, consumers: list[str], count: int) -> None:
    """Wait until every named process has sent ``count`` more heartbeats (each a full turn
    of its loops: reads, if any were made, would long have returned entries)."""
    seen: dict[str, set[int]] = {c: set() for c in consumers}

    async def enough() -> bool:
        for name, raw in (await redis.hgetall(keys.processes)).items():
            if name in seen:
                seen[name].add(orjson.loads(raw)["seen_at"])
        # The first value read may predate the call: it does not count.
        return all(len(v) > count for v in seen.values())

    await wait_for(enough, what=f"{count} heartbeats of {consumers}")


async def test_paused_stream_accepts_jobs_runs_none_in_either_engine_until_resumed(
    redis: Redis, settings: Settings
) -> None:
    """Two engines on one prefix: a pause made through one holds both (the job running at
    the time finishes and is acknowledged); jobs enqueued meanwhile are accepted and wait
    undelivered; a resume made through the other runs every one of them, none dead."""
    settings.streams[STREAM].concurrency = 2
    rec_a, rec_b = Recorder(hold=0), Recorder(hold=0)
    a = make_engine(redis, settings, rec_a, "engine-a")
    b = make_engine(redis, settings, rec_b, "engine-b")
    key = a.keys.stream(STREAM)
    async with running(a, b):
        await a.producer.enqueue(STREAM, "item", {"n": 0})
        await wait_for(lambda: _true(rec_a.started or rec_b.started), what="job 0 started")
        holder = rec_a if rec_a.started else rec_b

        assert await a.pause(STREAM) is True
        assert await a.pause(STREAM) is False  # already paused: nothing changes
        await wait_for(lambda: _true(b.consumers[STREAM].paused), what="engine b paused")
        for n in range(1, 7):
            await a.producer.enqueue(STREAM, "item", {"n": n})
        assert await redis.xlen(key) == 7
        await heartbeats(redis, a.keys, ["engine-a", "engine-b"], 3)
        assert rec_a.started + rec_b.started == [0]
        assert (await redis.xpending(key, GROUP))["pending"] == 1  # job 0 alone: none read
        figures = {f.stream: f for f in await b.figures()}
        assert figures[STREAM].paused is True
        assert figures["events"].paused is False
        procs = {p["consumer"]: p for p in await a.processes()}
        assert procs["engine-a"]["paused"] == procs["engine-b"]["paused"] == [STREAM]

        holder.release.set()  # the running job finishes while paused
        await wait_for(lambda: _eq(processed(redis, a), 1), what="job 0 acknowledged")
        await heartbeats(redis, a.keys, ["engine-a", "engine-b"], 2)
        assert rec_a.started + rec_b.started == [0]

        assert await b.resume(STREAM) is True
        assert await b.resume(STREAM) is False
        await wait_for(lambda: _eq(processed(redis, a), 7), what="every job processed")
        assert sorted(rec_a.started + rec_b.started) == list(range(7))
        assert await a.dead_letters.count() == 0
        assert not (await b.figures())[0].paused


async def test_pausing_hands_back_read_ahead_entries_to_the_stream(
    redis: Redis, settings: Settings
) -> None:
    """Entries a consumer read ahead of a free slot go back to the stream when the pause
    reaches it (delivered to nobody); the slot that frees starts none of them."""
    settings.streams[STREAM].concurrency = 1
    settings.streams[STREAM].prefetch = 3
    rec = Recorder(hold=0)
    engine = make_engine(redis, settings, rec, "engine-a")
    consumer = engine.consumers[STREAM]
    key = engine.keys.stream(STREAM)
    async with running(engine):
        for n in range(4):
            await engine.producer.enqueue(STREAM, "item", {"n": n})
        await wait_for(lambda: _eq(_len(consumer._buffer), 3), what="3 entries read ahead")
        assert rec.started == [0]
        assert (await redis.xpending(key, GROUP))["pending"] == 4

        await engine.pause(STREAM)
        assert len(consumer._buffer) == 0
        assert (await redis.xpending(key, GROUP))["pending"] == 1
        assert await redis.xlen(key) == 4
        rec.release.set()
        await wait_for(lambda: _eq(processed(redis, engine), 1), what="job 0 acknowledged")
        await heartbeats(redis, engine.keys, ["engine-a"], 2)
        assert rec.started == [0]

        await engine.resume(STREAM)
        await wait_for(lambda: _eq(processed(redis, engine), 4), what="the rest processed")
        assert sorted(rec.started) == [0, 1, 2, 3]


async def test_recovery_leaves_a_dead_process_entries_alone_while_paused(
    redis: Redis, settings: Settings
) -> None:
    """A dead process's pending entry is not claimed (so not run) by recovery while its
    stream is paused; after the resume, recovery claims and runs it."""
    rec = Recorder()
    engine = make_engine(redis, settings, rec, "engine-a")
    await engine.prepare()
    key = engine.keys.stream(STREAM)
    await engine.producer.enqueue(STREAM, "item", {"n": 5})
    [[_, [(entry_id, _)]]] = await redis.xreadgroup(GROUP, "dead-one", {key: ">"}, count=1)
    # Idle for ten minutes, as if its process died long ago.
    await redis.xclaim(key, GROUP, "dead-one", 0, [entry_id], idle=600_000)

    await engine.pause(STREAM)
    assert await engine.recover_once() == 0
    [pending] = await redis.xpending_range(key, GROUP, "-", "+", 10)
    assert pending["consumer"] == "dead-one"
    assert rec.started == []

    await engine.resume(STREAM)
    assert await engine.recover_once() == 1
    consumer = engine.consumers[STREAM]
    while consumer.running:
        await asyncio.sleep(0.01)
    await consumer.flush()
    assert rec.started == [5]
    assert await processed(redis, engine) == 1


async def test_timers_keep_enqueueing_into_a_paused_stream(
    redis: Redis, settings: Settings
) -> None:
    """A timer that enqueues goes on while its stream is paused: the jobs pile up, none
    runs, and they all run on resume."""
    rec = Recorder()
    engine = make_engine(redis, settings, rec, "engine-a")
    ticks: list[int] = []

    async def tick(slot: int) -> None:
        ticks.append(slot)
        await engine.producer.enqueue(STREAM, "item", {"n": slot})

    engine.add_timer("feeder", tick, every=0.05)
    await engine.prepare()
    await engine.pauses.pause(STREAM)  # paused before the engine starts
    key = engine.keys.stream(STREAM)
    async with running(engine):
        await wait_for(lambda: _ge(redis.xlen(key), 3), what="3 timer jobs enqueued")
        await heartbeats(redis, engine.keys, ["engine-a"], 2)
        assert rec.started == []
        await engine.resume(STREAM)
        count = len(ticks)
        await wait_for(lambda: _ge(processed(redis, engine), count), what="timer jobs run")
    assert rec.started


async def test_command_line_pause_holds_two_processes_and_resume_runs_the_waiting_jobs(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    """`python -m imsys queues pause events` holds two engine processes (their running job
    finishes; new jobs start nowhere); `queues resume events` runs them; an unknown stream
    is refused with status 2."""
    log = f"{prefix}:test:log"
    env = subprocess_env(settings, **FAST)
    keys = Keys(prefix)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imsys", "queues", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with workers(env, 2) as procs:
        jobs = producer(redis, prefix)
        await jobs.enqueue("events", "work", {"name": "long", "ms": 1500})
        await wait_for(lambda: redis.lrange(log, 0, -1), what="the long job started")

        out = cli("pause", "events")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "events paused"

        async def all_paused() -> bool:
            found = [orjson.loads(v) for v in (await redis.hgetall(keys.processes)).values()]
            return len(found) == 2 and all(p["paused"] == ["events"] for p in found)

        await wait_for(all_paused, what="both processes paused")
        for n in range(4):
            await jobs.enqueue("events", "work", {"name": f"w{n}"})
        names = [f"{p.pid}" for p in procs]
        await wait_for(
            lambda: _contains(redis.lrange(log, 0, -1), "long:done:"), what="long job done"
        )
        consumers = list(await redis.hgetall(keys.processes))
        await heartbeats(redis, keys, consumers, 3)
        entries = await redis.lrange(log, 0, -1)
        assert [e for e in entries if e.startswith("w")] == [], entries
        assert len(names) == 2

        assert cli("resume", "events").stdout.strip() == "events resumed"

        async def all_done() -> bool:
            done = [e for e in await redis.lrange(log, 0, -1) if ":done:" in e]
            return len(done) == 5

        await wait_for(all_done, what="the waiting jobs ran")
        bad = cli("pause", "nope")
        assert bad.returncode == 2
        assert "invalid choice" in bad.stderr


async def _true(value: Any) -> bool:
    return bool(value)


async def _eq(value: Awaitable[int] | int, expected: int) -> bool:
    got = await value if not isinstance(value, int) else value
    return got == expected


async def _ge(value: Awaitable[int], least: int) -> bool:
    return await value >= least


async def _len(value: Any) -> int:
    return len(value)


async def _contains(value: Awaitable[list[str]], fragment: str) -> bool:
    return any(fragment in e for e in await value)
