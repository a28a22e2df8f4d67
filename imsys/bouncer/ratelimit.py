"""Bouncer's rate limit, shared by every process: a call is recorded before it is made.

Bouncer counts calls per API key, so the budget is one for both check types and every
imsys process. ``rate_limit_tracker`` holds one row per call; check and record happen under
a transaction-level advisory lock, so two processes cannot both take the last slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

import structlog

if TYPE_CHECKING:
    import asyncpg

    from imsys.db import Conn
    from imsys.settings import BouncerBatchingSettings

log = structlog.get_logger("imsys.bouncer")

# pg_advisory_xact_lock key serialising check-and-record across processes.
RATE_LOCK: Final = 0xB0C_0001
RequestType = Literal["create", "status", "download"]

# now() is the transaction's start: a transaction that waited for the lock would count
# from the past, so the window is measured against the clock.
WINDOW = """
SELECT count(*) AS calls, count(*) FILTER (WHERE request_type = 'create') AS creates
FROM rate_limit_tracker WHERE at > clock_timestamp() - interval '60 seconds'
"""


class RateLimiter:
    def __init__(self, db: asyncpg.Pool, cfg: BouncerBatchingSettings) -> None:
        self.db = db
        self.cfg = cfg

    def ceiling(self, request_type: RequestType) -> int:
        """Calls in the last minute at which this kind of call must wait.

        Creating batches only adds work, so it stops early; status checks and downloads
        finish work and may use the whole limit.
        """
        if request_type == "create":
            return self.cfg.rate_limit_stop
        return self.cfg.rate_limit_per_min

    async def acquire_in(self, conn: Conn, check_type: str, request_type: RequestType) -> bool:
        """Inside the caller's transaction: True (and the call recorded) if it may be made.

        The lock is held until the caller commits, so keep that transaction short.
        """
        await conn.execute("SELECT pg_advisory_xact_lock($1)", RATE_LOCK)
        row = await conn.fetchrow(WINDOW)
        assert row is not None
        if row["calls"] >= self.ceiling(request_type):
            log.info(
                "bouncer_rate_limit_reached",
                check_type=check_type,
                request_type=request_type,
                calls_last_min=row["calls"],
            )
            return False
        if request_type == "create" and row["creates"] >= self.cfg.create_limit_per_min:
            log.info("bouncer_create_limit_reached", check_type=check_type,
                     creates_last_min=row["creates"])
            return False
        await conn.execute(
            "INSERT INTO rate_limit_tracker (check_type, request_type, at)"
            " VALUES ($1, $2, clock_timestamp())",
            check_type,
            request_type,
        )
        return True

    async def acquire(self, check_type: str, request_type: RequestType) -> bool:
        """Check and record one call in a transaction of its own."""
        async with self.db.acquire() as conn, conn.transaction():
            return await self.acquire_in(conn, check_type, request_type)

    async def calls_last_minute(self) -> int:
        row = await self.db.fetchrow(WINDOW)
        assert row is not None
        return int(row["calls"])

    async def prune(self, keep_hours: float = 24.0) -> int:
        """Forget calls older than ``keep_hours`` (the limit only looks at the last minute)."""
        status = await self.db.execute(
            "DELETE FROM rate_limit_tracker WHERE at < now() - make_interval(secs => $1)",
            keep_hours * 3600,
        )
        return int(status.rsplit(" ", 1)[-1])
