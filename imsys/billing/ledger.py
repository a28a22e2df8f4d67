"""The notification ledger after the provider call: receipts, the 24-hour window, fallback.

A message goes ``queued → sent → delivered | read | failed``. A status only moves
forward (``failed`` ranks below ``delivered``: a phone that reports delivery after a
failure was reached), so a replayed or late receipt changes nothing. Every verified
receipt is stored once in ``notification_receipts``; one that arrives before imsys wrote
down the provider's id is applied when it does (`mark_sent`).

A WhatsApp message that fails (at send time, by receipt, or not delivered within its
kind's ``fallback_after_s``) is queued once as an SMS, when its tenant allows it
(``dedupe_key`` ``fallback:<id>`` makes it once). An SMS fallback that fails too
carries both reasons, and so does the WhatsApp message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from imsys.db import Executor
    from imsys.streams.job import JobSpec

# Forward order of the ledger's states (positions in this array).
RANK_SQL = "array_position(ARRAY['queued','sent','failed','delivered','read'], {})"


@dataclass(frozen=True, slots=True)
class Receipt:
    """One status a provider reported for one message."""

    channel: str  # "whatsapp" | "sms"
    provider_message_id: str
    status: str  # "sent" | "delivered" | "read" | "failed"
    code: str | None
    reason: str | None
    at: datetime


_APPLY = f"""
WITH r AS (
    SELECT status, code, reason, at FROM notification_receipts
    WHERE channel = $1 AND provider_message_id = $2
    ORDER BY {RANK_SQL.format("status")} DESC LIMIT 1
)
UPDATE notifications n SET status = r.status, status_code = r.code, status_at = r.at,
    error = CASE WHEN r.status = 'failed'
                 THEN left(n.channel || ': ' || COALESCE(r.reason, r.code, 'failed'), 1000)
                 ELSE n.error END
FROM r
WHERE n.channel = $1 AND n.provider_message_id = $2
  AND {RANK_SQL.format("n.status")} < {RANK_SQL.format("r.status")}
  AND n.status <> 'queued'
RETURNING n.id, n.status, n.channel, n.fallback_of, n.tenant_id, n.template
"""


async def record_receipt(db: Executor, receipt: Receipt) -> bool:
    """Store a verified receipt; False when the same one was stored already (a replay)."""
    row = await db.fetchval(
        """
        INSERT INTO notification_receipts (channel, provider_message_id, status, code,
                                           reason, at)
        VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1
        """,
        receipt.channel,
        receipt.provider_message_id,
        receipt.status,
        receipt.code,
        (receipt.reason or "")[:500] or None,
        receipt.at,
    )
    return row is not None


async def apply_receipts(db: Executor, channel: str, provider_message_id: str) -> Any:
    """Move the message with that id to its furthest stored status; the row, if it moved."""
    return await db.fetchrow(_APPLY, channel, provider_message_id)


async def mark_sent(
    db: Executor, notification_id: int, provider_id: str, provider: str, sent_as: str | None
) -> Any:
    """``sent`` with the provider's id, then any receipt that raced ahead of this write."""
    channel = await db.fetchval(
        """
        UPDATE notifications SET status = 'sent', provider_message_id = $2, provider = $3,
            sent_as = $4, sent_at = now(), status_at = now(), attempts = attempts + 1,
            error = NULL, sending_at = NULL, sending_by = NULL
        WHERE id = $1 RETURNING channel
        """,
        notification_id,
        provider_id,
        provider,
        sent_as,
    )
    return await apply_receipts(db, channel, provider_id)


async def note_failure(db: Executor, notification_id: int) -> None:
    """A failed SMS fallback: both messages carry both reasons."""
    await db.execute(
        """
        WITH fb AS (SELECT id, fallback_of, error FROM notifications
                    WHERE id = $1 AND status = 'failed' AND fallback_of IS NOT NULL),
        orig AS (SELECT o.id, o.error FROM notifications o JOIN fb ON o.id = fb.fallback_of)
        UPDATE notifications n SET error = left(CASE
            WHEN n.id = fb.id THEN fb.error || ' (after ' || COALESCE(orig.error, 'whatsapp') || ')'
            ELSE COALESCE(orig.error, 'whatsapp') || '; then ' || fb.error END, 1000)
        FROM fb, orig WHERE n.id IN (fb.id, orig.id)
        """,
        notification_id,
    )


