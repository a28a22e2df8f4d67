"""Reads and changes of the network model: tenants, routers, packages, subscribers.

A change to a subscriber is intent a router must follow (DESIGN principle 4: the intent
and its job commit together). The network model sits below the domains and knows no
queue, so each function that changes a subscriber takes ``on_change``, a coroutine it
awaits on the same connection inside its transaction with ``(conn, subscriber_id,
correlation_id)``: the caller passes the sync domain's public
`imsys.sync.service.subscriber_changed`, which writes the outbox row. The argument is
required, so no caller can forget the sync, and a rollback takes the row with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from imsys.network.errors import Conflict, Invalid, NotFound
from imsys.network.models import (
    PackageIn,
    PackagePatch,
    RouterIn,
    RouterPatch,
    SubscriberIn,
    SubscriberPatch,
    TenantIn,
    TenantPatch,
)

if TYPE_CHECKING:
    from imsys.db import Conn, Executor

# Awaited inside the transaction that changed a subscriber: (conn, subscriber_id, correlation_id).
OnChange = Callable[["Conn", int, str], Awaitable[None]]
# Awaited inside the transaction that created, changed or deleted a package of a tenant:
# (conn, tenant_id, correlation_id); the sync domain's `package_changed`.
OnPackage = Callable[["Conn", int, str], Awaitable[None]]

SUBSCRIBER_COLUMNS = """
    s.id, s.tenant_id, s.router_id, s.package_id, s.username, s.service, s.is_suspended,
    s.expires_at, s.phone, s.email, s.deleted_at, s.desired_version, s.sync_status, s.sync_error,
    s.sync_attempt, s.next_sync_at, s.last_synced_at, s.online, s.address, s.uptime,
    s.last_seen_at, s.created_at, s.updated_at,
    s.suspension_reason
"""


# --- tenants, routers, packages -------------------------------------------------------------


async def create_tenant(db: asyncpg.Pool, data: TenantIn) -> dict[str, Any]:
    try:
        row = await db.fetchrow(
            """
            INSERT INTO tenants (name, time_zone, grace_period, max_disconnect_share, active)
            VALUES ($1, $2, make_interval(secs => $3), $4, $5)
            RETURNING id, name, time_zone, extract(epoch FROM grace_period)::int AS grace_period_s,
                      max_disconnect_share::float AS max_disconnect_share, active, created_at
            """,
            data.name,
            data.time_zone,
            data.grace_period_s,
            data.max_disconnect_share,
            data.active,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a tenant named {data.name!r} exists") from None
    assert row is not None
    return dict(row)


async def list_tenants(db: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """
        SELECT id, name, time_zone, extract(epoch FROM grace_period)::int AS grace_period_s,
               max_disconnect_share::float AS max_disconnect_share, active, created_at
        FROM tenants ORDER BY id
        """
    )
    return [dict(r) for r in rows]


async def _require(conn: Executor, table: str, id_: int, tenant_id: int | None = None) -> None:
    if tenant_id is None:
        found = await conn.fetchval(f"SELECT 1 FROM {table} WHERE id = $1", id_)
        what = f"{table[:-1]} {id_}"
    else:
        found = await conn.fetchval(
            f"SELECT 1 FROM {table} WHERE id = $1 AND tenant_id = $2", id_, tenant_id
        )
        what = f"{table[:-1]} {id_} of tenant {tenant_id}"
    if not found:
        raise Invalid(f"{what} does not exist")


ROUTER_COLUMNS = """
    id, tenant_id, name, host, port, use_tls, tls_fingerprint, tls_ca, tls_verify, username,
    max_concurrency, online, version, uptime,
    cpu_load, last_seen_at, last_error, guard_tripped_at, guard_reason, guard_override_until,
    guard_held,
    CASE WHEN maintenance_until > now() THEN maintenance_until END AS maintenance_until,
    created_at
