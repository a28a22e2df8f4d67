"""Bouncer batching benchmark: assembling a 10,000-e-mail batch, storing a 10,000-result
download, with 1,000,000 e-mails pending across 10,000 user batches.

Usage: .venv/bin/python scripts/bench_bouncer.py [--runs N] [--database-url URL] [--keep]

Works on a database of its own (default ``imsys_bench_bouncer`` on the local server),
dropped and made again at the start. Measures:

- ``submit_1m_s``: one user batch of 1,000,000 addresses through the API's service
  function (validation, normalising, COPY, set-based inserts), once;
- ``assemble_s``: one greedy-creator intent of 10,000 e-mails (capacity and rate-limit
  checks, FIFO pick with SKIP LOCKED, assignment, commit), per run, against the
  1,000,000 pending e-mails of 10,000 user batches;
- ``download_s``: the ``download_results`` handler on a completed 10,000-e-mail batch at
  the in-process Bouncer simulator (HTTP download, parse, set-based store, user batch
  counts), per run; ``of_which_http_s`` is the download and parse alone, measured by
  fetching the same results once more.

Prints one JSON line with every run and the medians. Targets: assemble ≤ 0.3 s,
download ≤ 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp
import asyncpg
from pydantic import SecretStr
from redis.asyncio import Redis

from imsys.bouncer import repo, service
from imsys.bouncer.context import BouncerContext, batch_name
from imsys.bouncer.ratelimit import RateLimiter
from imsys.bouncer.results import DownloadResults, download_results
from imsys.db import migrate
from imsys.provider_settings import BouncerConfig
from imsys.providers.bouncer import BouncerClient
from imsys.settings import BouncerBatchingSettings, Settings
from imsys.sim.bouncer import BouncerSimulator
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/imsys_bench_bouncer"
KEY = "bench-key"
USER_BATCHES = 10_000
PER_USER_BATCH = 100
BATCH = 10_000

POPULATE = [
    "TRUNCATE user_batches, user_batch_emails, emails_global, bouncer_batches,"
    " email_deliverable_results, email_catchall_results, rate_limit_tracker RESTART IDENTITY",
    f"INSERT INTO user_batches (check_type, total, created_at)"
    f" SELECT 'deliverable', {PER_USER_BATCH}, now() - interval '1 day' + g * interval '1 ms'"
    f" FROM generate_series(1, {USER_BATCHES}) g",
    f"INSERT INTO emails_global (email) SELECT 'user' || g || '@host' || (g % 997) || '.example'"
    f" FROM generate_series(1, {USER_BATCHES * PER_USER_BATCH}) g",
    f"INSERT INTO user_batch_emails (user_batch_id, email_global_id, email)"
    f" SELECT (g - 1) / {PER_USER_BATCH} + 1, g, 'user' || g || '@host' || (g % 997) || '.example'"
    f" FROM generate_series(1, {USER_BATCHES * PER_USER_BATCH}) g",
]


async def fresh_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    await migrate(url)


async def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def submit_million(db: asyncpg.Pool, cfg: BouncerBatchingSettings) -> float:
    emails = [f"Person.{i}+tag@Domain{i % 997}.example" for i in range(1_000_000)]
    data = service.UserBatchIn(check_type="deliverable", emails=emails)
    started = time.perf_counter()
    row = await service.submit(db, cfg, data)
    elapsed = time.perf_counter() - started
    assert row["total"] == 1_000_000
    return elapsed


async def populate(db: asyncpg.Pool) -> float:
    started = time.perf_counter()
    async with db.acquire() as conn:
        for statement in POPULATE:
            await conn.execute(statement)
        # As autovacuum would soon after a real load: statistics and visibility map.
        await conn.execute("VACUUM ANALYZE user_batches, user_batch_emails, emails_global")
    return time.perf_counter() - started


async def one_run(
    ctx: BouncerContext, sim: BouncerSimulator
) -> tuple[float, float, float]:
    async with ctx.db.acquire() as conn:
        started = time.perf_counter()
        claim = await repo.claim_batch(conn, ctx.limiter, "deliverable", capacity=10_000,
                                       size=BATCH)
        assemble = time.perf_counter() - started
    assert isinstance(claim, repo.Claimed)
    assert len(claim.emails) == BATCH
    created = await ctx.client.create_batch([(e, batch_name(claim.id)) for e in claim.emails])
    assert await repo.settle_created(ctx.db, claim.id, created.batch_id)
    sim.complete_batch(created.batch_id)
    await repo.mark_completed(ctx.db, claim.id)
    job: Job[DownloadResults] = Job(
        stream="bouncer", id="0-1", type="download_results",
        payload=DownloadResults(bouncer_batch_id=created.batch_id), attempt=1,
        job_id=created.batch_id, enqueued_at=None, fields={},
    )
    started = time.perf_counter()
    await download_results(ctx, job)
    download = time.perf_counter() - started
    # The HTTP part alone (Bouncer's answer, here the simulator's, plus parsing), for scale.
    started = time.perf_counter()
    assert len(await ctx.client.download(created.batch_id)) == BATCH
    fetch = time.perf_counter() - started
    done = await ctx.db.fetchval(
        "SELECT count(*) FROM user_batch_emails WHERE bouncer_batch_id = $1 AND status = 'done'",
        claim.id)
    assert done == BATCH, done
    return assemble, download, fetch


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 4),
            "runs": [round(v, 4) for v in values]}


async def main(runs: int, url: str, keep: bool) -> dict[str, Any]:
    await fresh_database(url)
    sim = BouncerSimulator(KEY, queue_seconds=3600.0, create_limit=10_000,
                           request_limit=10_000)
    await sim.start()
    db = await asyncpg.create_pool(url, min_size=1, max_size=4)
    redis = Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    try:
        cfg = BouncerBatchingSettings(rate_limit_per_min=1_000_000, rate_limit_stop=1_000_000,
                                      create_limit_per_min=1_000_000)
        settings = Settings(bouncer_batching=cfg)
        async with aiohttp.ClientSession() as http:
            ctx = BouncerContext(
                db=db,
                producer=Engine(redis, settings, Registry()).producer,
                client=BouncerClient(http, BouncerConfig(base_url=sim.url,
                                                         api_key=SecretStr(KEY))),
                cfg=cfg,
                limiter=RateLimiter(db, cfg),
            )
            submit = await submit_million(db, cfg)
            fill = await populate(db)
            pending = await db.fetchval(
                "SELECT count(*) FROM user_batch_emails WHERE status = 'pending'")
            timings = [await one_run(ctx, sim) for _ in range(runs)]
        return {
            "system": "imsys",
            "bench": "bouncer",
            "pending": pending,
            "user_batches": USER_BATCHES,
            "batch_size": BATCH,
            "submit_1m_s": round(submit, 3),
            "populate_s": round(fill, 3),
            "assemble_s": summary([t[0] for t in timings]),
            "download_s": summary([t[1] for t in timings]),
            "of_which_http_s": summary([t[2] for t in timings]),
        }
    finally:
        await redis.aclose()
        await db.close()
        await sim.stop()
        if not keep:
            await drop_database(url)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.runs, args.database_url, args.keep))))
