"""Router maintenance: an operator tells imsys to leave a router alone until an instant.

While ``routers.maintenance_until`` lies ahead, every job that would open a session to
the router (subscriber syncs, reconciliation, reboots, profile changes) is deferred: it
waits in the delayed store without spending an attempt and nothing is dead-lettered; the
reconciliation timer passes the router by. At ``until`` the jobs go through on their own.
The instant lives in PostgreSQL with the router, so every process sees the same one.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import structlog

from imsys.errors import Deferred
from imsys.network.errors import Invalid, NotFound
from imsys.sync.repo import queue_reconciliation

log = structlog.get_logger("imsys.sync")

# A deferred job looks again at least this often: maintenance ended early (``until``
# null) lets the waiting jobs through within this long.
RECHECK_S: Final = 30.0


class InMaintenance(Deferred):
    """The router is in maintenance: its job waits, no attempt spent."""


def check(router: Any) -> None:
    """Raise ``InMaintenance`` while the router row (``sync.repo.ROUTER``) says so.

    The row carries ``maintenance_until`` only while it lies ahead (the query compares it
    with the database's clock); the delay here uses ours, bounded by ``RECHECK_S``.
    """
    until: datetime | None = router.get("maintenance_until")
    if until is None:
        return
    remaining = (until - datetime.now(UTC)).total_seconds()
    delay = min(max(remaining, 0.0), RECHECK_S) + random.uniform(0, 1)
    raise InMaintenance(
        f"router {router['id']} is in maintenance until {until.isoformat()}", delay=delay
    )


async def set_maintenance(
    db: asyncpg.Pool, router_id: int, until: datetime | None
) -> dict[str, Any]:
    """Start (or move) the router's maintenance until ``until``; None ends it now.

    Ending it queues the router's reconciliation (through the outbox, in the same
    transaction): the timer passed it by meanwhile, and whatever was done to it during
    the maintenance is put right at once.
    """
    if until is not None and until <= datetime.now(UTC):
        raise Invalid("until must be in the future (or null to end the maintenance)")
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE routers r SET maintenance_until = $2
            FROM (SELECT maintenance_until > now() AS active FROM routers
                  WHERE id = $1 FOR UPDATE) AS old
            WHERE r.id = $1
            RETURNING r.id, r.maintenance_until, coalesce(old.active, false) AS was_active
            """,
            router_id,
            until,
        )
        if row is None:
            raise NotFound(f"router {router_id}")
        if until is None and row["was_active"]:
            await queue_reconciliation(conn, router_id)
    if until is None:
        log.info("router_maintenance_ended", router_id=router_id, was_active=row["was_active"])
    else:
        log.info("router_maintenance", router_id=router_id, until=until.isoformat())
    return {"router_id": row["id"], "maintenance_until": row["maintenance_until"]}