"""


def _router(row: asyncpg.Record) -> dict[str, Any]:
    """A router row for the API: ``guard_held`` (jsonb, read as text) as data."""
    out = dict(row)
    out["guard_held"] = orjson.loads(out["guard_held"]) if out.get("guard_held") else {}
    return out


async def create_router(db: asyncpg.Pool, data: RouterIn) -> dict[str, Any]:
    await _require(db, "tenants", data.tenant_id)
    try:
        row = await db.fetchrow(
            f"""
            INSERT INTO routers (tenant_id, name, host, port, use_tls, username, password,
                                 max_concurrency, tls_fingerprint, tls_ca, tls_verify)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {ROUTER_COLUMNS}
            """,
            data.tenant_id,
            data.name,
            data.host,
            data.port,
            data.use_tls,
            data.username,
            data.password,
            data.max_concurrency,
            data.tls_fingerprint,
            data.tls_ca,
            data.tls_verify,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(
            f"tenant {data.tenant_id} already has a router named {data.name!r}"
        ) from None
    assert row is not None
    return _router(row)


async def list_routers(db: asyncpg.Pool, tenant_id: int | None = None) -> list[dict[str, Any]]:
    rows = await db.fetch(
        f"SELECT {ROUTER_COLUMNS} FROM routers "
        "WHERE $1::bigint IS NULL OR tenant_id = $1 ORDER BY id",
        tenant_id,
    )
    return [_router(r) for r in rows]


async def get_router(db: asyncpg.Pool, router_id: int) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {ROUTER_COLUMNS} FROM routers WHERE id = $1", router_id)
    if row is None:
        raise NotFound(f"router {router_id}")
    return _router(row)


async def confirm_guard(db: asyncpg.Pool, router_id: int, minutes: int) -> dict[str, Any]:
    """An operator lets the tripped mass-disconnect guard pass for a while: what it held
    goes ahead at the next sweep and reconciliation (the caller queues them)."""
    row = await db.fetchrow(
        f"""
        UPDATE routers SET guard_tripped_at = NULL, guard_reason = NULL, guard_held = '{{}}',
            guard_override_until = now() + make_interval(mins => $2)
        WHERE id = $1 RETURNING {ROUTER_COLUMNS}
        """,
        router_id,
        minutes,
    )
    if row is None:
        raise NotFound(f"router {router_id}")
    return _router(row)


async def guard_states(db: asyncpg.Pool) -> list[tuple[int, bool]]:
    """(router id, guard tripped) for every router: the ``imsys_router_guard_tripped`` gauge."""
    rows = await db.fetch(
        "SELECT id, guard_tripped_at IS NOT NULL AS tripped FROM routers ORDER BY id"
    )
    return [(r["id"], r["tripped"]) for r in rows]


TENANT_COLUMNS = """
    id, name, time_zone, extract(epoch FROM grace_period)::int AS grace_period_s,
    max_disconnect_share::float AS max_disconnect_share, active, created_at
