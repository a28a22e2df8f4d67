"""The engine across real processes: kills, signals, shared limits and timers, Redis restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from imsys.settings import Settings
from imsys.streams.keys import GROUP, Keys
from imsys.streams.producer import Producer
from imsys.streams.scripts import Scripts
from tests.conftest import ROOT, subprocess_env

WORKER = str(ROOT / "tests" / "engine_worker.py")
FAST = {
    "IMSYS_ENGINE__CLAIM_IDLE_S": "1.0",
    "IMSYS_ENGINE__HEARTBEAT_S": "0.25",
    "IMSYS_ENGINE__RECOVER_INTERVAL_S": "0.25",
    "IMSYS_ENGINE__READ_BLOCK_MS": "100",
    "IMSYS_ENGINE__GRACE_PERIOD_S": "5",
}


class Worker:
    """One engine process; its log goes to a file so a full pipe can never block it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="imsys-worker-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, WORKER],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"worker did not start: {self.output()}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.unlink(self.log.name)


@contextmanager
def workers(env: dict[str, str], count: int = 1) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for _ in range(count):
            started.append(Worker(env))
        yield started
    finally:
        for w in started:
            w.stop()


async def wait_for(check, timeout: float = 15.0, every: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


def producer(redis: Redis, prefix: str) -> Producer:
    keys = Keys(prefix)
    return Producer(redis, keys, Scripts(redis))


async def test_sigkill_mid_job_is_recovered_by_another_process(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    """A process killed mid-job leaves the entry pending; a second process runs it; none lost."""
    log = f"{prefix}:test:log"
    env = subprocess_env(settings, **FAST)
    with workers(env) as [first]:
        await producer(redis, prefix).enqueue("events", "work", {"name": "a", "ms": 60_000})
        await wait_for(lambda: redis.lrange(log, 0, -1))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert await redis.lrange(log, 0, -1) == [f"a:start:{first.pid}"]
        key = Keys(prefix).stream("events")
        assert (await redis.xpending(key, GROUP))["pending"] == 1
        with workers({**env, "TEST_SLEEP_CAP_MS": "50"}) as [second]:

            async def done() -> bool:
                return f"a:done:{second.pid}" in await redis.lrange(log, 0, -1)

            await wait_for(done)
            await wait_for(lambda: _empty(redis, key))
            assert "jobs_recovered" in second.output()


async def _empty(redis: Redis, key: str) -> bool:
    return await redis.xlen(key) == 0 and (await redis.xpending(key, GROUP))["pending"] == 0


async def test_sigterm_drains_running_job_and_exits_zero(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    """SIGTERM stops reading, lets the running job finish, acks it and exits 0."""
    log = f"{prefix}:test:log"
    with workers(subprocess_env(settings, **FAST)) as [w]:
        await producer(redis, prefix).enqueue("events", "work", {"name": "d", "ms": 800})
        await wait_for(lambda: redis.lrange(log, 0, -1))
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(15) == 0
        assert await redis.lrange(log, 0, -1) == [f"d:start:{w.pid}", f"d:done:{w.pid}"]
        assert await _empty(redis, Keys(prefix).stream("events"))
        assert "engine_stopped" in w.output()


async def test_per_key_limit_holds_across_two_processes(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    """Two processes share one key's limit of 2: never more than 2 holders at once."""
    log = f"{prefix}:test:log"
    env = subprocess_env(
        settings,
        **FAST,
        IMSYS_STREAMS__EVENTS__CONCURRENCY="3",
        IMSYS_STREAMS__EVENTS__PREFETCH="0",
    )
    with workers(env, count=2) as pair:
        await producer(redis, prefix).enqueue_many(
            "events", "work", ({"name": f"l{i}", "ms": 60, "limit": 2} for i in range(24))
        )

        async def all_done() -> bool:
            entries = await redis.lrange(log, 0, -1)
            return sum(e.split(":")[1] == "done" for e in entries) == 24

        await wait_for(all_done, timeout=30)
        levels = [int(x) for x in await redis.lrange(f"{prefix}:test:conc", 0, -1)]
        assert max(levels) == 2
        workers_seen = {e.rsplit(":", 1)[1] for e in await redis.lrange(log, 0, -1)}
        assert workers_seen == {str(w.pid) for w in pair}


async def test_timer_fires_once_per_slot_across_two_processes(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    """Two processes with the same timer: each slot fires exactly once."""
    with workers(subprocess_env(settings, TEST_TIMER_EVERY="0.5", **FAST), count=2):
        await asyncio.sleep(3.2)
    ticks = await redis.lrange(f"{prefix}:test:ticks", 0, -1)
    slots = [int(t.split(":")[0]) for t in ticks]
    assert len(slots) == len(set(slots))
    assert len(slots) >= 5
    assert sorted(slots) == list(range(min(slots), max(slots) + 1, 500))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, so restarting it touches nothing shared."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="imsys-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for this test"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("private redis did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


async def test_redis_restart_under_running_process(
    settings: Settings, prefix: str, private_redis: PrivateRedis
) -> None:
    """Redis dies and returns empty: the process lives on, recreates its group, resumes."""
    env = subprocess_env(settings, **FAST, IMSYS_REDIS__URL=private_redis.url)
    client = Redis.from_url(private_redis.url, decode_responses=True)
    log = f"{prefix}:test:log"
    try:
        with workers(env) as [w]:
            await producer(client, prefix).enqueue("events", "work", {"name": "before"})
            await wait_for(lambda: _contains(client, log, "before:done"))
            private_redis.stop()
            await asyncio.sleep(1.5)
            assert w.proc.poll() is None, "the process must survive Redis going away"
            private_redis.start()
            await client.connection_pool.disconnect()
            # The group is gone with the data; the process must make it again, then consume.
            await wait_for(lambda: _group_exists(client, Keys(prefix).stream("events")))
            await producer(client, prefix).enqueue("events", "work", {"name": "after"})
            await wait_for(lambda: _contains(client, log, "after:done"), timeout=20)
            assert w.proc.poll() is None
            out = w.output()
            assert "redis_unavailable" in out
            assert "consumer_group_recreated" in out
            assert '"possible_data_loss": true' in out
    finally:
        await client.aclose()


async def _contains(client: Redis, key: str, needle: str) -> bool:
    return any(needle in e for e in await client.lrange(key, 0, -1))


async def _group_exists(client: Redis, key: str) -> bool:
    try:
        return any(g["name"] == GROUP for g in await client.xinfo_groups(key))
    except Exception:
        return False
