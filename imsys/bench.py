"""``python -m imsys bench``: the real engine against the peers' two workloads.

Enqueues N jobs on a fresh stream (own key prefix), then times one engine consuming them
through the handler registry, payload validation, armed retries and batched acks. Prints
one JSON line shaped like the peer scripts in ``bench/peers``.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import secrets
import time
from typing import Any

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis

from imsys.redisconn import make_redis
from imsys.settings import Settings, StreamPolicy
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry

STREAM = "events"


class BenchPayload(BaseModel):
    i: int


async def run_bench(
    settings: Settings, *, jobs: int, sleep: float, concurrency: int
) -> dict[str, Any]:
    prefix = f"imsys-bench-{secrets.token_hex(4)}"
    policy = StreamPolicy(concurrency=concurrency, max_attempts=3)
    cfg = settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"prefix": prefix}),
            "streams": {**settings.streams, STREAM: policy},
        }
    )
    redis = make_redis(cfg)
    done = 0
    finished = asyncio.Event()

    async def handle(job: Job[BenchPayload]) -> None:
        nonlocal done
        if sleep:
            await asyncio.sleep(sleep)
        done += 1
        if done >= jobs:
            finished.set()

    registry = Registry()
    registry.register(STREAM, "bench", BenchPayload, handle)
    engine = Engine(redis, cfg, registry, streams=(STREAM,))
    try:
        await engine.prepare()
        # Start-up, as the service does it before it consumes anything: objects alive now
        # stay out of GC scans. (Collecting first takes ~25 ms; it is not job processing.)
        gc.collect()
        gc.freeze()
        t0 = time.perf_counter()
        chunk = 100_000  # keep memory flat for a million jobs
        for start in range(0, jobs, chunk):
            await engine.producer.enqueue_many(
                STREAM, "bench", (f'{{"i":{i}}}' for i in range(start, min(jobs, start + chunk)))
            )
        t1 = time.perf_counter()
        c0 = time.process_time()
        runner = asyncio.create_task(engine.run())
        await finished.wait()
        # Done means acknowledged and deleted, not just handled.
        consumer = engine.consumers[STREAM]
        while consumer._done or consumer._unflushed:  # noqa: ASYNC110 - a 1 ms poll at the end
            await asyncio.sleep(0.001)
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        engine.stop()
        await runner
        remaining = await redis.xlen(engine.keys.stream(STREAM))
    finally:
        await _drop_keys(redis, prefix)
        await redis.aclose()
    return {
        "system": "imsys",
        "n": jobs,
        "enqueue_per_s": round(jobs / (t1 - t0), 1),
        "process_per_s": round(jobs / (t2 - t1), 1),
        "sleep": sleep,
        "concurrency": concurrency,
        "process_cpu_share": round(cpu / (t2 - t1), 2),
        "stream_length_after": remaining,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


async def _drop_keys(redis: Redis, prefix: str) -> None:
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        await redis.delete(key)


def print_result(result: dict[str, Any]) -> None:
    print(orjson.dumps(result).decode(), flush=True)
