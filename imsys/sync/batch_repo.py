"""The SQL of a per-router sync batch: set-based, a statement for the whole batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from imsys.sync.repo import AUDIT_UNKNOWN, SUBSCRIBER_FOR_SYNC, SubscriberRow, subscriber_from

if TYPE_CHECKING:
    from imsys.db import Conn, Executor


async def load_subscribers(conn: Executor, ids: Sequence[int]) -> dict[int, SubscriberRow]:
    rows = await conn.fetch(
        SUBSCRIBER_FOR_SYNC.replace("WHERE s.id = $1", "WHERE s.id = ANY($1::bigint[])"),
        list(ids),
    )
    return {r["id"]: subscriber_from(r) for r in rows}


@dataclass(frozen=True, slots=True)
class Intent:
    """One router command about to be sent, as the audit log records it."""

    correlations: Sequence[str]
    cause: str
    tenant_id: int | None
    router_id: int
    subscriber_id: int | None
    action: str
    detail: dict[str, Any]


async def audit_intents(conn: Executor, intents: Sequence[Intent]) -> list[list[int]]:
    """``unknown outcome`` rows for commands about to be sent (one per correlation), all
    in one statement; the row ids of each intent, in order."""
    index: list[int] = []
    correlations: list[str] = []
    for i, intent in enumerate(intents):
        for c in intent.correlations:
            index.append(i)
            correlations.append(c)
    rows = await conn.fetch(
        """
        INSERT INTO audit_log (correlation_id, cause, tenant_id, router_id, subscriber_id,
                               action, detail, outcome)
        SELECT u.c, i.cause, i.tenant_id, i.router_id, i.subscriber_id, i.action,
               i.detail::jsonb, $9
        FROM unnest($1::int[], $2::text[]) AS u(k, c)
        JOIN unnest($3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[],
                    $8::text[]) WITH ORDINALITY
             AS i(cause, tenant_id, router_id, subscriber_id, action, detail, k)
          ON i.k = u.k + 1
        RETURNING id, subscriber_id, action
        """,
        index,
        correlations,
        [i.cause for i in intents],
        [i.tenant_id for i in intents],
        [i.router_id for i in intents],
        [i.subscriber_id for i in intents],
        [i.action for i in intents],
        [orjson.dumps(i.detail).decode() for i in intents],
        AUDIT_UNKNOWN,
    )
    by_key: dict[tuple[int | None, str], list[int]] = {}
    for r in rows:
        by_key.setdefault((r["subscriber_id"], r["action"]), []).append(r["id"])
    return [by_key.get((i.subscriber_id, i.action), []) for i in intents]


async def audit_outcomes(conn: Executor, outcomes: Sequence[tuple[list[int], str | None]]) -> None:
    """Complete the intents' rows: an outcome each, or None for a command never sent
    (its rows are removed, as ``repo.audit_withdraw`` does)."""
    done = [(i, o[:1000]) for ids, o in outcomes if o is not None for i in ids]
    withdrawn = [i for ids, o in outcomes if o is None for i in ids]
    if done:
        await conn.execute(
            """
            UPDATE audit_log a SET outcome = u.outcome, completed_at = now()
            FROM unnest($1::bigint[], $2::text[]) AS u(id, outcome) WHERE a.id = u.id
            """,
            [i for i, _ in done],
            [o for _, o in done],
        )
    if withdrawn:
        await conn.execute("DELETE FROM audit_log WHERE id = ANY($1::bigint[])", withdrawn)


async def forget_passwords(conn: Executor, ids: Sequence[int]) -> None:
    """Before writes that send a password: the entry may end up holding either."""
    await conn.execute(
        "UPDATE subscribers SET router_password_hash = NULL WHERE id = ANY($1::bigint[])",
        list(ids),
    )


async def forget_entries(conn: Executor, ids: Sequence[int]) -> None:
    """The router's ids of these subscribers' entries are unknown (a write's outcome
    was lost): their next sync looks for them by comment."""
    await conn.execute(
        "UPDATE subscribers SET router_entries = NULL WHERE id = ANY($1::bigint[])", list(ids)
    )


async def lock_versions(conn: Conn, ids: Sequence[int]) -> dict[int, int]:
    """Lock the rows (in id order, so two batches never deadlock); their versions."""
    rows = await conn.fetch(
        "SELECT id, desired_version FROM subscribers WHERE id = ANY($1::bigint[]) "
        "ORDER BY id FOR UPDATE",
        list(ids),
    )
    return {r["id"]: r["desired_version"] for r in rows}


async def mark_syncing(conn: Executor, versions: Sequence[tuple[int, int]]) -> None:
    """Jobs are working on these subscribers (id, version) now."""
    await conn.execute(
        """
        UPDATE subscribers s SET sync_status = 'syncing'
        FROM unnest($1::bigint[], $2::bigint[]) AS u(id, version)
        WHERE s.id = u.id AND s.desired_version = u.version AND s.sync_status <> 'syncing'
        """,
        [v[0] for v in versions],
        [v[1] for v in versions],
    )


async def mark_retrying(
    conn: Executor, waiting: Sequence[tuple[int, int, int]], error: str, delay: float
) -> None:
    """These subscribers' jobs (id, version, attempt) wait to be tried again without
    spending an attempt (the router is away): say why and when."""
    await conn.execute(
        """
        UPDATE subscribers s SET sync_status = 'retrying', sync_error = $4,
            sync_attempt = u.attempt, next_sync_at = now() + make_interval(secs => $5)
        FROM unnest($1::bigint[], $2::bigint[], $3::int[]) AS u(id, version, attempt)
        WHERE s.id = u.id AND s.desired_version = u.version
        """,
        [w[0] for w in waiting],
        [w[1] for w in waiting],
        [w[2] for w in waiting],
        error[:1000],
        delay,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one subscriber's run in the batch came to, for the database."""

    subscriber_id: int
    version: int
    error: str | None  # None: synced
    kicked: bool
    entries: dict[str, str] | None  # None: unknown
    # The digest of the password its entry now holds, when this run wrote it.
    password_digest: str | None
    # For an error: the attempt that failed, and the seconds until the next one (None:
    # no next one, the error stands).
    attempt: int = 1
    retry_in: float | None = None


