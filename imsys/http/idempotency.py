"""``Idempotency-Key`` on the admin API's creating POSTs.

A client that lost the answer to a POST (a dropped connection, a timeout) sends it
again with the same key and gets the first answer back, marked ``Idempotent-Replayed:
true``, instead of a second object or a 409 it cannot act on. The first answer is kept
in PostgreSQL (``idempotency_keys``) for 24 h, per key, method and path, with the
SHA-256 of the request body: the same key with another body is a 422, and a retry
that arrives while the first request still runs is a 409. A 5xx answer is not kept, so
the client may simply retry.

The claim is a row written before the handler runs; a process that dies holding one
leaves it locked for ``LEASE_S`` at most, then a retry takes it over. Claims and answers
of concurrent requests share their statements (`imsys.db.Coalesced`), so a key costs a
busy API two round trips per batch, not two per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import asyncpg
import structlog
from aiohttp import web

from imsys.db import Coalesced
from imsys.http.access import SCOPE
from imsys.http.json import ApiError

log = structlog.get_logger("imsys.http")

HEADER: Final = "Idempotency-Key"
REPLAYED: Final = "Idempotent-Replayed"
TTL_S: Final = 24 * 3600
# Longer than any creating request should take: the claim of a dead process expires.
LEASE_S: Final = 120
PURGE_EVERY_S: Final = 600
MAX_KEY_LENGTH: Final = 255
_MARK: Final = "_imsys_creating"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


def creating(handler: H) -> H:
    """Mark a POST handler as one that creates something: it honours Idempotency-Key."""
    setattr(handler, _MARK, True)
    return handler


def is_creating(handler: object) -> bool:
    return getattr(handler, _MARK, False) is True


@dataclass(frozen=True)
class Scope:
    key: str
    method: str
    path: str


@dataclass(frozen=True)
class Stored:
    """The first answer, to replay."""

    status: int
    body: bytes


class IdempotencyStore:
    """The ``idempotency_keys`` table: claim a key, record or release its answer."""

    def __init__(self, db: asyncpg.Pool) -> None:
        self.db = db
        self._last_purge = -PURGE_EVERY_S * 2.0
        # Concurrent requests claim and record in shared statements (imsys.db.Coalesced):
        # two round trips per batch instead of two per request.
        self._claims = Coalesced(self._claim_many, key=lambda c: c[0])
        self._answers = Coalesced(self._complete_many)

    async def claim(self, scope: Scope, digest: bytes) -> uuid.UUID | Stored:
        """Our claim on ``scope`` (run the request), or the stored answer to replay.

        Raises a 422 when the key came with another body, a 409 while it is in progress.
        """
        await self._maybe_purge()
        claim = uuid.uuid4()
        # A row that expired, or whose claimant died before answering, is taken over.
        for _ in range(3):
            won = await self._claims((scope, digest, claim))
            if won:
                return claim
            row = await self.db.fetchrow(
                """
                SELECT request_sha256, status, response FROM idempotency_keys
                WHERE key = $1 AND method = $2 AND path = $3 AND expires_at > now()
                """,
                scope.key,
                scope.method,
                scope.path,
            )
            if row is None:
                continue  # released (a 5xx) or expired in between: claim it again
            if row["request_sha256"] != digest:
                raise ApiError(
                    422,
                    f"this {HEADER} was already used with a different request body; "
                    "use a new key for a new request",
                )
            if row["status"] is None:
                raise ApiError(
                    409,
                    f"a request with this {HEADER} is still in progress; retry shortly "
                    "to get its answer",
                    headers={"Retry-After": "1"},
                )
            return Stored(status=row["status"], body=bytes(row["response"]))
        raise ApiError(409, f"this {HEADER} is contended; retry shortly")

    async def complete(self, scope: Scope, claim: uuid.UUID, status: int, body: bytes) -> None:
        await self._answers((scope, claim, status, body))

    async def _claim_many(self, claims: list[tuple[Scope, bytes, uuid.UUID]]) -> list[bool]:
        """Insert or take over each scope's row for its claim (a row that expired, or whose
        claimant died before answering); which claims won. Scopes differ within a call."""
        won = await self.db.fetch(
            """
            INSERT INTO idempotency_keys AS k
                (key, method, path, request_sha256, claim, locked_until, expires_at)
            SELECT u.key, u.method, u.path, u.sha, u.claim,
                   now() + make_interval(secs => $6), now() + make_interval(secs => $7)
            FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::uuid[])
                AS u(key, method, path, sha, claim)
            ON CONFLICT (key, method, path) DO UPDATE
                SET request_sha256 = EXCLUDED.request_sha256, claim = EXCLUDED.claim,
                    status = NULL, response = NULL, created_at = now(),
                    locked_until = EXCLUDED.locked_until, expires_at = EXCLUDED.expires_at
                WHERE k.expires_at <= now()
                   OR (k.status IS NULL AND k.locked_until <= now()
                       AND k.request_sha256 = EXCLUDED.request_sha256)
            RETURNING claim
            """,
            [s.key for s, _, _ in claims],
            [s.method for s, _, _ in claims],
            [s.path for s, _, _ in claims],
            [d for _, d, _ in claims],
            [c for _, _, c in claims],
            float(LEASE_S),
            float(TTL_S),
        )
        ours = {r["claim"] for r in won}
        return [c in ours for _, _, c in claims]

    async def _complete_many(
        self, answers: list[tuple[Scope, uuid.UUID, int, bytes]]
    ) -> list[None]:
        """Record each claim's answer (a claim taken over meanwhile records nothing)."""
        await self.db.execute(
            """
            UPDATE idempotency_keys AS k SET status = u.status, response = u.response
            FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::int[], $6::bytea[])
                AS u(key, method, path, claim, status, response)
            WHERE k.key = u.key AND k.method = u.method AND k.path = u.path
              AND k.claim = u.claim
            """,
            [s.key for s, _, _, _ in answers],
            [s.method for s, _, _, _ in answers],
            [s.path for s, _, _, _ in answers],
            [c for _, c, _, _ in answers],
            [st for _, _, st, _ in answers],
            [b for _, _, _, b in answers],
        )
        return [None] * len(answers)

    async def release(self, scope: Scope, claim: uuid.UUID) -> None:
        await self.db.execute(
            "DELETE FROM idempotency_keys WHERE key = $1 AND method = $2 AND path = $3 "
            "AND claim = $4",
            scope.key,
            scope.method,
            scope.path,
            claim,
        )

    async def purge(self) -> int:
        """Delete expired keys; how many."""
        done = await self.db.execute("DELETE FROM idempotency_keys WHERE expires_at <= now()")
        return int(done.rsplit(" ", 1)[-1])

    async def _maybe_purge(self) -> None:
        # Expired rows are ignored anyway; deleting them now and then keeps the table small.
        now = time.monotonic()
        if now - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = now
        purged = await self.purge()
        if purged:
            log.info("idempotency_keys_purged", count=purged)


