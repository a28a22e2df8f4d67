"""A real engine in its own process, with handlers the multi-process tests can observe.

Run as ``python tests/engine_worker.py``; settings come from the IMSYS_* environment like
the service's. Effects are written to Redis lists under ``<prefix>:test:``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from pydantic import BaseModel
from redis.asyncio import Redis

from imsys import logging as imsys_logging
from imsys.settings import load_settings
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry


class Work(BaseModel):
    name: str
    ms: int = 0
    limit: int | None = None


async def main() -> None:
    settings = load_settings()
    imsys_logging.configure("info", json=True)
    redis = Redis.from_url(settings.redis.url.get_secret_value(), decode_responses=True)
    registry = Registry()
    engine = Engine(redis, settings, registry)
    log_key = f"{settings.redis.prefix}:test:log"
    pid = os.getpid()
    cap_ms = int(os.environ.get("TEST_SLEEP_CAP_MS", "0")) or None

    async def work(job: Job[Work]) -> None:
        p = job.payload
        if cap_ms is not None:
            p = p.model_copy(update={"ms": min(p.ms, cap_ms)})
        await redis.rpush(log_key, f"{p.name}:start:{pid}")
        if p.limit is not None:
            async with engine.limiter.slot("router:1", p.limit, wait=30):
                now = await redis.incr(f"{settings.redis.prefix}:test:cur")
                await redis.rpush(f"{settings.redis.prefix}:test:conc", now)
                await asyncio.sleep(p.ms / 1000)
                await redis.decr(f"{settings.redis.prefix}:test:cur")
        else:
            await asyncio.sleep(p.ms / 1000)
        await redis.rpush(log_key, f"{p.name}:done:{pid}")

    registry.register("events", "work", Work, work)

    if os.environ.get("TEST_TIMER_EVERY"):

        async def tick(slot: int) -> None:
            await redis.rpush(f"{settings.redis.prefix}:test:ticks", f"{slot}:{pid}")

        engine.add_timer("tick", tick, every=float(os.environ["TEST_TIMER_EVERY"]))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, engine.stop)
    run = asyncio.create_task(engine.run())
    await engine.ready.wait()
    print("ready", flush=True)
    await run
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
