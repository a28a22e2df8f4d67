"""Billing SQL: set-based bills and reminders, exactly-once payments, the notification ledger.

Every statement that creates something the customer would see twice (an invoice, a
message) relies on a unique key, so a re-run creates nothing new.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

if TYPE_CHECKING:
    from imsys.db import Conn, Executor
    from imsys.streams.job import JobSpec


# A template rendered in SQL: the same variables as the Python renderer.
RENDER = """
replace(replace(replace(replace(replace(replace(replace(
    {tpl}, '{{name}}', {name}), '{{package}}', {package}), '{{period}}', {period}),
    '{{amount}}', {amount}), '{{due_date}}', {due_date}), '{{expires_at}}', {expires_at}),
    '{{days}}', {days})
"""


# The same values as JSON, kept on the message for a WhatsApp template's parameters.
VARS = """
jsonb_build_object('name', {name}, 'package', {package}, 'period', {period},
    'amount', {amount}, 'due_date', {due_date}, 'expires_at', {expires_at}, 'days', {days})
"""


def _tpl(name: str, default_param: str) -> str:
    """The tenant's template, else the configured default."""
    return (
        f"COALESCE((SELECT body FROM message_templates mt WHERE mt.tenant_id = s.tenant_id "
        f"AND mt.template = '{name}'), {default_param})"
    )


def _channel(phone_channel_param: str) -> str:
    return f"CASE WHEN s.phone IS NOT NULL THEN {phone_channel_param} ELSE 'email' END"


_INVOICE_VARS = {
    "name": "s.username",
    "package": "p.name",
    "period": "$2",
    "amount": "inv.amount::text",
    "due_date": "to_char(inv.due_at AT TIME ZONE $7, 'YYYY-MM-DD')",
    "expires_at": "''",
    "days": "''",
}
_REMINDER_VARS = {
    "name": "s.username",
    "package": "p.name",
    "period": "''",
    "amount": "p.price::text",
    "due_date": "''",
    "expires_at": "to_char(s.expires_at AT TIME ZONE s.time_zone, 'YYYY-MM-DD HH24:MI')",
    "days": "s.days::text",
}

GENERATE_BILLS = f"""
WITH billable AS (
    SELECT s.id, s.tenant_id, s.package_id, s.username, s.phone, s.email, s.expires_at,
           p.price, p.name AS package
    FROM subscribers s JOIN packages p ON p.id = s.package_id
    WHERE s.tenant_id = $1 AND s.deleted_at IS NULL
      -- Billable this period: the paid-up time runs out before the period ends.
      AND (s.expires_at IS NULL OR s.expires_at < $4)
), inv AS (
    INSERT INTO invoices (tenant_id, subscriber_id, package_id, period, amount, due_at)
    SELECT tenant_id, id, package_id, $2, price, COALESCE(expires_at, $3) FROM billable
    ON CONFLICT (subscriber_id, period) DO NOTHING
    RETURNING id, subscriber_id, amount, due_at
), note AS (
    INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient, template, body,
                               dedupe_key, vars)
    SELECT s.tenant_id, s.id, {_channel("$6")}, COALESCE(s.phone, s.email), 'invoice',
           {RENDER.format(tpl="$5", **_INVOICE_VARS)},
           'invoice:' || inv.id, {VARS.format(**_INVOICE_VARS)}
    -- Joined through primary keys, not CTE to CTE: right after a bulk import the planner
    -- has no statistics yet, and a nested loop of two CTE scans is quadratic.
    FROM inv JOIN subscribers s ON s.id = inv.subscriber_id JOIN packages p ON p.id = s.package_id
    WHERE COALESCE(s.phone, s.email) IS NOT NULL
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id
), queued AS (
    -- $8, $9: the notification job's stream and type; its job id as notification_job_id.
    INSERT INTO outbox (stream, type, payload, job_id)
    SELECT $8, $9, jsonb_build_object('notification_id', id), $9 || ':' || id FROM note
    RETURNING 1
), run AS (
    INSERT INTO billing_runs (tenant_id, period, invoices)
    VALUES ($1, $2, (SELECT count(*) FROM inv))
    ON CONFLICT (tenant_id, period) DO UPDATE
        SET invoices = billing_runs.invoices + EXCLUDED.invoices, completed_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM inv) AS invoices, (SELECT count(*) FROM note) AS messages,
       (SELECT count(*) FROM queued) AS queued, (SELECT count(*) FROM run) AS runs
"""