async def record(conn: Conn, outcomes: Sequence[Outcome]) -> set[int]:
    """Record the batch in one statement: the router's entry ids and password digests
    always (facts about the router), the status only for rows whose desired state did
    not move on meanwhile. Returns the subscribers whose status was recorded."""
    rows = await conn.fetch(
        """
        UPDATE subscribers s SET
            router_entries = u.entries::jsonb,
            router_password_hash = coalesce(u.digest, s.router_password_hash),
            sync_status = CASE WHEN s.desired_version <> u.version THEN s.sync_status
                               WHEN u.error IS NULL THEN 'synced'
                               WHEN u.retry_in IS NOT NULL THEN 'retrying'
                               ELSE 'error' END,
            sync_error = CASE WHEN s.desired_version <> u.version THEN s.sync_error
                              ELSE u.error END,
            sync_attempt = CASE WHEN s.desired_version <> u.version THEN s.sync_attempt
                                WHEN u.error IS NULL THEN NULL ELSE u.attempt END,
            next_sync_at = CASE WHEN s.desired_version <> u.version THEN s.next_sync_at
                                WHEN u.retry_in IS NULL THEN NULL
                                ELSE now() + make_interval(secs => u.retry_in) END,
            synced_version = CASE WHEN s.desired_version = u.version AND u.error IS NULL
                                  THEN u.version ELSE s.synced_version END,
            blocked_version = CASE WHEN s.desired_version = u.version AND u.error IS NULL
                                   THEN NULL ELSE s.blocked_version END,
            last_synced_at = CASE WHEN s.desired_version = u.version AND u.error IS NULL
                                  THEN now() ELSE s.last_synced_at END,
            pending_correlations = CASE WHEN s.desired_version = u.version AND u.error IS NULL
                                        THEN '{}' ELSE s.pending_correlations END,
            kick_required = CASE WHEN s.desired_version = u.version AND u.error IS NULL
                                      AND u.kicked THEN false ELSE s.kick_required END
        FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bool[], $5::text[], $6::text[],
                    $7::int[], $8::float8[])
             AS u(id, version, error, kicked, entries, digest, attempt, retry_in)
        WHERE s.id = u.id
        RETURNING s.id, s.desired_version = u.version AS current
        """,
        [o.subscriber_id for o in outcomes],
        [o.version for o in outcomes],
        [None if o.error is None else o.error[:1000] for o in outcomes],
        [o.kicked for o in outcomes],
        [None if o.entries is None else orjson.dumps(o.entries).decode() for o in outcomes],
        [o.password_digest for o in outcomes],
        [o.attempt for o in outcomes],
        [o.retry_in for o in outcomes],
    )
    return {r["id"] for r in rows if r["current"]}
