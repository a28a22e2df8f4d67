"""A subscriber's audit trail read back: each cause, the router command it led to, and
what became of the command (``audit_log``, written by `imsys.sync.repo.audit_intent`
before a command and completed after it).

One row per command and correlation: a change made through the API, a payment, the
expiry sweep or a reconciliation is the ``cause``; ``correlation_id`` links the rows of
one such change (an API call's ``X-Correlation-Id``); ``action`` is the command (``add
/ppp/secret``), ``detail`` its public fields (never a password); ``outcome`` is ``ok``,
``failed: …`` or ``unknown outcome`` while the command is in flight, or if the process
died there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from imsys.db import Executor


async def subscriber_audit(
    db: Executor, subscriber_id: int, limit: int = 200
) -> list[dict[str, Any]]:
    """The subscriber's newest audit rows, newest first."""
    rows = await db.fetch(
        """
        SELECT a.id, a.at, a.correlation_id, a.cause, a.router_id, r.name AS router,
               a.action, a.detail, a.outcome, a.completed_at
        FROM audit_log a LEFT JOIN routers r ON r.id = a.router_id
        WHERE a.subscriber_id = $1
        ORDER BY a.at DESC, a.id DESC LIMIT $2
        """,
        subscriber_id,
        limit,
    )
    out = []
    for r in rows:
        row = dict(r)
        detail = row["detail"]
        row["detail"] = orjson.loads(detail) if isinstance(detail, str | bytes) else detail
        out.append(row)
    return out
