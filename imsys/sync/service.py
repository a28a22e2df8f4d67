"""Sync's public functions: how anything outside sync asks sync for something.

A subscriber's sync is an outbox row written on the caller's connection, inside the
caller's transaction, so the change and its sync commit together (DESIGN principle 4).
`subscriber_changed` is the ``on_change`` hook the network model's subscriber changes
take (`imsys.network.service`). The router jobs (reconcile, expire, reboot) go straight
to the stream, once per router or tenant while one waits or runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from imsys import outbox
from imsys.network.errors import NotFound
from imsys.streams.producer import Enqueued, Producer
from imsys.sync.jobs import (
    EXPIRE_TENANT,
    REBOOT_ROUTER,
    SYNC_PROFILES,
    SYNC_ROUTER,
    SYNC_SUBSCRIBER,
    expire_job_id,
    reboot_job_id,
    reconcile_job_id,
    sync_job_id,
)

if TYPE_CHECKING:
    from imsys.db import Conn

__all__ = [
    "package_changed",
    "queue_expiry",
    "queue_reboot",
    "queue_reconciliation",
    "queue_sync",
    "request_sync",
    "subscriber_changed",
    "subscribers_changed",
    "subscribers_created",
    "sync_job_id",
]


async def queue_sync(conn: Conn, subscriber_id: int, correlation_id: str, cause: str) -> None:
    await outbox.add(
        conn,
        SYNC_SUBSCRIBER,
        {"subscriber_id": subscriber_id, "correlation_id": correlation_id, "cause": cause},
        job_id=sync_job_id(subscriber_id),
    )


async def subscriber_changed(conn: Conn, subscriber_id: int, correlation_id: str) -> None:
    """The network model changed this subscriber's desired state: queue its sync."""
    await queue_sync(conn, subscriber_id, correlation_id, "api")


async def subscribers_changed(conn: Conn, changes: list[tuple[int, str]]) -> None:
    """Many subscribers changed, each by its own request (the API's creates, written in
    one batch): queue each one's sync with its correlation id, in one statement."""
    await outbox.add_many(
        conn,
        SYNC_SUBSCRIBER,
        [
            ({"subscriber_id": i, "correlation_id": c, "cause": "api"}, sync_job_id(i))
            for i, c in changes
        ],
    )


async def subscribers_created(conn: Conn, subscriber_ids: list[int], correlation_id: str) -> None:
    """Many subscribers were created at once (a bulk import): queue each one's sync, the
    same job `subscriber_changed` queues, in one statement."""
    await outbox.add_many(
        conn,
        SYNC_SUBSCRIBER,
        [
            (
                {"subscriber_id": i, "correlation_id": correlation_id, "cause": "api"},
                sync_job_id(i),
            )
            for i in subscriber_ids
        ],
    )


async def package_changed(conn: Conn, tenant_id: int, correlation_id: str) -> None:
    """A package of the tenant was created, changed or deleted: align the package profiles
    on each of the tenant's routers (the ``on_package`` hook of the network model)."""
    routers = await conn.fetch("SELECT id FROM routers WHERE tenant_id = $1 ORDER BY id", tenant_id)
    await outbox.add_many(
        conn,
        SYNC_PROFILES,
        [({"router_id": r["id"], "correlation_id": correlation_id}, None) for r in routers],
    )


async def request_sync(db: asyncpg.Pool, subscriber_id: int, correlation_id: str) -> None:
    async with db.acquire() as conn, conn.transaction():
        found = await conn.fetchval(
            """
            UPDATE subscribers SET pending_correlations = pending_correlations || ARRAY[$2],
                sync_status = CASE WHEN sync_status = 'syncing' THEN sync_status
                                   ELSE 'pending' END,
                next_sync_at = NULL
            WHERE id = $1 RETURNING id
            """,
            subscriber_id,
            correlation_id,
        )
        if found is None:
            raise NotFound(f"subscriber {subscriber_id}")
        await queue_sync(conn, subscriber_id, correlation_id, "api")


async def queue_reconciliation(producer: Producer, router_id: int) -> Enqueued:
    """Reconcile the router now (one reconciliation per router waits or runs)."""
    return await producer.send(
        SYNC_ROUTER, {"router_id": router_id}, job_id=reconcile_job_id(router_id)
    )


async def queue_expiry(producer: Producer, tenant_id: int) -> Enqueued:
    """Run the tenant's expiry sweep now."""
    return await producer.send(
        EXPIRE_TENANT, {"tenant_id": tenant_id}, job_id=expire_job_id(tenant_id)
    )


async def queue_reboot(producer: Producer, router_id: int, correlation_id: str) -> Enqueued:
    """Reboot the router (an operator's request; one at a time per router)."""
    return await producer.send(
        REBOOT_ROUTER,
        {"router_id": router_id, "correlation_id": correlation_id},
        job_id=reboot_job_id(router_id),
    )
