"""Redis Sentinel: a real primary, replica and three sentinels on loopback; imsys follows
the failover under load and loses no job whose enqueue was acknowledged and replicated."""

from __future__ import annotations

import asyncio
import functools
import itertools
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelManagedSSLConnection
from redis.exceptions import ReadOnlyError
from structlog.testing import capture_logs

from imsys.backoff import REDIS_DOWN
from imsys.redisconn import SentinelRedis, make_redis
from imsys.settings import RedisSettings, Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry
from imsys.streams.keys import GROUP

MASTER = "imsys-test"
STREAM = "billing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SentinelBed:
    """A primary, one replica and three sentinels, each a private process on loopback."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="imsys-sentinel-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for this test"
        self.binary = binary

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [self.binary, *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        log.close()

    def _node(self, name: str, port: int, *extra: str) -> None:
        data = self.dir / name
        data.mkdir()
        self._spawn(
            name,
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data), *extra,
        )  # fmt: skip

    def start(self) -> None:
        self._node("primary", self.primary_port)
        self._node("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        self._wait(
            lambda: b"master_link_status:up" in self._ask(self.replica_port, "INFO replication")
        )
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 3000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self._spawn(f"sentinel-{i}", str(conf), "--sentinel")
        # Every sentinel must know the other two and the replica before a failover can run.
        for port in self.sentinel_ports:
            self._wait(functools.partial(self._sentinel_ready, port), timeout=20)

    def _sentinel_ready(self, port: int) -> bool:
        reply = self._ask(port, f"SENTINEL MASTER {MASTER}").split(b"\r\n")
        fields = {reply[i]: reply[i + 2] for i in range(2, len(reply) - 2, 4)}
        return fields.get(b"num-other-sentinels") == b"2" and fields.get(b"num-slaves") == b"1"

    @staticmethod
    def _ask(port: int, command: str) -> bytes:
        """One inline command over a raw socket; empty when the server does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(command.encode() + b"\r\n")
                time.sleep(0.05)
                return s.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _wait(ok: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.1)
        raise AssertionError("the Sentinel test bed did not come up")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def redis_settings(self, prefix: str) -> RedisSettings:
        # The URL's host and port lead nowhere: only the sentinels can find the primary.
        return RedisSettings(
            url=f"redis://127.0.0.1:{free_port()}/3",
            prefix=prefix,
            sentinels=[f"127.0.0.1:{p}" for p in self.sentinel_ports],
            sentinel_master=MASTER,
        )


@pytest.fixture
def bed() -> Iterator[SentinelBed]:
    """A fresh test bed per test (a failover changes it); every process ends even on failure."""
    bed = SentinelBed()
    try:
        bed.start()
        yield bed
    finally:
        bed.stop()


class Item(BaseModel):
    n: int


def engine_settings(bed: SentinelBed) -> Settings:
    return Settings(
        redis=bed.redis_settings("sentinel-test"),
        engine={
            "read_block_ms": 100,
            "claim_idle_s": 1.0,
            "heartbeat_s": 0.25,
            "recover_interval_s": 0.25,
            "promote_interval_s": 0.05,
            "grace_period_s": 5.0,
        },
        streams={STREAM: {"concurrency": 10, "max_attempts": 10, "backoff_base": 0.05}},
    )


