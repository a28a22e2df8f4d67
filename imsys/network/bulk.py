"""Bulk import of subscribers: many rows, validated as a whole, written all or nothing.

Every row is checked before anything is written: its fields (`SubscriberIn`), its
tenant, router and package (they exist and belong together), its username unique
within the batch and not taken on its router. Any bad row refuses the whole batch
(`BulkInvalid` names each bad row by its 0-based index); otherwise the rows go in with
set-based statements (one ``INSERT ... SELECT FROM unnest``) and ``on_created`` (the
sync domain's `imsys.sync.service.subscribers_created`) writes their outbox rows, in the
same transaction. Shared by ``POST /api/subscribers/bulk`` and ``python -m imsys import``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pydantic

from imsys.network.errors import Conflict, Invalid
from imsys.network.models import SubscriberIn
from imsys.validation import describe

if TYPE_CHECKING:
    from imsys.db import Conn

MAX_ROWS: Final = 100_000
# A 400 lists this many bad rows at most; ``count`` says how many there are.
MAX_LISTED: Final = 1000
_BIGINT_MAX: Final = 2**63 - 1

# Awaited inside the transaction that created the subscribers: (conn, ids, correlation_id).
OnCreated = Callable[["Conn", list[int], str], Awaitable[None]]


class BulkInvalid(Invalid):
    """One or more rows are bad: nothing was written. ``rows`` is every bad row
    ``{"index", "error"}`` in index order; `as_dict` is the API's 400 body."""

    def __init__(self, total: int, rows: list[dict[str, Any]]) -> None:
        self.total = total
        self.rows = rows
        super().__init__(f"{len(rows)} of {total} rows are invalid; nothing was written")

    def as_dict(self) -> dict[str, Any]:
        return {
            "error": str(self),
            "count": len(self.rows),
            "rows": self.rows[:MAX_LISTED],
        }


def _in_range(ids: set[int]) -> list[int]:
    """The ids PostgreSQL can hold (a larger one exists nowhere, so it is simply not found)."""
    return [i for i in ids if 0 < i <= _BIGINT_MAX]


async def check(conn: Conn, raw: Sequence[object]) -> list[SubscriberIn]:
    """Every row as `SubscriberIn`, or `BulkInvalid` naming every bad row."""
    if not raw:
        raise Invalid("no rows: give at least one subscriber")
    if len(raw) > MAX_ROWS:
        raise Invalid(f"{len(raw)} rows: at most {MAX_ROWS} per import")
    bad: dict[int, list[str]] = {}
    good: dict[int, SubscriberIn] = {}
    # A list we were given to consume is emptied as it is read: 100,000 parsed rows cost
    # more memory than their validated models, and the two need not exist together.
    consume = isinstance(raw, list)
    for i, item in enumerate(raw):
        if consume:
            raw[i] = None  # type: ignore[index]
        if not isinstance(item, dict):
            bad[i] = ["a subscriber must be a JSON object"]
            continue
        try:
            good[i] = SubscriberIn.model_validate(item)
        except pydantic.ValidationError as exc:
            bad[i] = [describe(exc, whole="row", limit=10)]

    rows = list(good.values())
    tenants = {
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM tenants WHERE id = ANY($1::bigint[])",
            _in_range({s.tenant_id for s in rows}),
        )
    }
    routers = {
        r["id"]: r["tenant_id"]
        for r in await conn.fetch(
            "SELECT id, tenant_id FROM routers WHERE id = ANY($1::bigint[])",
            _in_range({s.router_id for s in rows}),
        )
    }
    packages = {
        r["id"]: r["tenant_id"]
        for r in await conn.fetch(
            "SELECT id, tenant_id FROM packages WHERE id = ANY($1::bigint[]) "
            "AND deleted_at IS NULL",
            _in_range({s.package_id for s in rows}),
        )
    }
    first: dict[tuple[int, str, str], int] = {}
    for i, s in good.items():
        wrong: list[str] = []
        if s.tenant_id not in tenants:
            wrong.append(f"tenant {s.tenant_id} does not exist")
        if routers.get(s.router_id) != s.tenant_id:
            wrong.append(f"router {s.router_id} of tenant {s.tenant_id} does not exist")
        if packages.get(s.package_id) != s.tenant_id:
            wrong.append(f"package {s.package_id} of tenant {s.tenant_id} does not exist")
        key = (s.router_id, s.service, s.username)
        if key in first:
            wrong.append(
                f"{s.service} username {s.username!r} on router {s.router_id} repeats "
                f"row {first[key]} of this import"
            )
        else:
            first[key] = i
        if wrong:
            bad.setdefault(i, []).extend(wrong)

    known = [(k, i) for k, i in first.items() if 0 < k[0] <= _BIGINT_MAX]
    if known:
        taken = await conn.fetch(
            """
            SELECT s.router_id, s.service, s.username
            FROM subscribers s
            JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS u(router_id, service, username)
              ON s.router_id = u.router_id AND s.service = u.service
             AND s.username = u.username
            WHERE s.deleted_at IS NULL
            """,
            [k[0] for k, _ in known],
            [k[1] for k, _ in known],
            [k[2] for k, _ in known],
        )
        for t in taken:
            i = first[(t["router_id"], t["service"], t["username"])]
            bad.setdefault(i, []).append(
                f"router {t['router_id']} already has a {t['service']} subscriber {t['username']!r}"
            )
    if bad:
        raise BulkInvalid(len(raw), [{"index": i, "error": "; ".join(bad[i])} for i in sorted(bad)])
    return [good[i] for i in range(len(raw))]


async def create_subscribers(
    db: asyncpg.Pool, raw: Sequence[object], correlation_id: str, *, on_created: OnCreated
) -> list[int]:
    """Validate ``raw`` as a whole and create every row, or none (`BulkInvalid`); the ids
    of the new subscribers in row order."""
    async with db.acquire() as conn, conn.transaction():
        rows = await check(conn, raw)
        ids: list[int] = sorted(
            await conn.fetchval(
                "SELECT array_agg(nextval(pg_get_serial_sequence('subscribers', 'id'))) "
                "FROM generate_series(1, $1)",
                len(rows),
            )
        )
        try:
            await conn.execute(
                """
                INSERT INTO subscribers (id, tenant_id, router_id, package_id, username,
                    password, service, is_suspended, expires_at, phone, email,
                    pending_correlations, suspension_reason)
                SELECT u.id, u.tenant_id, u.router_id, u.package_id, u.username, u.password,
                    u.service, u.is_suspended, u.expires_at, u.phone, u.email, ARRAY[$12],
                    CASE WHEN u.is_suspended THEN 'admin' END
                FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                    $5::text[], $6::text[], $7::text[], $8::boolean[], $9::timestamptz[],
                    $10::text[], $11::text[])
                    AS u(id, tenant_id, router_id, package_id, username, password, service,
                         is_suspended, expires_at, phone, email)
                """,
                ids,
                [s.tenant_id for s in rows],
                [s.router_id for s in rows],
                [s.package_id for s in rows],
                [s.username for s in rows],
                [s.password for s in rows],
                [s.service for s in rows],
                [s.is_suspended for s in rows],
                [s.expires_at for s in rows],
                [s.phone for s in rows],
                [s.email for s in rows],
                correlation_id,
            )
        except asyncpg.UniqueViolationError:
            # Another call took one of the usernames between the check and the insert.
            raise Conflict(
                "another call created a subscriber with one of these usernames meanwhile: "
                "nothing was written, send the import again"
            ) from None
        await on_created(conn, ids, correlation_id)
        return ids