# One reminder per subscriber, expiry and lead time: the smallest lead time now due.
REMINDERS = f"""
WITH due AS (
    SELECT s.id, s.tenant_id, s.username, s.phone, s.email, s.expires_at, s.package_id,
           lt.days, t.time_zone,
           row_number() OVER (PARTITION BY s.id ORDER BY lt.days) AS rn
    FROM subscribers s
    JOIN tenants t ON t.id = s.tenant_id AND t.active
    CROSS JOIN unnest($1::int[]) AS lt(days)
    WHERE s.deleted_at IS NULL AND NOT s.is_suspended
      AND s.expires_at > now() AND s.expires_at <= now() + make_interval(days => lt.days)
      AND COALESCE(s.phone, s.email) IS NOT NULL
), note AS (
    INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient, template, body,
                               dedupe_key, vars)
    SELECT s.tenant_id, s.id, {_channel("$3")}, COALESCE(s.phone, s.email), 'reminder',
           {RENDER.format(tpl=_tpl("reminder", "$2"), **_REMINDER_VARS)},
           'reminder:' || s.id || ':' || extract(epoch FROM s.expires_at)::bigint || ':' || s.days,
           {VARS.format(**_REMINDER_VARS)}
    FROM due s JOIN packages p ON p.id = s.package_id
    WHERE s.rn = 1
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id
), queued AS (
    -- $4, $5: the notification job's stream and type; its job id as notification_job_id.
    INSERT INTO outbox (stream, type, payload, job_id)
    SELECT $4, $5, jsonb_build_object('notification_id', id), $5 || ':' || id FROM note
    RETURNING 1
)
SELECT count(*) FROM queued
"""


async def generate_bills(
    conn: Conn,
    *,
    tenant_id: int,
    period: str,
    period_start: datetime,
    period_end: datetime,
    template: str,
    phone_channel: str,
    time_zone: str,
    notify: JobSpec[Any],
) -> asyncpg.Record:
    """Invoices, their messages, and a ``notify`` job per message, in one statement."""
    row = await conn.fetchrow(
        GENERATE_BILLS,
        tenant_id,
        period,
        period_start,
        period_end,
        template,
        phone_channel,
        time_zone,
        notify.stream,
        notify.name,
    )
    assert row is not None
    return row


async def queue_reminders(
    db: Executor, *, lead_times: list[int], template: str, phone_channel: str, notify: JobSpec[Any]
) -> int:
    """Reminders now due, each with its ``notify`` job; returns how many were queued."""
    return int(
        await db.fetchval(
            REMINDERS, lead_times, template, phone_channel, notify.stream, notify.name
        )
    )


async def tenants_due_for_bills(db: Executor, periods: dict[int, str]) -> list[int]:
    """Tenants whose current period has no completed billing run yet."""
    if not periods:
        return []
    rows = await db.fetch(
        """
        SELECT p.tenant_id FROM unnest($1::bigint[], $2::text[]) AS p(tenant_id, period)
        WHERE NOT EXISTS (SELECT 1 FROM billing_runs r
                          WHERE r.tenant_id = p.tenant_id AND r.period = p.period)
        """,
        list(periods),
        list(periods.values()),
    )
    return [r["tenant_id"] for r in rows]


async def notification(db: Executor, notification_id: int) -> asyncpg.Record | None:
    return await db.fetchrow(
        """
        SELECT n.*, t.name AS tenant_name, tm.account FROM notifications n
        LEFT JOIN tenants t ON t.id = n.tenant_id
        LEFT JOIN tenant_messaging tm ON tm.tenant_id = n.tenant_id WHERE n.id = $1
        """,
        notification_id,
    )


async def lock_billing_run(conn: Conn, run: str) -> None:
    """Hold, until the transaction ends, the one lock of a tenant's period's ``run``."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", run)


Claim = Literal["claimed", "done", "busy"]


async def claim_sending(
    db: asyncpg.Pool,
    notification_id: int,
    claimant: str,
    *,
    lease_s: float,
    fence: Callable[[], Awaitable[None]],
) -> Claim:
    """Claim a queued message for one delivery before its provider call.

    ``done``: it is no longer queued. ``busy``: another delivery's claim younger than
    ``lease_s`` holds it. Otherwise ``fence`` runs with the row locked (raising
    ``FencedOut`` for a stale delivery, which then claims nothing) and the claim is written.
    """
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            SELECT status, sending_by,
                   sending_at > now() - make_interval(secs => $2) AS held
            FROM notifications WHERE id = $1 FOR UPDATE
            """,
            notification_id,
            lease_s,
        )
        if row is None or row["status"] != "queued":
            return "done"
        if row["held"] and row["sending_by"] != claimant:
            return "busy"
        await fence()
        await conn.execute(
            "UPDATE notifications SET sending_at = now(), sending_by = $2 WHERE id = $1",
            notification_id,
            claimant,
        )
        return "claimed"