IDEMPOTENCY = web.AppKey("idempotency", IdempotencyStore)


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()


@web.middleware
async def idempotency(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Replay the first answer to a creating POST sent again with the same key."""
    key = request.headers.get(HEADER)
    if key is None or request.method != "POST" or not is_creating(request.match_info.handler):
        return await handler(request)
    if not _valid_key(key):
        raise ApiError(400, f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    # Read within the body limit; the handler then gets the same bytes from the cache.
    digest = hashlib.sha256(await request.read()).digest()
    store = request.app[IDEMPOTENCY]
    # A tenant's token keeps its keys apart from the admin's and other tenants': a key
    # never replays an answer meant for another caller (no key holds a control byte).
    principal = request.get(SCOPE)
    if principal is not None and not principal.admin:
        key = f"tenant {principal.tenant_id}\x1f{key}"
    scope = Scope(key, request.method, request.path)
    claimed = await store.claim(scope, digest)
    if isinstance(claimed, Stored):
        return web.Response(
            body=claimed.body,
            status=claimed.status,
            content_type="application/json",
            headers={REPLAYED: "true"},
        )
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        await _settle(store, scope, claimed, exc)
        raise
    except BaseException:
        await asyncio.shield(_release(store, scope, claimed))
        raise
    await _settle(store, scope, claimed, response)
    return response


async def _settle(
    store: IdempotencyStore, scope: Scope, claim: uuid.UUID, answer: web.StreamResponse
) -> None:
    """Keep a JSON answer below 500; release the key otherwise (the client may retry)."""
    body = answer.body if isinstance(answer, web.Response) else None
    if (
        answer.status >= 500
        or not isinstance(body, bytes)
        or answer.content_type != ("application/json")
    ):
        await asyncio.shield(_release(store, scope, claim))
        return
    try:
        await asyncio.shield(store.complete(scope, claim, answer.status, body))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The work is done and the client gets its answer; a retry after the lease
        # runs the request again (the domain's unique keys then answer it).
        log.warning("idempotency_not_recorded", path=scope.path, error=type(exc).__name__)


async def _release(store: IdempotencyStore, scope: Scope, claim: uuid.UUID) -> None:
    try:
        await store.release(scope, claim)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("idempotency_not_released", path=scope.path, error=type(exc).__name__)