"""


async def update_tenant(db: asyncpg.Pool, tenant_id: int, patch: TenantPatch) -> dict[str, Any]:
    """Change a tenant's name, time zone, grace period, guard share or whether it is
    active; a new share or grace applies from the next sweep and reconciliation, and an
    inactive tenant is left out of every timer from its next tick (imsys/tenants.py)."""
    changes = patch.model_dump(exclude_unset=True)
    nulls = [k for k, v in changes.items() if v is None]
    if not changes or nulls:
        raise Invalid("give at least one field to change, none of them null")
    exprs = {
        "name": "name = ${}",
        "time_zone": "time_zone = ${}",
        "grace_period_s": "grace_period = make_interval(secs => ${})",
        "max_disconnect_share": "max_disconnect_share = ${}",
        "active": "active = ${}",
    }
    sets = ", ".join(exprs[k].format(i) for i, k in enumerate(changes, start=2))
    try:
        row = await db.fetchrow(
            f"UPDATE tenants SET {sets} WHERE id = $1 RETURNING {TENANT_COLUMNS}",
            tenant_id,
            *changes.values(),
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a tenant named {changes.get('name')!r} exists") from None
    if row is None:
        raise NotFound(f"tenant {tenant_id}")
    return dict(row)


async def update_router(db: asyncpg.Pool, router_id: int, patch: RouterPatch) -> dict[str, Any]:
    """Change how imsys reaches a router (address, credentials, TLS, concurrency); the
    router pool reconnects with the new target at the next session."""
    changes = patch.model_dump(exclude_unset=True)
    nulls = [k for k, v in changes.items() if v is None and k not in NULLABLE_ROUTER_FIELDS]
    if not changes or nulls:
        raise Invalid(f"give at least one field to change; cannot be null: {', '.join(nulls)}")
    sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(changes, start=2))
    try:
        row = await db.fetchrow(
            f"UPDATE routers SET {sets} WHERE id = $1 RETURNING {ROUTER_COLUMNS}",
            router_id,
            *changes.values(),
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"the tenant already has a router named {changes.get('name')!r}") from None
    if row is None:
        raise NotFound(f"router {router_id}")
    return _router(row)


# Router fields a PATCH may set to null (the TLS settings, when the router has them).
NULLABLE_ROUTER_FIELDS = ("tls_fingerprint", "tls_ca")


async def delete_router(db: asyncpg.Pool, router_id: int) -> dict[str, Any]:
    """Forget a router that has no subscribers (deleted ones included: their history
    points at it); 409 while any remains."""
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {ROUTER_COLUMNS} FROM routers WHERE id = $1 FOR UPDATE", router_id
        )
        if row is None:
            raise NotFound(f"router {router_id}")
        live = await conn.fetchval(
            "SELECT count(*) FROM subscribers WHERE router_id = $1 AND deleted_at IS NULL",
            router_id,
        )
        if live:
            raise Conflict(f"router {router_id} still has {live} subscribers: move or delete them")
        gone = await conn.fetchval(
            "SELECT count(*) FROM subscribers WHERE router_id = $1", router_id
        )
        if gone:
            # Deleted subscribers keep their rows (audit, invoices) and their foreign key.
            raise Conflict(
                f"router {router_id} has {gone} deleted subscribers on record; it cannot be "
                "removed while they are kept"
            )
        await conn.execute("DELETE FROM routers WHERE id = $1", router_id)
    return _router(row)


async def _profile_rate_free(
    conn: Executor, tenant_id: int, profile: str, rate_limit: str | None, package_id: int | None
) -> None:
    """A profile carries one rate: refuse a second live package of the tenant that gives
    the same profile another rate (a package without a rate takes the profile's)."""
    if rate_limit is None:
        return
    other = await conn.fetchrow(
        """
        SELECT id, rate_limit FROM packages
        WHERE tenant_id = $1 AND profile = $2 AND deleted_at IS NULL
          AND id IS DISTINCT FROM $3 AND rate_limit IS NOT NULL AND rate_limit <> $4
        LIMIT 1
        """,
        tenant_id,
        profile,
        package_id,
        rate_limit,
    )
    if other is not None:
        raise Conflict(
            f"package {other['id']} uses profile {profile!r} with rate_limit "
            f"{other['rate_limit']!r}: one router profile has one rate"
        )


async def create_package(
    db: asyncpg.Pool,
    data: PackageIn,
    correlation_id: str = "package",
    *,
    on_package: OnPackage | None = None,
) -> dict[str, Any]:
    """Create a package; ``on_package`` (the sync domain's ``package_changed``) puts its
    profile on the tenant's routers, in the same transaction. Without it the profile still
    arrives with the first subscriber's sync and at the next reconciliation."""
    async with db.acquire() as conn, conn.transaction():
        await _require(conn, "tenants", data.tenant_id)
        await _profile_rate_free(conn, data.tenant_id, data.profile, data.rate_limit, None)
        try:
            row = await conn.fetchrow(
                """
                INSERT INTO packages (tenant_id, name, profile, rate_limit, price, period_days)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING *
                """,
                data.tenant_id,
                data.name,
                data.profile,
                data.rate_limit,
                data.price,
                data.period_days,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(
                f"tenant {data.tenant_id} already has a package named {data.name!r}"
            ) from None
        assert row is not None
        if on_package is not None:
            await on_package(conn, data.tenant_id, correlation_id)
        return dict(row)


async def list_packages(db: asyncpg.Pool, tenant_id: int | None = None) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT * FROM packages WHERE ($1::bigint IS NULL OR tenant_id = $1) "
        "AND deleted_at IS NULL ORDER BY id",
        tenant_id,
    )
    return [dict(r) for r in rows]


async def _require_package(conn: Executor, package_id: int, tenant_id: int) -> None:
    found = await conn.fetchval(
        "SELECT 1 FROM packages WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
        package_id,
        tenant_id,
    )
    if not found:
        raise Invalid(f"package {package_id} of tenant {tenant_id} does not exist")


async def _live_package(conn: Conn, package_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT * FROM packages WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", package_id
    )
    if row is None:
        raise NotFound(f"package {package_id}")
    return row


async def update_package(
    db: asyncpg.Pool,
    package_id: int,
    patch: PackagePatch,
    correlation_id: str,
    *,
    on_package: OnPackage,
    on_change: OnChange,
) -> dict[str, Any]:
    """Change a package. Its profile on every router of the tenant follows
    (``on_package``); with ``apply_now`` each live subscriber of the package is synced with
    a kick (``on_change``), so its session ends and the next login gets the new rate."""
    changes = patch.model_dump(exclude_unset=True, exclude={"apply_now"})
    nulls = [k for k in ("name", "price", "period_days") if k in changes and changes[k] is None]
    if nulls:
        raise Invalid(f"{', '.join(nulls)}: cannot be null (only rate_limit can)")
    if not changes and not patch.apply_now:
        raise Invalid("nothing to change: give at least one field, or apply_now")
    async with db.acquire() as conn, conn.transaction():
        current = await _live_package(conn, package_id)
        if "rate_limit" in changes:
            await _profile_rate_free(
                conn, current["tenant_id"], current["profile"], changes["rate_limit"], package_id
            )
        if changes:
            sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(changes, start=2))
            try:
                await conn.execute(
                    f"UPDATE packages SET {sets} WHERE id = $1", package_id, *changes.values()
                )
            except asyncpg.UniqueViolationError:
                taken = changes["name"]
                raise Conflict(
                    f"tenant {current['tenant_id']} already has a package named {taken!r}"
                ) from None
        if "rate_limit" in changes:
            await on_package(conn, current["tenant_id"], correlation_id)
        if patch.apply_now:
            kicked = await conn.fetch(
                """
                UPDATE subscribers SET kick_required = true,
                    desired_version = desired_version + 1, sync_status = 'pending',
                    updated_at = now(), pending_correlations = pending_correlations || ARRAY[$2]
                WHERE package_id = $1 AND deleted_at IS NULL
                RETURNING id
                """,
                package_id,
                correlation_id,
            )
            for r in kicked:
                await on_change(conn, r["id"], correlation_id)
        row = await conn.fetchrow("SELECT * FROM packages WHERE id = $1", package_id)
        assert row is not None
        return dict(row)


