"""The Bouncer domain's SQL: user batches in, Bouncer batches through their life.

Lock order, everywhere, so that no two of these transactions wait on each other in a
circle: the creator's advisory locks, then a ``bouncer_batches`` row, then
``user_batch_emails`` rows, then ``user_batches`` rows in id order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from imsys.bouncer.emails import Prepared

if TYPE_CHECKING:
    from imsys.bouncer.ratelimit import RateLimiter
    from imsys.db import Conn, Executor

CHECK_TYPES: Final = ("deliverable", "catchall")
# pg_advisory_xact_lock keys: one creator per check type counts capacity at a time.
CAPACITY_LOCKS: Final = {"deliverable": 0xB0C_0010, "catchall": 0xB0C_0011}
# Rows per COPY of a submission: encoding them holds the event loop, so a 1M submission
# lets the rest of the process run between slices.
SUBMIT_CHUNK: Final = 100_000

USER_BATCH_COLUMNS = (
    "id, tenant_id, check_type, status, total, processed, failed, created_at, completed_at"
)

# Plain INSERT of the addresses not stored yet (the fast path). A concurrent submission of
# the same new address makes it fail; the ON CONFLICT form then does the same, slower.
NEW_GLOBALS = """
INSERT INTO emails_global (email)
SELECT s.canonical FROM bouncer_submit s
WHERE NOT EXISTS (SELECT 1 FROM emails_global g WHERE g.email = s.canonical)
ORDER BY s.canonical
"""

SUBMIT_ROWS = """
INSERT INTO user_batch_emails (user_batch_id, email_global_id, email)
SELECT $1, g.id, s.email
FROM bouncer_submit s JOIN emails_global g ON g.email = s.canonical
ORDER BY s.ord
"""

# Oldest user batch first, then submission order, leaving out e-mails released by the
# creates that failed in this cycle ($4: their batch ids). SKIP LOCKED: rows another creator is
# taking right now are left to it, never waited for and never taken twice. The update
# finds the picked rows by id lookups (= ANY of an array): joined to the CTE instead,
# the planner merged with a scan of the primary key from its start, which grows as the
# queue advances through the table.
PICK = """
WITH picked AS (
    SELECT e.id
    FROM user_batch_emails e JOIN user_batches u ON u.id = e.user_batch_id
    WHERE e.status = 'pending' AND u.check_type = $1 AND u.status IN ('queued', 'processing')
      AND NOT (coalesce(e.released_from, 0) = ANY($4::bigint[]))
    ORDER BY u.created_at, u.id, e.id
    LIMIT $2
    FOR UPDATE OF e SKIP LOCKED
)
UPDATE user_batch_emails e SET status = 'assigned', bouncer_batch_id = $3
WHERE e.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING e.user_batch_id, e.email
"""

# Locks the user batches in id order before they are changed (see the module docstring).
LOCK_USER_BATCHES = (
    "SELECT id FROM user_batches WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"
)

ADD_COUNTS = """
UPDATE user_batches u SET
    processed = u.processed + c.done,
    failed = u.failed + c.failed,
    status = CASE
        WHEN u.status IN ('queued', 'processing')
             AND u.processed + c.done + u.failed + c.failed >= u.total THEN 'completed'
        ELSE u.status END,
    completed_at = CASE
        WHEN u.status IN ('queued', 'processing')
             AND u.processed + c.done + u.failed + c.failed >= u.total THEN now()
        ELSE u.completed_at END
