"""``download_results``: store a completed Bouncer batch's results, set-based.

Records stream in and are stored a chunk at a time: each chunk is one transaction of one
statement (results upserted per mailbox, the batch's e-mails marked done) plus the user
batches' counts. Running it again stores the same results and changes no count, since an
e-mail is counted only when it leaves 'assigned'. E-mails of the batch that got no result
at all are marked failed at the end, so a user batch always comes to an end.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog
from pydantic import BaseModel, Field

from imsys.bouncer import repo
from imsys.bouncer.context import BouncerContext, batch_name
from imsys.bouncer.emails import canonical, normalise
from imsys.errors import Deferred, RetryableError
from imsys.streams.job import Job, JobSpec

if TYPE_CHECKING:
    from imsys.db import Conn

log = structlog.get_logger("imsys.bouncer")

CHUNK: Final = 10_000
# The job's ``ensure_current``: raises FencedOut for a delivery that lost its claim.
Fence = Callable[[], Awaitable[None]]
OPEN: Final = ("processing", "completed")


class DownloadResults(BaseModel):
    bouncer_batch_id: str = Field(min_length=1, max_length=200)


# One attempt (the bouncer stream's policy): the status checker queues it again.
DOWNLOAD_RESULTS = JobSpec("bouncer", "download_results", DownloadResults)


def download_job_id(bouncer_batch_id: str) -> str:
    """Bouncer's batch id: one download per batch waits or runs at a time."""
    return bouncer_batch_id


# Each address to its mailbox by an index probe per record. LIMIT 1 keeps the planner from
# turning the lookup into a hash join over the whole of emails_global (it did, spilling to
# disk, at 1,000,000 rows). Records arrive sorted by mailbox (see `to_columns`), so every
# download upserts, and locks, results rows in one order: two at once cannot deadlock.
_RESOLVED = """
    SELECT g.id AS gid, t.*
    FROM unnest($2::text[], $3::text[], $4::text[], $5::int[], $6::bool[], $7::text[],
                $8::text[]) AS t(canonical, status, reason, score, accept_all, domain, result)
    CROSS JOIN LATERAL (
        SELECT id FROM emails_global WHERE email = t.canonical LIMIT 1
    ) g
"""
_MARK_DONE = """
UPDATE user_batch_emails e SET status = 'done'
FROM r WHERE e.bouncer_batch_id = $1 AND e.email_global_id = r.gid AND e.status = 'assigned'
RETURNING e.user_batch_id
"""
# One statement per chunk: map each address to its mailbox, upsert the results, mark the
# batch's e-mails done.
STORE = {
    "deliverable": f"""
WITH r AS MATERIALIZED ({_RESOLVED}), stored AS (
    INSERT INTO email_deliverable_results (email_global_id, status, reason, score, result,
                                           checked_at)
    SELECT gid, status, reason, score, result::jsonb, now() FROM r
    ON CONFLICT (email_global_id) DO UPDATE SET status = EXCLUDED.status,
        reason = EXCLUDED.reason, score = EXCLUDED.score, result = EXCLUDED.result,
        checked_at = EXCLUDED.checked_at
)
{_MARK_DONE}""",
    "catchall": f"""
WITH r AS MATERIALIZED ({_RESOLVED}), stored AS (
    INSERT INTO email_catchall_results (email_global_id, is_catchall, domain, result,
                                        checked_at)
    SELECT gid, accept_all, domain, result::jsonb, now() FROM r
    ON CONFLICT (email_global_id) DO UPDATE SET is_catchall = EXCLUDED.is_catchall,
        domain = EXCLUDED.domain, result = EXCLUDED.result, checked_at = EXCLUDED.checked_at
)
{_MARK_DONE}""",
}


@dataclass(slots=True)
class Columns:
    """One chunk of result records as parallel arrays, ready for ``unnest``."""

    canonical: list[str] = field(default_factory=list)
    status: list[str | None] = field(default_factory=list)
    reason: list[str | None] = field(default_factory=list)
    score: list[int | None] = field(default_factory=list)
    accept_all: list[bool] = field(default_factory=list)
    domain: list[str | None] = field(default_factory=list)
    result: list[str] = field(default_factory=list)
    unusable: int = 0
    foreign: int = 0

    def args(self) -> tuple[list[Any], ...]:
        return (self.canonical, self.status, self.reason, self.score, self.accept_all,
                self.domain, self.result)


