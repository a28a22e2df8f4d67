"""The sync domain's SQL: desired state in, sync state and router facts out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from imsys.sync.desired import Desired

if TYPE_CHECKING:
    from imsys.db import Executor


SUBSCRIBER_FOR_SYNC = """
SELECT s.id, s.tenant_id, s.router_id, s.username, s.password, s.service, s.is_suspended,
       s.deleted_at IS NOT NULL AS deleted, s.desired_version, s.kick_required, p.profile,
       s.sync_status, s.pending_correlations
FROM subscribers s JOIN packages p ON p.id = s.package_id
WHERE s.id = $1
"""

ROUTER = """
SELECT id, tenant_id, name, host, port, use_tls, username, password, max_concurrency,
       online, guard_tripped_at, guard_override_until > now() AS guard_overridden
FROM routers WHERE id = $1
"""


@dataclass(frozen=True, slots=True)
class SubscriberRow:
    id: int
    tenant_id: int
    router_id: int
    desired: Desired
    version: int
    kick_required: bool
    sync_status: str
    correlations: list[str]


def subscriber_from(row: asyncpg.Record) -> SubscriberRow:
    return SubscriberRow(
        id=row["id"],
        tenant_id=row["tenant_id"],
        router_id=row["router_id"],
        desired=Desired(
            subscriber_id=row["id"],
            username=row["username"],
            password=row["password"],
            service=row["service"],
            profile=row["profile"],
            disabled=row["is_suspended"] or row["deleted"],
            present=not row["deleted"],
        ),
        version=row["desired_version"],
        kick_required=row["kick_required"],
        sync_status=row["sync_status"],
        correlations=list(row["pending_correlations"]),
    )


async def load_subscriber(conn: Executor, subscriber_id: int) -> SubscriberRow | None:
    row = await conn.fetchrow(SUBSCRIBER_FOR_SYNC, subscriber_id)
    return None if row is None else subscriber_from(row)


async def load_router(conn: Executor, router_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(ROUTER, router_id)


async def router_subscribers(conn: Executor, router_id: int) -> list[SubscriberRow]:
    """Every subscriber the router should know about, deleted ones included (to remove)."""
    rows = await conn.fetch(
        SUBSCRIBER_FOR_SYNC.replace("WHERE s.id = $1", "WHERE s.router_id = $1"), router_id
    )
    return [subscriber_from(r) for r in rows]


async def mark_synced(pool: asyncpg.Pool, sub: SubscriberRow, *, kicked: bool) -> bool:
    """Record success only if the desired state did not change meanwhile."""
    status = await pool.execute(
        """
        UPDATE subscribers
        SET sync_status = 'synced', sync_error = NULL, synced_version = $2,
            last_synced_at = now(), pending_correlations = '{}',
            kick_required = CASE WHEN $3 THEN false ELSE kick_required END
        WHERE id = $1 AND desired_version = $2
        """,
        sub.id,
        sub.version,
        kicked,
    )
    return status.endswith(" 1")


async def mark_error(pool: asyncpg.Pool, sub: SubscriberRow, message: str) -> None:
    await pool.execute(
        """
        UPDATE subscribers SET sync_status = 'error', sync_error = $3
        WHERE id = $1 AND desired_version = $2
        """,
        sub.id,
        sub.version,
        message[:1000],
    )


async def audit(
    conn: Executor,
    *,
    correlation_id: str,
    cause: str,
    action: str,
    outcome: str,
    tenant_id: int | None = None,
    router_id: int | None = None,
    subscriber_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        """
        INSERT INTO audit_log (correlation_id, cause, tenant_id, router_id, subscriber_id,
                               action, detail, outcome)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)
        """,
        correlation_id,
        cause,
        tenant_id,
        router_id,
        subscriber_id,
        action,
        orjson.dumps(detail or {}).decode(),
        outcome,
    )


async def set_router_online(
    pool: asyncpg.Pool, router_id: int, online: bool, error: str | None = None
) -> bool:
    """Record reachability; True when it changed (worth an event)."""
    row = await pool.fetchrow(
        """
        UPDATE routers r SET online = $2,
            last_seen_at = CASE WHEN $2 THEN now() ELSE r.last_seen_at END,
            last_error = $3
        FROM (SELECT online FROM routers WHERE id = $1 FOR UPDATE) AS old
        WHERE r.id = $1
        RETURNING old.online IS DISTINCT FROM $2 AS changed
        """,
        router_id,
        online,
        error,
    )
    return bool(row and row["changed"])


async def record_router_facts(
    pool: asyncpg.Pool,
    router_id: int,
    *,
    version: str | None,
    uptime: str | None,
    cpu_load: int | None,
    sessions: Sequence[tuple[str, str, str | None, str | None]],
) -> None:
    """Router facts and its subscribers' online state from the active sessions, set-based.

    ``sessions`` holds (service, username, address, uptime).
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            UPDATE routers SET version = $2, uptime = $3, cpu_load = $4, online = true,
                last_seen_at = now(), last_error = NULL
            WHERE id = $1
            """,
            router_id,
            version,
            uptime,
            cpu_load,
        )
        await conn.execute(
            """
            UPDATE subscribers s
            SET online = a.username IS NOT NULL,
                address = a.address,
                uptime = a.uptime,
                last_seen_at = CASE WHEN a.username IS NOT NULL THEN now() ELSE s.last_seen_at END
            FROM subscribers s2
            LEFT JOIN unnest($2::text[], $3::text[], $4::text[], $5::text[])
                 AS a(service, username, address, uptime)
              ON a.service = s2.service AND a.username = s2.username
            WHERE s2.id = s.id AND s.router_id = $1 AND s.deleted_at IS NULL
              AND (s.online IS DISTINCT FROM (a.username IS NOT NULL)
                   OR s.address IS DISTINCT FROM a.address OR s.uptime IS DISTINCT FROM a.uptime)
            """,
            router_id,
            [s[0] for s in sessions],
            [s[1] for s in sessions],
            [s[2] for s in sessions],
            [s[3] for s in sessions],
        )