async def mark_sent(db: Executor, notification_id: int, provider_id: str) -> None:
    await db.execute(
        """
        UPDATE notifications SET status = 'sent', provider_message_id = $2, sent_at = now(),
            attempts = attempts + 1, error = NULL, sending_at = NULL, sending_by = NULL
        WHERE id = $1
        """,
        notification_id,
        provider_id,
    )


async def mark_attempt_failed(
    db: asyncpg.Pool,
    notification_id: int,
    error: str,
    *,
    final: bool,
    claimant: str,
    fence: Callable[[], Awaitable[None]],
) -> bool:
    """Record a failed try and release the claim; False when the claim is not ours now."""
    async with db.acquire() as conn, conn.transaction():
        owner = await conn.fetchval(
            "SELECT sending_by FROM notifications WHERE id = $1 AND status = 'queued' FOR UPDATE",
            notification_id,
        )
        if owner != claimant:
            return False
        await fence()
        await conn.execute(
            """
            UPDATE notifications SET attempts = attempts + 1, error = $2,
                status = CASE WHEN $3 THEN 'failed' ELSE status END,
                sending_at = NULL, sending_by = NULL
            WHERE id = $1
            """,
            notification_id,
            error[:1000],
            final,
        )
        return True


async def release_claim(db: Executor, notification_id: int, claimant: str) -> None:
    """Give the claim back without counting an attempt (the message is held, not failed)."""
    await db.execute(
        "UPDATE notifications SET sending_at = NULL, sending_by = NULL"
        " WHERE id = $1 AND sending_by = $2 AND status = 'queued'",
        notification_id,
        claimant,
    )


def as_dict(row: asyncpg.Record | None) -> dict[str, Any] | None:
    return None if row is None else dict(row)


# --- what the admin API reads and writes -------------------------------------------------


async def save_template(
    db: Executor, tenant_id: int, template: str, body: str
) -> dict[str, Any] | None:
    """Set a tenant's message template; None when the tenant does not exist."""
    if not await db.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id):
        return None
    row = await db.fetchrow(
        """
        INSERT INTO message_templates (tenant_id, template, body) VALUES ($1, $2, $3)
        ON CONFLICT (tenant_id, template) DO UPDATE SET body = EXCLUDED.body, updated_at = now()
        RETURNING tenant_id, template, body, updated_at
        """,
        tenant_id,
        template,
        body,
    )
    return as_dict(row)


async def save_messaging(
    db: Executor, tenant_id: int, account: str | None, sms_fallback: bool
) -> dict[str, Any] | None:
    if not await db.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id):
        return None
    row = await db.fetchrow(
        """
        INSERT INTO tenant_messaging (tenant_id, account, sms_fallback) VALUES ($1, $2, $3)
        ON CONFLICT (tenant_id) DO UPDATE SET account = EXCLUDED.account,
            sms_fallback = EXCLUDED.sms_fallback, updated_at = now()
        RETURNING tenant_id, account, sms_fallback, updated_at
        """,
        tenant_id,
        account,
        sms_fallback,
    )
    return as_dict(row)


async def save_whatsapp_template(
    db: Executor, tenant_id: int, kind: str, tpl: Any
) -> dict[str, Any] | None:
    if not await db.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id):
        return None
    row = await db.fetchrow(
        """
        INSERT INTO whatsapp_templates (tenant_id, kind, name, language, params)
        VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, kind) DO UPDATE
        SET name = EXCLUDED.name, language = EXCLUDED.language, params = EXCLUDED.params,
            updated_at = now()
        RETURNING tenant_id, kind, name, language, params, updated_at
        """,
        tenant_id,
        kind,
        tpl.name,
        tpl.language,
        tpl.params,
    )
    return as_dict(row)


async def recent_notifications(
    db: Executor, subscriber_id: int | None, limit: int = 200, tenant_id: int | None = None
) -> list[dict[str, Any]]:
    """The latest notifications, newest first; of one subscriber, one tenant when given."""
    rows = await db.fetch(
        """
        SELECT id, subscriber_id, channel, recipient, template, status, attempts,
               provider, provider_message_id, status_code, status_at, sent_as, fallback_of,
               fallback_id, error, created_at, sent_at
        FROM notifications
        WHERE ($1::bigint IS NULL OR subscriber_id = $1)
          AND ($3::bigint IS NULL OR tenant_id = $3)
        ORDER BY id DESC LIMIT $2
        """,
        subscriber_id,
        limit,
        tenant_id,
    )
    return [dict(r) for r in rows]
