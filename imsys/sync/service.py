"""Sync's public queueing functions: how anything outside sync asks for a subscriber's sync.

Each writes an outbox row on the caller's connection, inside the caller's transaction, so
the change and its sync commit together (DESIGN principle 4). `subscriber_changed` is the
``on_change`` hook the network model's subscriber changes take (`imsys.network.service`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from imsys import outbox
from imsys.network.errors import NotFound

if TYPE_CHECKING:
    from imsys.db import Conn


def sync_job_id(subscriber_id: int) -> str:
    return f"sync_subscriber:{subscriber_id}"


async def queue_sync(conn: Conn, subscriber_id: int, correlation_id: str, cause: str) -> None:
    await outbox.add(
        conn,
        "sync",
        "sync_subscriber",
        {"subscriber_id": subscriber_id, "correlation_id": correlation_id, "cause": cause},
        job_id=sync_job_id(subscriber_id),
    )


async def subscriber_changed(conn: Conn, subscriber_id: int, correlation_id: str) -> None:
    """The network model changed this subscriber's desired state: queue its sync."""
    await queue_sync(conn, subscriber_id, correlation_id, "api")


async def request_sync(db: asyncpg.Pool, subscriber_id: int, correlation_id: str) -> None:
    async with db.acquire() as conn, conn.transaction():
        found = await conn.fetchval(
            """
            UPDATE subscribers SET pending_correlations = pending_correlations || ARRAY[$2]
            WHERE id = $1 RETURNING id
            """,
            subscriber_id,
            correlation_id,
        )
        if found is None:
            raise NotFound(f"subscriber {subscriber_id}")
        await queue_sync(conn, subscriber_id, correlation_id, "api")
