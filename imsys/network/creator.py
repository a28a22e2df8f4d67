"""Single creates of subscribers that arrive together are written together (group commit).

Each ``POST /api/subscribers`` alone is a transaction of four round trips (begin, the
insert with its checks, the outbox row, commit), and on a small machine the round trips,
not the work, set the pace: sixteen clients wait on sixteen transactions. The creator
queues each create; a flush takes everything queued (up to ``max_batch``) and writes it
in one transaction: one ``INSERT ... SELECT FROM unnest`` that checks every row's router
and package (``ON CONFLICT DO NOTHING`` skips a username taken), one statement for their
outbox rows (``on_created``), commit. While a flush runs, the next creates queue for the
next one, so a batch is as large as the load makes it, and a lone create waits for
nothing.

Each create keeps its own outcome and its own guarantees: its row and its outbox row
commit together, with its correlation id. A row the batch did not write (a missing
router or package, a username taken, by another batch or the database) is then created
alone (`imsys.network.service.create_subscriber`), which writes it or raises the exact
error a lone create gets. A batch that fails for any other reason is retried the same
way, one create at a time, so one bad request cannot fail the others; only PostgreSQL
being away fails them all, each with that error.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import structlog

from imsys.db import is_unavailable
from imsys.network.models import SubscriberIn
from imsys.network.service import SUBSCRIBER_COLUMNS, OnChange, create_subscriber

if TYPE_CHECKING:
    from imsys.db import Conn

log = structlog.get_logger("imsys.network")

# Awaited inside a batch's transaction: (conn, [(subscriber id, correlation id), ...]);
# the sync domain's `subscribers_changed`, which writes one outbox row each.
OnCreated = Callable[["Conn", list[tuple[int, str]]], Awaitable[None]]

MAX_BATCH: Final = 200
# Flushes in flight at once: one fills while another commits.
FLUSHERS: Final = 2
_BIGINT: Final = range(-(2**63), 2**63)

_CREATE_MANY = f"""
    INSERT INTO subscribers AS s (tenant_id, router_id, package_id, username, password,
        service, is_suspended, expires_at, phone, email, pending_correlations,
        suspension_reason)
    SELECT u.tenant_id, u.router_id, u.package_id, u.username, u.password, u.service,
        u.is_suspended, u.expires_at, u.phone, u.email, ARRAY[u.correlation_id],
        CASE WHEN u.is_suspended THEN 'admin' END
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                $6::text[], $7::boolean[], $8::timestamptz[], $9::text[], $10::text[],
                $11::text[]) WITH ORDINALITY
        AS u(tenant_id, router_id, package_id, username, password, service, is_suspended,
             expires_at, phone, email, correlation_id, n)
    WHERE EXISTS (SELECT 1 FROM routers r WHERE r.id = u.router_id
                  AND r.tenant_id = u.tenant_id)
      AND EXISTS (SELECT 1 FROM packages p WHERE p.id = u.package_id
                  AND p.tenant_id = u.tenant_id AND p.deleted_at IS NULL)
    ORDER BY u.n
    ON CONFLICT DO NOTHING
    RETURNING {SUBSCRIBER_COLUMNS}
"""

Key = tuple[int, str, str]


@dataclass(frozen=True)
class _Create:
    data: SubscriberIn
    correlation_id: str
    answer: asyncio.Future[dict[str, Any]]

    @property
    def key(self) -> Key:
        """What the unique index says two live subscribers cannot share."""
        return (self.data.router_id, self.data.service, self.data.username)


class SubscriberCreator:
    """Create subscribers one request at a time, written in batches (see the module)."""

    def __init__(
        self,
        db: asyncpg.Pool,
        *,
        on_change: OnChange,
        on_created: OnCreated,
        max_batch: int = MAX_BATCH,
        flushers: int = FLUSHERS,
    ) -> None:
        self.db = db
        self.on_change = on_change
        self.on_created = on_created
        self.max_batch = max_batch
        self.flushers = flushers
        self._queue: deque[_Create] = deque()
        self._flushing: set[asyncio.Task[None]] = set()

    async def create(self, data: SubscriberIn, correlation_id: str) -> dict[str, Any]:
        """The new subscriber's row, as `create_subscriber` answers it, or its error."""
        if not all(i in _BIGINT for i in (data.tenant_id, data.router_id, data.package_id)):
            # PostgreSQL refuses the id (DataError, a 400): alone, so no batch carries it.
            return await self._alone(data, correlation_id)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Create(data, correlation_id, answer))
        if len(self._flushing) < self.flushers:
            task = asyncio.create_task(self._drain())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        # A request cancelled while queued is left out of the batch; once its batch is
        # written, cancelling it undoes nothing (as for a commit whose answer is lost).
        return await answer

    async def _alone(self, data: SubscriberIn, correlation_id: str) -> dict[str, Any]:
        return await create_subscriber(self.db, data, correlation_id, on_change=self.on_change)

    def _take(self) -> list[_Create]:
        """The next batch: queued creates still awaited, one per username and router (one
        statement must not write a key twice). A second create of a key goes to a later
        batch, which may run beside this one: as for two lone creates at once, one of
        them is written and the other gets the 409."""
        batch: list[_Create] = []
        keys: set[Key] = set()
        later: list[_Create] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if item.answer.done():
                continue
            if item.key in keys:
                later.append(item)
            else:
                keys.add(item.key)
                batch.append(item)
        self._queue.extendleft(reversed(later))
        return batch

    async def _drain(self) -> None:
        batch: list[_Create] = []
        try:
            while batch := self._take():
                await self._flush(batch)
        except asyncio.CancelledError:
            # Shutting down: no create waits for an answer that will not come.
            for item in [*batch, *self._queue]:
                item.answer.cancel()
            raise

    async def _flush(self, batch: list[_Create]) -> None:
        try:
            written = await self._write(batch)
        except Exception as exc:
            if is_unavailable(exc):
                for item in batch:
                    _settle(item, exc=exc)
                return
            # Not a refusal the batch expects: each create on its own, with its own outcome.
            log.warning("subscriber_batch_failed", size=len(batch), error=type(exc).__name__)
            written = {}
        for item in batch:
            row = written.get(id(item))
            if row is not None:
                _settle(item, row=row)
                continue
            try:
                _settle(item, row=await self._alone(item.data, item.correlation_id))
            except Exception as exc:
                _settle(item, exc=exc)

    async def _write(self, batch: list[_Create]) -> dict[int, dict[str, Any]]:
        """Insert the batch with its outbox rows; the rows written, by ``id`` of their create."""
        ds = [item.data for item in batch]
        async with self.db.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                _CREATE_MANY,
                [d.tenant_id for d in ds],
                [d.router_id for d in ds],
                [d.package_id for d in ds],
                [d.username for d in ds],
                [d.password for d in ds],
                [d.service for d in ds],
                [d.is_suspended for d in ds],
                [d.expires_at for d in ds],
                [d.phone for d in ds],
                [d.email for d in ds],
                [item.correlation_id for item in batch],
            )
            by_key = {(r["router_id"], r["service"], r["username"]): r for r in rows}
            written = {id(item): dict(by_key[item.key]) for item in batch if item.key in by_key}
            made = [(written[id(i)]["id"], i.correlation_id) for i in batch if id(i) in written]
            await self.on_created(conn, made)
        return written


def _settle(
    item: _Create, *, row: dict[str, Any] | None = None, exc: BaseException | None = None
) -> None:
    if item.answer.done():
        return  # its request was cancelled
    if exc is not None:
        item.answer.set_exception(exc)
    else:
        assert row is not None
        item.answer.set_result(row)
