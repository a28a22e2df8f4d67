"""PostgreSQL: the pool, and ``migrate`` (apply schema.sql, idempotently)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from imsys.backoff import Backoff
from imsys.errors import ImsysError, PermanentError, Unavailable
from imsys.logging import redact_text

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection as a pool lends it, or a plain one; and anything that runs a query.
    Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
    Executor: TypeAlias = Conn | asyncpg.Pool

log = structlog.get_logger("imsys.db")

# A symlink to the top-level schema.sql, so the wheel carries it (migrate in a container).
SCHEMA = Path(__file__).parent / "schema.sql"
# Serialises concurrent ``migrate`` runs (several processes starting at once).
MIGRATE_LOCK = 0x1A5F5


# What "PostgreSQL is away" looks like from asyncpg: the server shutting down or starting
# up, a connection that broke, too many connections, or no server at all.
_DB_DOWN = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    ConnectionRefusedError,
    ConnectionResetError,
    BrokenPipeError,
)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says PostgreSQL does not answer (not that a query is wrong)."""
    if isinstance(exc, _DB_DOWN):
        return True
    # A pool whose connection died mid-query, or that is closing under a restart.
    return isinstance(exc, asyncpg.InterfaceError) and (
        "connection is closed" in str(exc) or "pool is closing" in str(exc)
    )


def translate_error(exc: BaseException) -> ImsysError | None:
    """asyncpg's exceptions as the engine classifies them (the adapter boundary).

    PostgreSQL away is not the job's fault: the job waits without spending an attempt.
    A value PostgreSQL refuses (an id beyond 64 bits, a malformed number) will be
    refused on every retry: permanent.
    """
    if is_unavailable(exc):
        return Unavailable(f"PostgreSQL unavailable: {redact_text(str(exc))}", delay=1.0)
    if isinstance(exc, asyncpg.DataError):
        return PermanentError(f"invalid value: {redact_text(str(exc))}")
    return None


Item = TypeVar("Item")
Out = TypeVar("Out")


class Coalesced(Generic[Item, Out]):
    """Calls that arrive while others run are run together: ``run(items)`` does them in
    one statement and answers each, in order.

    On a small machine the round trips of many one-row statements, not their work, set
    the pace of a busy API; this turns sixteen concurrent ones into one or two. A call
    waits for nothing when alone: it runs at once, and the calls that arrive meanwhile
    queue for the next run (at most ``most`` per run, ``runners`` runs at a time). Items
    with the same ``key`` never share a run (one statement must not touch a row twice).
    An exception from ``run`` is every item's of that run; a call cancelled while queued
    is left out.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[Out]]],
        *,
        key: Callable[[Item], Hashable] | None = None,
        most: int = 200,
        runners: int = 2,
    ) -> None:
        self._run = run
        self._key = key
        self._most = most
        self._runners = runners
        self._queue: deque[tuple[Item, asyncio.Future[Out]]] = deque()
        self._running: set[asyncio.Task[None]] = set()

    async def __call__(self, item: Item) -> Out:
        answer: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queue.append((item, answer))
        if len(self._running) < self._runners:
            task = asyncio.create_task(self._drain())
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await answer

    def _take(self) -> list[tuple[Item, asyncio.Future[Out]]]:
        batch: list[tuple[Item, asyncio.Future[Out]]] = []
        keys: set[Hashable] = set()
        later: list[tuple[Item, asyncio.Future[Out]]] = []
        while self._queue and len(batch) < self._most:
            entry = self._queue.popleft()
            if entry[1].done():
                continue
            if self._key is not None:
                k = self._key(entry[0])
                if k in keys:
                    later.append(entry)
                    continue
                keys.add(k)
            batch.append(entry)
        self._queue.extendleft(reversed(later))
        return batch

    async def _drain(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Out]]] = []
        try:
            while batch := self._take():
                try:
                    outcomes = await self._run([item for item, _ in batch])
                except Exception as exc:
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                for (_, answer), outcome in zip(batch, outcomes, strict=True):
                    if not answer.done():
                        answer.set_result(outcome)
        except asyncio.CancelledError:
            for _, answer in [*batch, *self._queue]:
                answer.cancel()
            raise


def schema_path() -> Path:
    return SCHEMA


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to send to the server.

    asyncpg's default reset sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release, one more round trip for each use of the pool (a
    quarter of an API create's). imsys leaves no session state behind on a pooled
    connection: its advisory locks and settings are transaction-scoped
    (``pg_advisory_xact_lock``, ``SET LOCAL``), cursors live inside transactions, and
    the outbox relay, the one listener, unlistens before it gives its connection back.
    asyncpg still rolls back a transaction left open and drops the Python-side
    listeners before this runs.
    """


async def connect_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool, waiting (with backoff) for PostgreSQL to answer."""
    backoff = Backoff(first=0.2, cap=5)
    while True:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=60,
                reset=_keep_session,
            )
            assert pool is not None
            return pool
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if backoff.failures >= 30:
                raise
            log.warning("postgres_unavailable", error=redact_text(str(exc)))
            await backoff.sleep()


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it does not exist; True when created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        return False
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin_url)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
        except asyncpg.DuplicateDatabaseError:
            return False
        log.info("database_created", database=name)
        return True
    finally:
        await conn.close()


async def migrate(url: str) -> None:
    """Apply schema.sql; every statement in it is idempotent."""
    await ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            await conn.execute(schema_path().read_text())
    finally:
        await conn.close()
    log.info("schema_applied", schema=str(schema_path().name))