# The source rows are locked, in id order (two timers never deadlock), and re-read: a
# receipt committed since the caller chose them (delivered or read) ends the fallback,
# and one still being written is waited for, then seen.
_FALLBACK = """
WITH src AS (
    SELECT n.id, n.tenant_id, n.subscriber_id, n.recipient, n.template, n.body, n.vars
    FROM notifications n LEFT JOIN tenant_messaging tm ON tm.tenant_id = n.tenant_id
    WHERE n.id = ANY($1::bigint[]) AND n.channel = 'whatsapp' AND n.fallback_id IS NULL
      AND n.fallback_of IS NULL AND COALESCE(tm.sms_fallback, true)
      AND n.status IN ('sent', 'failed')
    ORDER BY n.id
    FOR UPDATE OF n
), fb AS (
    INSERT INTO notifications (tenant_id, subscriber_id, channel, recipient, template, body,
                               vars, dedupe_key, fallback_of)
    SELECT tenant_id, subscriber_id, 'sms', recipient, template, body, vars,
           'fallback:' || id, id FROM src
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id, fallback_of, template
), link AS (
    UPDATE notifications n SET fallback_id = fb.id FROM fb WHERE n.id = fb.fallback_of
), queued AS (
    INSERT INTO outbox (stream, type, payload, job_id)
    SELECT $2, $3, jsonb_build_object('notification_id', id), $3 || ':' || id FROM fb
)
SELECT fallback_of AS id, template FROM fb ORDER BY fallback_of
"""


async def queue_fallback(db: Executor, ids: list[int], notify: JobSpec[Any]) -> list[Any]:
    """Queue the SMS for each failed or overdue WhatsApp message of ``ids`` that may have
    one; the rows (``id``, ``template``) of the messages that got it now."""
    if not ids:
        return []
    return list(await db.fetch(_FALLBACK, ids, notify.stream, notify.name))


async def overdue_whatsapp(
    db: Executor, after_s: dict[str, float], default_s: float, now: datetime
) -> list[int]:
    """WhatsApp messages still only ``sent`` at ``now`` past their kind's fallback time."""
    rows = await db.fetch(
        """
        SELECT n.id FROM notifications n
        WHERE n.status = 'sent' AND n.channel = 'whatsapp' AND n.fallback_id IS NULL
          AND n.fallback_of IS NULL
          AND n.sent_at < $3::timestamptz - make_interval(secs => COALESCE(
              ($1::jsonb ->> n.template)::float8, $2))
        ORDER BY n.sent_at LIMIT 1000
        """,
        orjson.dumps(after_s).decode(),
        default_s,
        now,
    )
    return [r["id"] for r in rows]


async def open_window(db: Executor, phone_number_id: str, wa_id: str, at: datetime) -> None:
    await db.execute(
        """
        INSERT INTO whatsapp_windows (phone_number_id, wa_id, last_inbound_at)
        VALUES ($1, $2, $3) ON CONFLICT (phone_number_id, wa_id) DO UPDATE
        SET last_inbound_at = GREATEST(whatsapp_windows.last_inbound_at, EXCLUDED.last_inbound_at)
        """,
        phone_number_id,
        wa_id.lstrip("+"),
        at,
    )


async def in_window(db: Executor, phone_number_id: str, to: str) -> bool:
    """Whether the customer wrote to this business number in the last 24 hours."""
    return bool(
        await db.fetchval(
            "SELECT last_inbound_at > now() - interval '24 hours' FROM whatsapp_windows"
            " WHERE phone_number_id = $1 AND wa_id = $2",
            phone_number_id,
            to.lstrip("+"),
        )
    )


async def whatsapp_template(db: Executor, tenant_id: int | None, kind: str) -> Any:
    if tenant_id is None:
        return None
    return await db.fetchrow(
        "SELECT name, language, params FROM whatsapp_templates WHERE tenant_id = $1"
        " AND kind = $2",
        tenant_id,
        kind,
    )