FROM unnest($1::bigint[], $2::int[], $3::int[]) AS c(id, done, failed)
WHERE u.id = c.id
"""


# After a failed create: its user batches that have nothing in Bouncer's hands and nothing
# settled go back to 'queued'. Settled e-mails show in the counts; e-mails in other
# batches are found through the open batches (a few), never by scanning a user batch's
# e-mails (there is no index for that: it would cost a scan of the whole table).
REQUEUE_USER_BATCHES = """
UPDATE user_batches u SET status = 'queued'
WHERE u.id = ANY($1::bigint[]) AND u.status = 'processing'
  AND u.processed = 0 AND u.failed = 0
  AND u.id NOT IN (
    SELECT e.user_batch_id
    FROM bouncer_batches b JOIN user_batch_emails e ON e.bouncer_batch_id = b.id
    WHERE b.status IN ('creating', 'processing', 'completed')
      AND e.user_batch_id = ANY($1::bigint[])
  )
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A Bouncer batch whose intent is committed: our id and the e-mails assigned to it."""

    id: int
    emails: list[str]
    user_batch_ids: list[int]


@dataclass(frozen=True, slots=True)
class Outstanding:
    id: int
    bouncer_batch_id: str
    status: str
    age_s: float
    download_attempts: int


# --- user batches -----------------------------------------------------------------------------


async def insert_user_batch(
    db: asyncpg.Pool, check_type: str, data: Prepared, tenant_id: int | None = None
) -> dict[str, Any]:
    """Store a user batch and its e-mails set-based (COPY, then two INSERT ... SELECT)."""
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"INSERT INTO user_batches (check_type, total, tenant_id) VALUES ($1, $2, $3)"
            f" RETURNING {USER_BATCH_COLUMNS}",
            check_type,
            len(data.emails),
            tenant_id,
        )
        assert row is not None
        if len(data.emails) > SUBMIT_CHUNK:
            # The joins and the sort of a big submission fit in memory instead of spilling
            # to disk (measured: 1M rows need about 120 MB).
            await conn.execute("SET LOCAL work_mem = '128MB'")
        await conn.execute(
            "CREATE TEMP TABLE bouncer_submit (ord integer, email text, canonical text)"
            " ON COMMIT DROP"
        )
        count = len(data.emails)
        for start in range(0, count, SUBMIT_CHUNK):
            end = min(start + SUBMIT_CHUNK, count)
            await conn.copy_records_to_table(
                "bouncer_submit",
                records=zip(
                    range(start, end),
                    data.emails[start:end],
                    data.canonicals[start:end],
                    strict=True,
                ),
            )
        await conn.execute("ANALYZE bouncer_submit")
        try:
            async with conn.transaction():
                await conn.execute(NEW_GLOBALS)
        except asyncpg.UniqueViolationError:
            await conn.execute(NEW_GLOBALS + " ON CONFLICT (email) DO NOTHING")
        await conn.execute(SUBMIT_ROWS, row["id"])
        return dict(row)


async def get_user_batch(db: Executor, user_batch_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(
        f"SELECT {USER_BATCH_COLUMNS} FROM user_batches WHERE id = $1", user_batch_id
    )
    return None if row is None else dict(row)


async def list_user_batches(
    db: Executor, limit: int, tenant_id: int | None = None
) -> list[dict[str, Any]]:
    """Newest first; one tenant's when given."""
    if tenant_id is None:
        rows = await db.fetch(
            f"SELECT {USER_BATCH_COLUMNS} FROM user_batches ORDER BY created_at DESC, id DESC"
            " LIMIT $1",
            limit,
        )
    else:
        rows = await db.fetch(
            f"SELECT {USER_BATCH_COLUMNS} FROM user_batches WHERE tenant_id = $2"
            " ORDER BY created_at DESC, id DESC LIMIT $1",
            limit,
            tenant_id,
        )
    return [dict(r) for r in rows]


async def add_counts(conn: Conn, done: Counter[int], failed: Counter[int]) -> None:
    """Add settled e-mails to their user batches; complete those with none left open."""
    ids = sorted(set(done) | set(failed))
    if not ids:
        return
    await conn.execute(LOCK_USER_BATCHES, ids)
    await conn.execute(ADD_COUNTS, ids, [done[i] for i in ids], [failed[i] for i in ids])


# --- creating Bouncer batches -----------------------------------------------------------------


