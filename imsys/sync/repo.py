"""The sync domain's SQL: desired state in, sync state and router facts out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from imsys import outbox
from imsys.sync.desired import Desired, restarted
from imsys.sync.jobs import SYNC_ROUTER, reconcile_job_id

if TYPE_CHECKING:
    from imsys.db import Conn, Executor

# Raises FencedOut when the job's delivery is no longer the current one (Job.ensure_current).
Fence = Callable[[], Awaitable[None]]


SUBSCRIBER_FOR_SYNC = """
SELECT s.id, s.tenant_id, s.router_id, s.username, s.password, s.service, s.is_suspended,
       s.deleted_at IS NOT NULL AS deleted, s.desired_version, s.kick_required, p.profile,
       s.router_password_hash, s.router_entries,
       s.sync_status, s.pending_correlations,
       s.blocked_version IS NOT DISTINCT FROM s.desired_version AS blocked
FROM subscribers s JOIN packages p ON p.id = s.package_id
WHERE s.id = $1
"""

ROUTER = """
SELECT id, tenant_id, name, host, port, use_tls, username, password, max_concurrency,
       tls_fingerprint, tls_ca, tls_verify,
       online, uptime, guard_tripped_at, guard_override_until > now() AS guard_overridden,
       CASE WHEN maintenance_until > now() THEN maintenance_until END AS maintenance_until
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
    # Blocked by an unmanaged twin at this version (see ``mark_blocked``).
    blocked: bool = False
    # The router's `.id` of each managed entry (menu -> id); None: unknown, look by comment.
    entries: dict[str, str] | None = None


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
            written_password=row["router_password_hash"],
        ),
        version=row["desired_version"],
        kick_required=row["kick_required"],
        sync_status=row["sync_status"],
        correlations=list(row["pending_correlations"]),
        blocked=bool(row["blocked"]),
        entries=_entries(row.get("router_entries")),
    )


