"""A subscriber's account as the operator reads it: invoices and payments, newest first.

Read-only; the admin API's subscriber views (``/api/subscribers/{id}/invoices`` and
``/payments``) answer with these rows as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imsys.db import Executor


async def invoices(db: Executor, subscriber_id: int, limit: int = 100) -> list[dict[str, Any]]:
    """The subscriber's invoices, newest period first."""
    rows = await db.fetch(
        """
        SELECT i.id, i.period, i.amount, i.status, i.due_at, i.created_at, i.package_id,
               p.name AS package
        FROM invoices i LEFT JOIN packages p ON p.id = i.package_id
        WHERE i.subscriber_id = $1
        ORDER BY i.created_at DESC, i.id DESC LIMIT $2
        """,
        subscriber_id,
        limit,
    )
    return [dict(r) for r in rows]


async def payments(db: Executor, subscriber_id: int, limit: int = 100) -> list[dict[str, Any]]:
    """The subscriber's payments, newest first; ``applied_at`` is null until its job ran
    (the expiry extended, a suspension for non-payment lifted)."""
    rows = await db.fetch(
        """
        SELECT id, amount, reference, created_at, applied_at FROM payments
        WHERE subscriber_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2
        """,
        subscriber_id,
        limit,
    )
    return [dict(r) for r in rows]