async def claim_batch(
    conn: Conn,
    limiter: RateLimiter,
    check_type: str,
    *,
    capacity: int,
    size: int,
    skip_released_from: Sequence[int] = (),
) -> Claimed | str:
    """Record the intent of one Bouncer batch and commit it, or say why not.

    Returns the claim, or ``"capacity"``, ``"rate_limit"`` or ``"empty"``. The capacity
    count and the pick run under a per-check-type lock, so two processes never exceed
    the capacity together; the rate-limit slot is recorded in the same transaction.
    E-mails released by the batches ``skip_released_from`` (creates that failed in this
    cycle) are not picked: they wait for the next cycle.
    """
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CAPACITY_LOCKS[check_type])
        outstanding = await conn.fetchval(
            "SELECT count(*) FROM bouncer_batches"
            " WHERE check_type = $1 AND status IN ('creating', 'processing')",
            check_type,
        )
        if outstanding >= capacity:
            await tr.rollback()
            return "capacity"
        if not await limiter.acquire_in(conn, check_type, "create"):
            await tr.rollback()
            return "rate_limit"
        batch_id = await conn.fetchval(
            "INSERT INTO bouncer_batches (check_type, quantity) VALUES ($1, 0) RETURNING id",
            check_type,
        )
        rows = await conn.fetch(PICK, check_type, size, batch_id, list(skip_released_from))
        if not rows:
            # Nothing to send: the batch row and the recorded call go too.
            await tr.rollback()
            return "empty"
        await conn.execute("UPDATE bouncer_batches SET quantity = $2 WHERE id = $1",
                           batch_id, len(rows))
        user_batch_ids = sorted({r["user_batch_id"] for r in rows})
        await conn.execute(LOCK_USER_BATCHES, user_batch_ids)
        await conn.execute(
            "UPDATE user_batches SET status = 'processing'"
            " WHERE id = ANY($1::bigint[]) AND status = 'queued'",
            user_batch_ids,
        )
    except BaseException:
        await tr.rollback()
        raise
    await tr.commit()
    return Claimed(batch_id, [r["email"] for r in rows], user_batch_ids)


async def settle_created(db: Executor, batch_id: int, bouncer_batch_id: str) -> bool:
    """Bouncer answered: store its id. False when the intent was given up meanwhile."""
    row = await db.fetchval(
        "UPDATE bouncer_batches SET bouncer_batch_id = $2, status = 'processing',"
        " updated_at = now() WHERE id = $1 AND status = 'creating' RETURNING id",
        batch_id,
        bouncer_batch_id,
    )
    return row is not None


async def release(db: asyncpg.Pool, batch_id: int, error: str) -> int | None:
    """Give up a create: the batch is abandoned, its e-mails pending again.

    A user batch the claim had moved to 'processing' goes back to 'queued' when none of
    its e-mails is left in a Bouncer batch or settled (the seed: a failed creation leaves
    user batches 'queued'); one with e-mails in another batch stays 'processing'. Returns
    how many e-mails went back, or None when the batch was no longer 'creating'
    (settled, or released by someone else).
    """
    async with db.acquire() as conn, conn.transaction():
        found = await conn.fetchval(
            "UPDATE bouncer_batches SET status = 'abandoned', error = $2, updated_at = now()"
            " WHERE id = $1 AND status = 'creating' RETURNING id",
            batch_id,
            error[:1000],
        )
        if found is None:
            return None
        rows = await conn.fetch(
            "UPDATE user_batch_emails SET status = 'pending', bouncer_batch_id = NULL,"
            " released_from = $1 WHERE bouncer_batch_id = $1 AND status = 'assigned'"
            " RETURNING user_batch_id",
            batch_id,
        )
        user_batch_ids = sorted({r["user_batch_id"] for r in rows})
        if user_batch_ids:
            await conn.execute(LOCK_USER_BATCHES, user_batch_ids)
            await conn.execute(REQUEUE_USER_BATCHES, user_batch_ids)
        return len(rows)


