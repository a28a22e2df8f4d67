"""API tokens bound to one tenant (``api_tokens``): create, list, delete, resolve.

The admin token (``http.token``) sees every tenant; a tenant's token sees and changes
that tenant's data only (`imsys.http.access`). A token is 32 random bytes, URL-safe
base64 behind a recognisable prefix, shown once when it is made: only its SHA-256 is
stored, so a copy of the database gives no working token. A presented token is hashed
and looked up by its hash; the stored hash is then compared in constant time. The
lookup itself leaks nothing useful: it is keyed by a hash whose preimage an attacker
would have to know.

The admin API (``/api/tokens``) and the command line (``python -m imsys tokens``) both
come here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from imsys.network.errors import NotFound

if TYPE_CHECKING:
    from imsys.db import Executor

PREFIX: Final = "imsys_t_"
TOKEN_BYTES: Final = 32
# last_used_at is written at most this often per token: a read per request, not a write.
TOUCH_EVERY_S: Final = 60

LISTED: Final = "t.id, t.tenant_id, tn.name AS tenant_name, t.name, t.created_at, t.last_used_at"


class TokenIn(BaseModel):
    """``POST /api/tokens``: the tenant the token is bound to, and a name to know it by."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    tenant_id: int
    name: str = Field(min_length=1, max_length=100)


@dataclass(frozen=True, slots=True)
class TenantToken:
    """What a presented tenant token resolves to."""

    id: int
    tenant_id: int


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


async def create(db: Executor, data: TokenIn) -> dict[str, Any]:
    """A new token for ``data.tenant_id``: ``{"id", "tenant_id", "name", "token", ...}``.

    The answer is the only place the token ever appears.
    """
    token = new_secret()
    try:
        row = await db.fetchrow(
            """
            INSERT INTO api_tokens (tenant_id, name, token_sha256) VALUES ($1, $2, $3)
            RETURNING id, tenant_id, name, created_at
            """,
            data.tenant_id,
            data.name,
            digest(token),
        )
    except asyncpg.ForeignKeyViolationError:
        raise NotFound(f"tenant {data.tenant_id}") from None
    assert row is not None
    return {**dict(row), "token": token}


async def list_tokens(db: Executor, tenant_id: int | None = None) -> list[dict[str, Any]]:
    """Every token (of one tenant when given), never a secret nor its hash."""
    rows = await db.fetch(
        f"SELECT {LISTED} FROM api_tokens t JOIN tenants tn ON tn.id = t.tenant_id"
        " WHERE $1::bigint IS NULL OR t.tenant_id = $1 ORDER BY t.id",
        tenant_id,
    )
    return [dict(r) for r in rows]


async def delete(db: Executor, token_id: int) -> dict[str, Any]:
    """Revoke a token: the next request that presents it is refused (401)."""
    row = await db.fetchrow(
        "DELETE FROM api_tokens WHERE id = $1 RETURNING id, tenant_id, name, created_at",
        token_id,
    )
    if row is None:
        raise NotFound(f"token {token_id}")
    return dict(row)


async def resolve(db: Executor, token: str) -> TenantToken | None:
    """The tenant token ``token`` is, or None (unknown, revoked, or not one of ours)."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    wanted = digest(token)
    row = await db.fetchrow(
        """
        SELECT id, tenant_id, token_sha256,
               last_used_at IS NULL
               OR last_used_at < now() - make_interval(secs => $2) AS stale
        FROM api_tokens WHERE token_sha256 = $1
        """,
        wanted,
        float(TOUCH_EVERY_S),
    )
    if row is None or not hmac.compare_digest(bytes(row["token_sha256"]), wanted):
        return None
    if row["stale"]:
        await db.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = $1", row["id"])
    return TenantToken(id=row["id"], tenant_id=row["tenant_id"])