async def delete_package(
    db: asyncpg.Pool, package_id: int, correlation_id: str, *, on_package: OnPackage
) -> dict[str, Any]:
    """Delete a package no live subscriber uses; its profile leaves the tenant's routers
    (``on_package``) unless another package or a login there still uses it."""
    async with db.acquire() as conn, conn.transaction():
        current = await _live_package(conn, package_id)
        users = await conn.fetchval(
            "SELECT count(*) FROM subscribers WHERE package_id = $1 AND deleted_at IS NULL",
            package_id,
        )
        if users:
            raise Conflict(
                f"package {package_id} is used by {users} subscriber(s): move them to another "
                "package or delete them first"
            )
        row = await conn.fetchrow(
            "UPDATE packages SET deleted_at = now() WHERE id = $1 RETURNING *", package_id
        )
        assert row is not None
        await on_package(conn, current["tenant_id"], correlation_id)
        return dict(row)


# --- subscribers ----------------------------------------------------------------------------


async def get_subscriber(db: Executor, subscriber_id: int) -> dict[str, Any]:
    row = await db.fetchrow(
        f"SELECT {SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.id = $1", subscriber_id
    )
    if row is None:
        raise NotFound(f"subscriber {subscriber_id}")
    return dict(row)


# One statement does a create's checks, its insert and its answer: the router and the
# package must be the tenant's (the router's foreign key vouches for the tenant). No row
# back means a check failed; `_why_not_created` then names which, off the hot path.
_CREATE_SUBSCRIBER = f"""
    INSERT INTO subscribers AS s (tenant_id, router_id, package_id, username, password,
        service, is_suspended, expires_at, phone, email, pending_correlations,
        suspension_reason)
    SELECT $1::bigint, $2::bigint, $3::bigint, $4::text, $5::text, $6::text, $7::boolean,
        $8::timestamptz, $9::text, $10::text, ARRAY[$11::text],
        CASE WHEN $7::boolean THEN 'admin' END
    WHERE EXISTS (SELECT 1 FROM routers WHERE id = $2 AND tenant_id = $1)
      AND EXISTS (SELECT 1 FROM packages WHERE id = $3 AND tenant_id = $1
                  AND deleted_at IS NULL)
    RETURNING {SUBSCRIBER_COLUMNS}
"""