async def stale_creating(db: Executor, check_type: str, older_than_s: float) -> list[int]:
    rows = await db.fetch(
        "SELECT id FROM bouncer_batches WHERE check_type = $1 AND status = 'creating'"
        " AND created_at < now() - make_interval(secs => $2) ORDER BY id",
        check_type,
        older_than_s,
    )
    return [r["id"] for r in rows]


# --- watching Bouncer batches -------------------------------------------------------------------


async def outstanding(db: Executor, check_type: str) -> list[Outstanding]:
    """Batches Bouncer has (processing) or whose results wait (completed), least recently
    checked first, so a cycle cut short by the rate limit does not starve the same ones."""
    rows = await db.fetch(
        "SELECT id, bouncer_batch_id, status, download_attempts,"
        " extract(epoch FROM now() - created_at)::float8 AS age_s"
        " FROM bouncer_batches WHERE check_type = $1 AND status IN ('processing', 'completed')"
        " ORDER BY checked_at NULLS FIRST, id",
        check_type,
    )
    return [
        Outstanding(r["id"], r["bouncer_batch_id"], r["status"], r["age_s"],
                    r["download_attempts"])
        for r in rows
    ]


async def record_status(db: Executor, batch_id: int, status: str) -> None:
    await db.execute(
        "UPDATE bouncer_batches SET last_status = $2, checked_at = now() WHERE id = $1",
        batch_id,
        status[:100],
    )


async def mark_completed(db: Executor, batch_id: int) -> bool:
    row = await db.fetchval(
        "UPDATE bouncer_batches SET status = 'completed', updated_at = now()"
        " WHERE id = $1 AND status = 'processing' RETURNING id",
        batch_id,
    )
    return row is not None


async def fail_batch(db: asyncpg.Pool, batch_id: int, reason: str) -> list[int] | None:
    """Mark a Bouncer batch failed, with every user batch that has e-mails in it.

    Those user batches' e-mails still pending fail too (nothing more is spent on them);
    e-mails of theirs already in other Bouncer batches still get results. Returns the
    user batches failed, or None when the batch was no longer open.
    """
    async with db.acquire() as conn, conn.transaction():
        found = await conn.fetchval(
            "UPDATE bouncer_batches SET status = 'failed', error = $2, updated_at = now()"
            " WHERE id = $1 AND status IN ('processing', 'completed') RETURNING id",
            batch_id,
            reason[:1000],
        )
        if found is None:
            return None
        failed = Counter(
            r["user_batch_id"]
            for r in await conn.fetch(
                "UPDATE user_batch_emails SET status = 'failed'"
                " WHERE bouncer_batch_id = $1 AND status = 'assigned' RETURNING user_batch_id",
                batch_id,
            )
        )
        user_batch_ids = sorted(
            r["user_batch_id"]
            for r in await conn.fetch(
                "SELECT DISTINCT user_batch_id FROM user_batch_emails WHERE bouncer_batch_id = $1",
                batch_id,
            )
        )
        failed.update(
            r["user_batch_id"]
            for r in await conn.fetch(
                "UPDATE user_batch_emails SET status = 'failed'"
                " WHERE user_batch_id = ANY($1::bigint[]) AND status = 'pending'"
                " RETURNING user_batch_id",
                user_batch_ids,
            )
        )
        await conn.execute(LOCK_USER_BATCHES, user_batch_ids)
        await conn.execute(
            "UPDATE user_batches u SET failed = u.failed + c.n, status = 'failed',"
            " completed_at = coalesce(u.completed_at, now())"
            " FROM unnest($1::bigint[], $2::int[]) AS c(id, n) WHERE u.id = c.id",
            user_batch_ids,
            [failed[i] for i in user_batch_ids],
        )
        return user_batch_ids


async def count_download(db: Executor, batch_id: int) -> int:
    """One more download attempt of this batch; returns the count."""
    return int(
        await db.fetchval(
            "UPDATE bouncer_batches SET download_attempts = download_attempts + 1"
            " WHERE id = $1 RETURNING download_attempts",
            batch_id,
        )
    )

