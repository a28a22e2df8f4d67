"""The engine: a consumer per stream plus the loops that keep every entry moving.

It knows no domain: domains register handlers (``registry``) and timers (``add_timer``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from imsys.backoff import REDIS_DOWN, Backoff
from imsys.logging import redact_text
from imsys.settings import STREAMS, Settings
from imsys.streams.consumer import ErrorTranslator, StreamConsumer
from imsys.streams.deadletters import DeadLetters
from imsys.streams.job import Registry
from imsys.streams.keys import GROUP, Keys
from imsys.streams.limits import KeyLimiter, RateLimiter
from imsys.streams.metrics import EngineMetrics, StreamFigures, stream_figures
from imsys.streams.pause import PAUSE_CHECK_S, Pauses
from imsys.streams.producer import Producer
from imsys.streams.scripts import Scripts
from imsys.streams.timers import Timer, TimerFn, TimerRunner

log = structlog.get_logger("imsys.engine")

# Consumers idle this long with nothing pending are leftovers of old processes.
STALE_CONSUMER_MS = 24 * 3_600_000
# A loop that failed this many times in a row makes /healthz report the engine degraded.
LOOP_FAILURES_UNHEALTHY = 3
# ... until it has run this long without failing again.
LOOP_HEALTHY_AFTER_S = 120.0


def new_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Engine:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        registry: Registry,
        *,
        consumer: str | None = None,
        metrics: EngineMetrics | None = None,
        streams: tuple[str, ...] = STREAMS,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.registry = registry
        self.keys = Keys(settings.redis.prefix)
        self.scripts = Scripts(redis)
        self.consumer = consumer or new_consumer_name()
        self.metrics = metrics or EngineMetrics()
        self.producer = Producer(redis, self.keys, self.scripts)
        self.dead_letters = DeadLetters(redis, self.keys, self.scripts)
        self.limiter = KeyLimiter(
            redis,
            self.keys,
            self.scripts,
            lease_s=settings.engine.limit_lease_s,
            wait_s=settings.engine.limit_wait_s,
        )
        self.rates = RateLimiter(self.keys, self.scripts)
        self.timer_runner = TimerRunner(redis, self.keys)
        self.consumers = {
            s: StreamConsumer(
                redis=redis,
                scripts=self.scripts,
                keys=self.keys,
                stream=s,
                policy=settings.streams[s],
                engine=settings.engine,
                registry=registry,
                consumer=self.consumer,
                metrics=self.metrics,
            )
            for s in streams
        }
        self.pauses = Pauses(redis, self.keys, tuple(self.consumers))
        self.timers: list[Timer] = []
        self._group_hooks: list[Callable[[str], Awaitable[None]]] = []
        # The Redis server's run_id as last seen: a new one means a restart or a failover.
        self._redis_run_id: str | None = None
        # Loops that keep failing, by name: (failures in a row, last error, when).
        self._failing: dict[str, tuple[int, str, float]] = {}
        for c in self.consumers.values():
            c.on_group_created = self._group_created
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._prepared = False
        self.started_at = time.time()

    # --- registration ----------------------------------------------------------------------

    def add_timer(self, name: str, fn: TimerFn, *, every: float) -> Timer:
        timer = Timer(name, fn, every=every)
        self.timers.append(timer)
        return timer

    def add_error_translator(self, translate: ErrorTranslator) -> None:
        """Let an adapter map its exceptions to ours (e.g. PostgreSQL away → Unavailable)."""
        for c in self.consumers.values():
            c.translators.append(translate)

    def on_group_created(self, hook: Callable[[str], Awaitable[None]]) -> None:
        """Call ``hook(stream)`` whenever a stream's group had to be created.

        That happens on a first start and after Redis lost its data (a restart without
        persistence, a failover to a replica that had not caught up): whatever jobs the
        stream held may be gone, and the hook re-publishes them from their intents.
        """
        self._group_hooks.append(hook)

    async def _group_created(self, stream: str) -> None:
        for hook in self._group_hooks:
            try:
                await hook(stream)
            except Exception as exc:
                log.exception("group_created_hook_failed", stream=stream, error=repr(exc))

    def health(self) -> list[str]:
        """What is wrong with the engine now (empty when healthy): loops that keep failing.

        A loop counts as failing while it failed ``LOOP_FAILURES_UNHEALTHY`` times in a
        row and the last failure is recent; one that ran a while without failing is well.
        """
        now = time.monotonic()
        return [
            f"loop {name} failed {count} times in a row: {error}"
            for name, (count, error, at) in sorted(self._failing.items())
            if count >= LOOP_FAILURES_UNHEALTHY and now - at < LOOP_HEALTHY_AFTER_S
        ]

    def _loop_failed(self, name: str, exc: BaseException) -> None:
        now = time.monotonic()
        count, _, at = self._failing.get(name, (0, "", now))
        count = count + 1 if now - at < LOOP_HEALTHY_AFTER_S else 1
        self._failing[name] = (count, redact_text(f"{type(exc).__name__}: {exc}")[:300], now)

    def _loop_ok(self, name: str) -> None:
        self._failing.pop(name, None)

    # --- start-up ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Create groups, warn about a Redis that can lose jobs, tidy old consumers."""
        if self._prepared:
            return
        backoff = Backoff(cap=10)
        while True:
            try:
                for c in self.consumers.values():
                    await c.ensure_group()
                break
            except REDIS_DOWN as exc:
                log.warning("redis_unavailable", where="start", error=redact_text(str(exc)))
                if self.stopping.is_set():
                    return
                await backoff.sleep()
        await self.check_redis_durability()
        await self.prune_consumers()
        self._prepared = True

    async def check_redis_durability(self) -> list[str]:
        """Warn (and return why) when Redis would lose or evict jobs."""
        warnings: list[str] = []
        try:
            cfg = await self.redis.config_get("appendonly")
            cfg.update(await self.redis.config_get("maxmemory-policy"))
        except ResponseError:
            log.info("redis_config_unreadable", hint="CONFIG is disabled; durability not checked")
            return warnings
        if cfg.get("appendonly") != "yes":
            warnings.append("appendonly is 'no': a Redis restart loses every waiting job")
        policy = cfg.get("maxmemory-policy")
        if policy != "noeviction":
            warnings.append(f"maxmemory-policy is '{policy}': Redis may evict queued jobs")
        for w in warnings:
            log.warning("redis_durability", problem=w)
        return warnings

    async def prune_consumers(self) -> int:
        """Delete consumers that own nothing and have been idle a day (never one with pending)."""
        pruned = 0
        for c in self.consumers.values():
            try:
                infos = await self.redis.xinfo_consumers(c.key, GROUP)
            except ResponseError:
                continue
            for info in infos:
                if (
                    info["name"] != self.consumer
                    and int(info["pending"]) == 0
                    and int(info["idle"]) > STALE_CONSUMER_MS
                ):
                    await self.redis.xgroup_delconsumer(c.key, GROUP, info["name"])
                    pruned += 1
        if pruned:
            log.info("stale_consumers_pruned", count=pruned)
        return pruned

    # --- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until ``stop()``; then drain and return (the caller exits 0)."""
        await self.prepare()
        if self.stopping.is_set():
            return
        try:
            # Before the first read: a process starting during a pause must not run a job.
            await self.check_pauses()
        except REDIS_DOWN:
            pass  # its loop tries again; the readers wait for Redis as well
        readers = [
            asyncio.create_task(self._supervise(f"read:{s}", c.read_loop), name=f"read:{s}:{i}")
            for s, c in self.consumers.items()
            for i in range(self.settings.engine.readers_per_stream)
        ]
        ackers = [
            asyncio.create_task(c.ack_loop(), name=f"ack:{s}") for s, c in self.consumers.items()
        ]
        eng = self.settings.engine
        background = [
            asyncio.create_task(self._every("promote", eng.promote_interval_s, self.promote_once)),
            asyncio.create_task(self._every("recover", eng.recover_interval_s, self.recover_once)),
            asyncio.create_task(self._every("heartbeat", eng.heartbeat_s, self.heartbeat_once)),
            asyncio.create_task(self._every("pauses", PAUSE_CHECK_S, self.check_pauses)),
            *(
                asyncio.create_task(self.timer_runner.run(t, self.stopping), name=f"timer:{t.name}")
                for t in self.timers
            ),
        ]
        self._watch_for_stalls()
        self.ready.set()
        log.info(
            "engine_started",
            consumer=self.consumer,
            streams={s: c.policy.concurrency for s, c in self.consumers.items()},
            timers=[t.name for t in self.timers],
        )
        await self.stopping.wait()
        log.info("engine_stopping", running=sum(len(c.running) for c in self.consumers.values()))
        for c in self.consumers.values():
            c.stop_reading()
        await asyncio.wait(readers, timeout=eng.read_block_ms / 1000 + 2)
        for t in readers:
            t.cancel()
        drained = await asyncio.gather(
            *(c.drain(eng.grace_period_s) for c in self.consumers.values())
        )
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for c in self.consumers.values():
            c.stop_reading()
        await asyncio.wait(ackers, timeout=5)
        for t in ackers:
            t.cancel()
        await self._forget_process()
        log.info("engine_stopped", drained=sum(drained))

    def _watch_for_stalls(self) -> None:
        """On SIGCONT (the process was stopped), every claim needs confirming again.

        A Python-level handler, not the loop's: it runs at the next bytecode, before the
        loop could send a write a stale claim no longer covers. Only the main thread may
        set it; elsewhere (tests' threads) claim times alone bound the staleness.
        """

        def resumed(_signum: int, _frame: object) -> None:
            for c in self.consumers.values():
                c.stalled()

        try:
            signal.signal(signal.SIGCONT, resumed)
        except ValueError:
            pass

    def stop(self) -> None:
        """Idempotent; safe to call from a signal handler."""
        self.stopping.set()

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Restart a loop that died of a bug, after a pause: never a crash loop."""
        backoff = Backoff(first=1, cap=30)
        while not self.stopping.is_set():
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("loop_crashed", loop=name, error=redact_text(repr(exc)))
                self._loop_failed(name, exc)
                await backoff.sleep()

    async def _every(self, name: str, interval: float, fn: Callable[[], Awaitable[Any]]) -> None:
        backoff = Backoff(first=0.5, cap=10)
        while not self.stopping.is_set():
            try:
                await fn()
                self._loop_ok(name)
                if backoff.reset():
                    log.info("redis_reconnected", where=name)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as exc:
                log.warning("redis_unavailable", where=name, error=redact_text(str(exc)))
                await backoff.sleep()
                continue
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    for c in self.consumers.values():
                        await c.ensure_group(lost=True)
                else:
                    log.exception("loop_failed", loop=name, error=redact_text(str(exc)))
                    self._loop_failed(name, exc)
            except Exception as exc:
                log.exception("loop_failed", loop=name, error=redact_text(repr(exc)))
                self._loop_failed(name, exc)
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)
            except TimeoutError:
                pass

    # --- the periodic steps (also used directly by tests) -----------------------------------

    async def promote_once(self) -> int:
        return sum([await c.promote_once() for c in self.consumers.values()])

    async def recover_once(self) -> int:
        return sum([await c.recover_once() for c in self.consumers.values()])

    async def heartbeat_once(self) -> None:
        await self.check_redis_server()
        for c in self.consumers.values():
            await c.heartbeat_once()
        await self.limiter.refresh()
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": int(self.started_at * 1000),
            "seen_at": int(time.time() * 1000),
            "running": {s: len(c.running) for s, c in self.consumers.items()},
            "paused": sorted(s for s, c in self.consumers.items() if c.paused),
        }
        await self.redis.hset(self.keys.processes, self.consumer, orjson.dumps(info))

    async def check_pauses(self) -> dict[str, int]:
        """Pause or resume this process's consumers as Redis says (every PAUSE_CHECK_S)."""
        return await self.pauses.apply(self.consumers)

    async def pause(self, stream: str) -> bool:
        """Pause ``stream`` in every process (here at once); False if it already was."""
        changed = await self.pauses.pause(stream)
        await self.check_pauses()
        return changed

    async def resume(self, stream: str) -> bool:
        """Resume ``stream`` in every process (here at once); False if it was not paused."""
        changed = await self.pauses.resume(stream)
        await self.check_pauses()
        return changed

    async def check_redis_server(self) -> bool:
        """Notice that Redis is another server than before; True when it changed.

        A restart or a Sentinel failover gives the primary a new ``run_id``. Writes the
        old server acknowledged may be gone (no persistence, or replication that had not
        caught up) even though the groups still exist, so the group-created hooks run for
        every stream: they re-publish the intents from PostgreSQL (deduplicated by job_id).
        """
        run_id = (await self.redis.info("server")).get("run_id")
        previous, self._redis_run_id = self._redis_run_id, run_id
        if previous is None or run_id == previous:
            return False
        log.warning(
            "redis_server_changed",
            hint="Redis restarted or failed over: re-publishing intents whose jobs may be lost",
        )
        for stream in self.consumers:
            await self._group_created(stream)
        return True

    async def _forget_process(self) -> None:
        try:
            await self.redis.hdel(self.keys.processes, self.consumer)
        except REDIS_DOWN:
            pass

    # --- inspection ----------------------------------------------------------------------------

    async def figures(self) -> list[StreamFigures]:
        figures = [await stream_figures(self.redis, self.keys, s) for s in self.consumers]
        paused = await self.pauses.paused()
        for f in figures:
            f.paused = f.stream in paused
        return figures

    async def progress(self) -> dict[str, list[dict[str, Any]]]:
        return await job_progress(self.redis, self.keys, list(self.consumers))

    async def processes(self) -> list[dict[str, Any]]:
        return await live_processes(self.redis, self.keys, self.settings.engine.heartbeat_s)


async def job_progress(
    redis: Redis, keys: Keys, streams: list[str]
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in streams:
        rows = await redis.hgetall(keys.progress(s))
        out[s] = [{"entry_id": k, **orjson.loads(v)} for k, v in sorted(rows.items())]
    return out


async def live_processes(redis: Redis, keys: Keys, heartbeat_s: float) -> list[dict[str, Any]]:
    """Processes whose heartbeat is recent (three missed beats and they are gone)."""
    now = time.time() * 1000
    out = []
    for name, raw in (await redis.hgetall(keys.processes)).items():
        info = orjson.loads(raw)
        if now - info.get("seen_at", 0) <= heartbeat_s * 3000:
            out.append({"consumer": name, **info})
    return out