async def _why_not_created(conn: Conn, data: SubscriberIn) -> None:
    """Raise the `Invalid` that says which of the tenant, router or package is missing."""
    await _require(conn, "tenants", data.tenant_id)
    await _require(conn, "routers", data.router_id, data.tenant_id)
    await _require_package(conn, data.package_id, data.tenant_id)


async def create_subscriber(
    db: asyncpg.Pool, data: SubscriberIn, correlation_id: str, *, on_change: OnChange
) -> dict[str, Any]:
    """Create a subscriber and, through ``on_change``, its sync, in one transaction of
    four round trips (begin, the insert with its checks, the outbox row, commit)."""
    async with db.acquire() as conn, conn.transaction():
        for _ in range(2):
            try:
                row = await conn.fetchrow(
                    _CREATE_SUBSCRIBER,
                    data.tenant_id,
                    data.router_id,
                    data.package_id,
                    data.username,
                    data.password,
                    data.service,
                    data.is_suspended,
                    data.expires_at,
                    data.phone,
                    data.email,
                    correlation_id,
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(
                    f"router {data.router_id} already has a {data.service} subscriber "
                    f"{data.username!r}"
                ) from None
            if row is not None:
                break
            # A check failed: say which. Should all pass now, the router or package
            # arrived between the two statements; the insert is tried once more.
            await _why_not_created(conn, data)
        else:
            raise Invalid(f"router {data.router_id} or package {data.package_id} changed meanwhile")
        await on_change(conn, row["id"], correlation_id)
        return dict(row)


# Fields a subscriber cannot be without: a PATCH may null expires_at, phone, email only.
NOT_NULL_ON_PATCH = ("router_id", "package_id", "username", "password", "service", "is_suspended")


async def update_subscriber(
    db: asyncpg.Pool,
    subscriber_id: int,
    patch: SubscriberPatch,
    correlation_id: str,
    *,
    on_change: OnChange,
) -> dict[str, Any]:
    changes = patch.model_dump(exclude_unset=True)
    if not changes:
        raise Invalid("nothing to change: give at least one field")
    nulls = [k for k in NOT_NULL_ON_PATCH if k in changes and changes[k] is None]
    if nulls:
        raise Invalid(f"{', '.join(nulls)}: cannot be null (only expires_at, phone, email can)")
    if "is_suspended" in changes:
        # The API's suspension is an admin's: a payment does not lift it (only an admin).
        changes["suspension_reason"] = "admin" if changes["is_suspended"] else None
    async with db.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(
            "SELECT * FROM subscribers WHERE id = $1 FOR UPDATE", subscriber_id
        )
        if current is None or current["deleted_at"] is not None:
            raise NotFound(f"subscriber {subscriber_id}")
        if changes.get("router_id", current["router_id"]) != current["router_id"]:
            raise Invalid("moving a subscriber to another router: delete and create it instead")
        if "package_id" in changes:
            await _require_package(conn, changes["package_id"], current["tenant_id"])
        # A new package or a suspension only takes effect on a new session.
        kick = changes.get("package_id", current["package_id"]) != current["package_id"] or (
            changes.get("is_suspended") is True and not current["is_suspended"]
        )
        sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(changes, start=3))
        try:
            await conn.execute(
                f"""
                UPDATE subscribers SET {sets}, desired_version = desired_version + 1,
                    sync_status = 'pending', updated_at = now(),
                    kick_required = kick_required OR $2,
                    pending_correlations = pending_correlations || ARRAY[${len(changes) + 3}]
                WHERE id = $1
                """,
                subscriber_id,
                kick,
                *changes.values(),
                correlation_id,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict("another subscriber on that router has this username") from None
        await on_change(conn, subscriber_id, correlation_id)
        return await get_subscriber(conn, subscriber_id)


async def delete_subscriber(
    db: asyncpg.Pool, subscriber_id: int, correlation_id: str, *, on_change: OnChange
) -> dict[str, Any]:
    async with db.acquire() as conn, conn.transaction():
        status = await conn.execute(
            """
            UPDATE subscribers SET deleted_at = now(), desired_version = desired_version + 1,
                sync_status = 'pending', kick_required = true, updated_at = now(),
                pending_correlations = pending_correlations || ARRAY[$2]
            WHERE id = $1 AND deleted_at IS NULL
            """,
            subscriber_id,
            correlation_id,
        )
        if not status.endswith(" 1"):
            raise NotFound(f"subscriber {subscriber_id}")
        await on_change(conn, subscriber_id, correlation_id)
        return await get_subscriber(conn, subscriber_id)


async def search_subscribers(
    db: asyncpg.Pool,
    *,
    search: str | None,
    sync_status: str | None,
    router_id: int | None,
    limit: int,
    offset: int,
    tenant_id: int | None = None,
) -> dict[str, Any]:
    """Subscribers (not deleted) matching a username/phone/email fragment and filters.

    The fragment matches literally (``%``, ``_`` and ``\\`` are escaped), and the clause
    is only written when there is one: ``$1 IS NULL OR ...`` would keep a cached generic
    plan from using the trigram indexes (schema.sql) that serve it.
    """
    where = """
        s.deleted_at IS NULL
        AND ($2::text IS NULL OR s.sync_status = $2)
        AND ($3::bigint IS NULL OR s.router_id = $3)
        AND ($4::bigint IS NULL OR s.tenant_id = $4)
    """
    pattern = None
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        where += r"""
        AND (s.username ILIKE $1 ESCAPE '\' OR s.phone ILIKE $1 ESCAPE '\'
             OR s.email ILIKE $1 ESCAPE '\')
        """
    else:
        where += " AND $1::text IS NULL"
    rows = await db.fetch(
        f"SELECT {SUBSCRIBER_COLUMNS} FROM subscribers s WHERE {where} "
        "ORDER BY s.id LIMIT $5 OFFSET $6",
        pattern,
        sync_status,
        router_id,
        tenant_id,
        limit,
        offset,
    )
    total = await db.fetchval(
        f"SELECT count(*) FROM subscribers s WHERE {where}",
        pattern,
        sync_status,
        router_id,
        tenant_id,
    )
    return {"subscribers": [dict(r) for r in rows], "total": total}