def _text(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None


def to_columns(records: list[dict[str, Any]], name: str) -> Columns:
    """Records → columns, one per mailbox, sorted by mailbox (the first record of a mailbox
    wins). A record for another batch (its ``name``) or without an address is counted and
    left out."""
    cols = Columns()
    by_mailbox: dict[str, dict[str, Any]] = {}
    for record in records:
        email = record.get("email")
        if not isinstance(email, str) or not email.strip():
            cols.unusable += 1
            continue
        given = record.get("name")
        if given is not None and given != name:
            cols.foreign += 1
            continue
        by_mailbox.setdefault(canonical(normalise(email)), record)
    for mailbox in sorted(by_mailbox):
        record = by_mailbox[mailbox]
        domain = record.get("domain")
        domain = domain if isinstance(domain, dict) else {}
        score = record.get("score")
        cols.canonical.append(mailbox)
        cols.status.append(_text(record.get("status")) or "unknown")
        cols.reason.append(_text(record.get("reason")))
        cols.score.append(score if isinstance(score, int) and not isinstance(score, bool)
                          and -(2**31) <= score < 2**31 else None)
        cols.accept_all.append(domain.get("acceptAll") == "yes")
        cols.domain.append(_text(domain.get("name")))
        cols.result.append(orjson.dumps(record).decode())
    return cols


async def _lock_open(conn: Conn, batch_id: int, *, exclusive: bool) -> bool:
    """Lock our batch row (first, as everywhere); True while its results are wanted.

    Also plans this transaction's statements for their actual values: after five runs of
    a prepared statement PostgreSQL may switch to a generic plan, and for "the e-mails of
    batch $1" (10,000 rows, or none, while statistics lag) the generic plan it picked
    turned a 0.5 s chunk into 50 s in the benchmark.
    """
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
    # A chunk's results (several MB of JSON) fit in memory rather than spill to disk.
    await conn.execute("SET LOCAL work_mem = '64MB'")
    mode = "UPDATE" if exclusive else "SHARE"
    status = await conn.fetchval(
        f"SELECT status FROM bouncer_batches WHERE id = $1 FOR {mode}", batch_id
    )
    return status in OPEN


async def store_chunk(ctx: BouncerContext, batch_id: int, check_type: str,
                      cols: Columns, fence: Fence | None = None) -> int | None:
    """Store one chunk; returns e-mails newly done, or None if the batch was closed.

    ``fence`` (the job's ``ensure_current``) runs with the batch row locked: a delivery
    that lost its claim raises FencedOut and stores nothing.
    """
    async with ctx.db.acquire() as conn, conn.transaction():
        if not await _lock_open(conn, batch_id, exclusive=False):
            return None
        if fence is not None:
            await fence()
        rows = await conn.fetch(STORE[check_type], batch_id, *cols.args())
        done = Counter(r["user_batch_id"] for r in rows)
        await repo.add_counts(conn, done, Counter())
        return len(rows)


async def finish(ctx: BouncerContext, batch_id: int, records: int,
                 fence: Fence | None = None) -> int | None:
    """E-mails still without a result fail; the batch is downloaded. Returns how many
    failed, or None if the batch was closed meanwhile."""
    async with ctx.db.acquire() as conn, conn.transaction():
        if not await _lock_open(conn, batch_id, exclusive=True):
            return None
        if fence is not None:
            await fence()
        rows = await conn.fetch(
            "UPDATE user_batch_emails SET status = 'failed'"
            " WHERE bouncer_batch_id = $1 AND status = 'assigned' RETURNING user_batch_id",
            batch_id,
        )
        await repo.add_counts(conn, Counter(), Counter(r["user_batch_id"] for r in rows))
        await conn.execute(
            "UPDATE bouncer_batches SET status = 'downloaded', updated_at = now(), error = $2"
            " WHERE id = $1",
            batch_id,
            f"{len(rows)} e-mails had no result among {records} records" if rows else None,
        )
        return len(rows)


async def download_results(ctx: BouncerContext, job: Job[DownloadResults]) -> None:
    """Download a completed batch's results and store them (the job's one attempt)."""
    bouncer_id = job.payload.bouncer_batch_id
    batch = await ctx.db.fetchrow(
        "SELECT id, check_type, status, quantity FROM bouncer_batches"
        " WHERE bouncer_batch_id = $1",
        bouncer_id,
    )
    if batch is None or batch["status"] not in OPEN:
        # Unknown (a create we gave up on), failed, or already stored: nothing to do.
        log.info("bouncer_download_ignored", bouncer_batch_id=bouncer_id,
                 status=None if batch is None else batch["status"])
        return
    batch_id, check_type, total = batch["id"], batch["check_type"], batch["quantity"]
    if not await ctx.limiter.acquire(check_type, "download"):
        raise Deferred("Bouncer rate limit reached", delay=10.0)
    # A stale delivery neither spends one of the batch's download attempts nor stores.
    await job.ensure_current()
    await repo.count_download(ctx.db, batch_id)
    started = time.perf_counter()
    name = batch_name(batch_id)
    tally = Tally()
    async with aclosing(ctx.client.iter_download(bouncer_id)) as stream:
        chunk: list[dict[str, Any]] = []
        async for record in stream:
            chunk.append(record)
            if len(chunk) >= CHUNK:
                if not await _store(ctx, job, batch_id, check_type, chunk, name, tally):
                    return
                chunk = []
                await job.progress(tally.records, total)
        if chunk:
            if not await _store(ctx, job, batch_id, check_type, chunk, name, tally):
                return
            await job.progress(tally.records, total)
    if tally.records == 0 and total > 0:
        # An empty download for a batch we filled is Bouncer's hiccup, not an answer: the
        # status checker queues it again, up to max_download_attempts.
        raise RetryableError(f"download of batch {bouncer_id} returned no results")
    missing = await finish(ctx, batch_id, tally.records, job.ensure_current)
    log.info(
        "bouncer_results_stored",
        batch=batch_id,
        bouncer_batch_id=bouncer_id,
        check_type=check_type,
        records=tally.records,
        done=tally.done,
        without_result=missing,
        unusable=tally.unusable,
        foreign=tally.foreign,
        ms=round((time.perf_counter() - started) * 1000, 1),
    )


@dataclass(slots=True)
class Tally:
    records: int = 0
    done: int = 0
    unusable: int = 0
    foreign: int = 0


async def _store(ctx: BouncerContext, job: Job[DownloadResults], batch_id: int,
                 check_type: str, chunk: list[dict[str, Any]], name: str,
                 tally: Tally) -> bool:
    cols = to_columns(chunk, name)
    stored = await store_chunk(ctx, batch_id, check_type, cols, job.ensure_current)
    if stored is None:
        log.info("bouncer_download_ignored", batch=batch_id, reason="closed meanwhile")
        return False
    tally.records += len(chunk)
    tally.done += stored
    tally.unusable += cols.unusable
    tally.foreign += cols.foreign
    return True