def _entries(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    found = orjson.loads(value) if isinstance(value, str | bytes) else value
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None


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


async def set_written_password(
    conn: Executor, subscriber_id: int, digest: str | None, *, fence: Fence
) -> None:
    """Record the digest of the password the router entry now holds (``password_digest``);
    None before a write that sends one, whose outcome may be lost (then it is sent again).
    Fenced: a run whose claim another process took records nothing."""
    await fence()
    await conn.execute(
        "UPDATE subscribers SET router_password_hash = $2 WHERE id = $1", subscriber_id, digest
    )


async def mark_blocked(
    pool: asyncpg.Pool, sub: SubscriberRow, message: str, *, fence: Fence
) -> bool | None:
    """Record that an unmanaged twin blocks this version: True the first time for this
    version (worth one event), False after that, None when the desired state moved on
    meanwhile (nothing written).

    The row is locked before ``fence`` runs, as a batch's record is
    (``batch_repo.lock_versions``): a process that claimed the job later waits here and
    reads what this run wrote; one that claimed it earlier makes ``fence`` raise
    ``FencedOut`` and nothing is written."""
    async with pool.acquire() as conn, conn.transaction():
        current = await _lock_subscriber(conn, sub)
        await fence()
        if not current:
            return None
        first = await conn.fetchval(
            """
            UPDATE subscribers s SET sync_status = 'error', sync_error = $3, blocked_version = $2,
                sync_attempt = NULL, next_sync_at = NULL
            FROM (SELECT blocked_version FROM subscribers WHERE id = $1) AS old
            WHERE s.id = $1 AND s.desired_version = $2
            RETURNING old.blocked_version IS DISTINCT FROM $2
            """,
            sub.id,
            sub.version,
            message[:1000],
        )
    return bool(first)


async def _lock_subscriber(conn: Conn, sub: SubscriberRow) -> bool:
    """Lock the row; False when its desired state moved on (this run's result is moot)."""
    version = await conn.fetchval(
        "SELECT desired_version FROM subscribers WHERE id = $1 FOR UPDATE", sub.id
    )
    return bool(version == sub.version)


async def mark_pending(conn: Conn, subscriber_ids: list[int]) -> int:
    """Synced subscribers whose router entry drifted are no longer synced: say so."""
    status = await conn.execute(
        """
        UPDATE subscribers SET sync_status = 'pending'
        WHERE id = ANY($1::bigint[]) AND sync_status = 'synced'
        """,
        subscriber_ids,
    )
    return int(status.rsplit(" ", 1)[1])


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


AUDIT_UNKNOWN = "unknown outcome"


async def audit_intent(
    conn: Executor,
    *,
    correlations: Sequence[str],
    cause: str,
    action: str,
    tenant_id: int | None,
    router_id: int | None,
    subscriber_id: int | None,
    detail: dict[str, Any],
) -> list[int]:
    """Rows for a router command about to be sent, one per correlation; their ids.

    Written before the command, as ``unknown outcome``: a process killed while the
    command is in flight leaves the row saying so, never a change with no row.
    """
    rows = await conn.fetch(
        """
        INSERT INTO audit_log (correlation_id, cause, tenant_id, router_id, subscriber_id,
                               action, detail, outcome)
        SELECT c, $2, $3, $4, $5, $6, $7::jsonb, $8 FROM unnest($1::text[]) AS u(c)
        RETURNING id
        """,
        list(correlations),
        cause,
        tenant_id,
        router_id,
        subscriber_id,
        action,
        orjson.dumps(detail).decode(),
        AUDIT_UNKNOWN,
    )
    return [r["id"] for r in rows]


async def audit_outcome(conn: Executor, ids: list[int], outcome: str) -> None:
    """Complete the rows ``audit_intent`` wrote with what became of the command."""
    await conn.execute(
        "UPDATE audit_log SET outcome = $2, completed_at = now() WHERE id = ANY($1::bigint[])",
        ids,
        outcome[:1000],
    )


async def audit_withdraw(conn: Executor, ids: list[int]) -> None:
    """Remove intent rows whose command was never sent (the job is another's now)."""
    await conn.execute("DELETE FROM audit_log WHERE id = ANY($1::bigint[])", ids)


async def queue_reconciliation(conn: Conn, router_id: int) -> None:
    """Reconcile the router now (in the caller's transaction, through the outbox)."""
    await outbox.add(
        conn, SYNC_ROUTER, {"router_id": router_id}, job_id=reconcile_job_id(router_id)
    )


async def set_router_online(
    pool: asyncpg.Pool, router_id: int, online: bool, error: str | None = None
) -> bool:
    """Record reachability; True when it changed (worth an event).

    A router back from offline may have lost its configuration while away (a reset, a
    replacement): its reconciliation is queued with the change, not left to the timer.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE routers r SET online = $2,
                last_seen_at = CASE WHEN $2 THEN now() ELSE r.last_seen_at END,
                last_error = $3
            FROM (SELECT online FROM routers WHERE id = $1 FOR UPDATE) AS old
            WHERE r.id = $1
            RETURNING old.online AS was
            """,
            router_id,
            online,
            error,
        )
        if row is None:
            return False
        if online and row["was"] is False:
            await queue_reconciliation(conn, router_id)
        return bool(row["was"] is not online)


async def record_router_facts(
    pool: asyncpg.Pool,
    router_id: int,
    *,
    version: str | None,
    uptime: str | None,
    cpu_load: int | None,
    sessions: Sequence[tuple[str, str, str | None, str | None]],
) -> bool:
    """Router facts and its subscribers' online state from the active sessions, set-based.

    ``sessions`` holds (service, username, address, uptime). True when the router
    restarted since the last reading (its uptime went back): a reboot or a reset may
    have lost entries, so its reconciliation is queued in the same transaction.
    """
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(
            """
            SELECT uptime, extract(epoch FROM now() - last_seen_at)::float8 AS elapsed
            FROM routers WHERE id = $1 FOR UPDATE
            """,
            router_id,
        )
        rebooted = before is not None and restarted(before["uptime"], uptime, before["elapsed"])
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
        if rebooted:
            await queue_reconciliation(conn, router_id)
    return rebooted