async def wait_until(ok: Callable[[], Awaitable[bool] | bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = ok()
        if result if isinstance(result, bool) else await result:
            return True
        await asyncio.sleep(0.05)
    return False


class Load:
    """Enqueues jobs without pause; records which were acknowledged and replicated."""

    def __init__(self, client: Redis, key: str) -> None:
        self.client = client
        self.key = key
        self.counter = itertools.count()
        self.safe: set[int] = set()  # acknowledged, and on a replica or on the surviving primary
        self.replicate = True  # WAIT for a replica (there is none left after the failover)
        self.running = True

    async def run(self) -> None:
        while self.running:
            batch = [next(self.counter) for _ in range(10)]
            # One pipeline is one connection: WAIT then covers exactly these XADDs.
            pipe = self.client.pipeline(transaction=False)
            for n in batch:
                pipe.xadd(self.key, {"type": "item", "payload": orjson.dumps({"n": n}).decode()})
            if self.replicate:
                pipe.execute_command("WAIT", 1, 1000)
            try:
                replies: list[Any] = await pipe.execute()
            except REDIS_DOWN:
                await asyncio.sleep(0.05)
                continue
            if not self.replicate or replies[-1] >= 1:
                self.safe.update(batch)
            await asyncio.sleep(0.01)


async def test_url_client_keeps_its_options() -> None:
    """Without sentinels the client is the URL's node, with keepalive, timeouts and pool size."""
    client = make_redis(RedisSettings(url="redis://:pw@127.0.0.1:6390/4"), decode=False)
    kwargs = client.connection_pool.connection_kwargs
    assert not isinstance(client, SentinelRedis)
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "127.0.0.1", 6390, 4, "pw",
    )  # fmt: skip
    assert kwargs["decode_responses"] is False
    assert kwargs["socket_keepalive"] is True
    assert kwargs["socket_connect_timeout"] == 5
    assert kwargs["health_check_interval"] == 30
    assert client.connection_pool.max_connections == 1000
    await client.aclose()


async def test_sentinel_client_takes_db_password_and_tls_from_the_url() -> None:
    """With sentinels, the URL gives db, username, password and TLS; host and port are not
    used; the sentinels get their own password."""
    cfg = RedisSettings(
        url="rediss://app:pw@ignored.invalid:1/5",
        sentinels=["127.0.0.1:26379", "[::1]:26380"],
        sentinel_master="imsys",
        sentinel_password="sentinel-pw",
    )
    client = make_redis(cfg)
    assert isinstance(client, SentinelRedis)
    assert client.sentinel_manager is not None
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    assert "host" not in kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (5, "app", "pw")
    assert kwargs["decode_responses"] is True
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    sentinels = client.sentinel_manager.sentinels
    kwargs_of = [s.connection_pool.connection_kwargs for s in sentinels]
    assert [(k["host"], k["port"]) for k in kwargs_of] == [("127.0.0.1", 26379), ("::1", 26380)]
    assert kwargs_of[0]["password"] == "sentinel-pw"
    await client.aclose()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_failover_under_load_loses_no_replicated_job(bed: SentinelBed) -> None:
    """SIGKILL the primary under load: jobs complete on the new primary within 15 s, and
    every job whose enqueue was acknowledged and replicated is processed."""
    settings = engine_settings(bed)
    processed: set[int] = set()

    async def handle(job: Job[Item]) -> None:
        await asyncio.sleep(0.02)
        processed.add(job.payload.n)

    registry = Registry()
    registry.register(STREAM, "item", Item, handle)
    redis = make_redis(settings)
    producer_client = make_redis(settings)
    assert isinstance(redis, SentinelRedis)
    engine = Engine(redis, settings, registry, streams=(STREAM,), consumer="sentinel-test")
    load = Load(producer_client, engine.keys.stream(STREAM))
    runner = asyncio.create_task(engine.run())
    loader = asyncio.create_task(load.run())
    try:
        with capture_logs() as logs:
            assert await wait_until(lambda: len(processed) >= 200, 15), "no load before the kill"
            # The replica has none of the engine's Lua scripts: the new primary will answer
            # NOSCRIPT, and redis-py's Script objects must load them again.
            replica = Redis(port=bed.replica_port, db=3)
            assert await replica.script_exists(engine.scripts.ack.sha) == [False]

            bed.kill("primary")
            killed_at = time.monotonic()
            load.replicate = False
            before_kill = len(processed)
            after: set[int] = set()
            first_after_kill = next(load.counter) + 1  # numbers from here are enqueued later

            def resumed() -> bool:
                after.update(n for n in processed if n >= first_after_kill)
                return len(after) >= 20

            assert await wait_until(resumed, 15), (
                f"no job completed within 15 s of the kill ({len(processed)} processed)"
            )
            resumed_s = time.monotonic() - killed_at
            load.running = False
            await loader
            await wait_until(lambda: not (load.safe - processed), 20)
            lost = sorted(load.safe - processed)
            assert lost == [], f"{len(lost)} acknowledged and replicated jobs lost"

            # It really was a failover, and imsys really talks to the former replica now.
            sentinel = Redis(port=bed.sentinel_ports[0], decode_responses=True)
            _, port = await sentinel.sentinel_get_master_addr_by_name(MASTER)
            assert int(port) == bed.replica_port
            # Everything settles there: acknowledged and deleted, so the scripts were reloaded.
            assert await wait_until(lambda: _settled(replica, engine.keys.stream(STREAM)), 15)
            assert await replica.script_exists(engine.scripts.ack.sha) == [True]
            assert engine.health() == []
            await sentinel.aclose()
            await replica.aclose()
        events = [e["event"] for e in logs]
        assert "redis_unavailable" in events
        assert "loop_crashed" not in events, [e for e in logs if e["event"] == "loop_crashed"]
        assert before_kill < len(processed)
        assert resumed_s < 15
    finally:
        load.running = False
        engine.stop()
        await asyncio.wait_for(runner, 30)
        if not loader.done():
            loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        await redis.aclose()
        await producer_client.aclose()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_planned_failover_demotes_the_old_primary_without_a_crash(bed: SentinelBed) -> None:
    """SENTINEL FAILOVER keeps the old primary alive as a replica: its READONLY answers make
    imsys reconnect to the new primary; no loop crashes and every job is processed."""
    settings = engine_settings(bed)
    processed: set[int] = set()

    async def handle(job: Job[Item]) -> None:
        await asyncio.sleep(0.02)
        processed.add(job.payload.n)

    registry = Registry()
    registry.register(STREAM, "item", Item, handle)
    redis = make_redis(settings, decode=False)
    producer_client = make_redis(settings)
    engine = Engine(make_redis(settings), settings, registry, streams=(STREAM,))
    # WAIT throughout: a write the old primary takes after the promotion reaches no
    # replica, is lost by design when it is demoted, and is not counted.
    load = Load(producer_client, engine.keys.stream(STREAM))
    runner = asyncio.create_task(engine.run())
    loader = asyncio.create_task(load.run())
    sentinel = Redis(port=bed.sentinel_ports[0], decode_responses=True)
    try:
        with capture_logs() as logs:
            assert await wait_until(lambda: len(processed) >= 100, 15)
            # A bytes client (decode=False) through Sentinel, as the engine's reader uses.
            assert await redis.ping()
            await redis.set("sentinel-test:probe", b"\xff")
            assert await redis.get("sentinel-test:probe") == b"\xff"

            await sentinel.execute_command("SENTINEL", "FAILOVER", MASTER)
            assert await wait_until(lambda: _primary_is(sentinel, bed.replica_port), 15), (
                "the sentinels did not fail over"
            )
            mark = next(load.counter) + 1
            assert await wait_until(lambda: sum(n >= mark for n in processed) >= 20, 15)
            load.running = False
            await loader
            assert await wait_until(lambda: not (load.safe - processed), 20), (
                f"{len(load.safe - processed)} acknowledged jobs not processed"
            )
            new_primary = Redis(port=bed.replica_port, db=3)
            assert await wait_until(lambda: _settled(new_primary, engine.keys.stream(STREAM)), 15)
            await new_primary.aclose()
            # The bytes client follows too.
            assert await redis.get("sentinel-test:probe") == b"\xff"
            # A plain client on the demoted node sees READONLY: imsys counts that as Redis away.
            old = Redis(port=bed.primary_port)
            assert await wait_until(lambda: _is_replica(old), 10)
            with pytest.raises(REDIS_DOWN) as caught:
                await old.set("sentinel-test:x", 1)
            assert isinstance(caught.value, ReadOnlyError)
            await old.aclose()
        crashed = [e for e in logs if e["event"] == "loop_crashed"]
        assert crashed == []
        assert engine.health() == []
    finally:
        load.running = False
        engine.stop()
        await asyncio.wait_for(runner, 30)
        if not loader.done():
            loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        await sentinel.aclose()
        await redis.aclose()
        await producer_client.aclose()
        await engine.redis.aclose()


async def _settled(client: Redis, key: str) -> bool:
    pending = await client.xpending(key, GROUP)
    return bool(pending["pending"] == 0 and await client.xlen(key) == 0)


async def _primary_is(sentinel: Redis, port: int) -> bool:
    _, current = await sentinel.sentinel_get_master_addr_by_name(MASTER)
    return int(current) == port


async def _is_replica(client: Redis) -> bool:
    info = await client.info("replication")
    return bool(info.get("role") == "slave")
