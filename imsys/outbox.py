"""The transactional outbox: rows written with the change they announce, relayed to streams.

A change and its job commit together, so a crash between them cannot lose the job. The
relay wakes on NOTIFY (fast path) and polls as a fallback; several processes may relay
at once (``FOR UPDATE SKIP LOCKED``). Rows with the same ``job_id`` in one pass coalesce
into one job. A row whose job is already *running* waits a moment and is published
again, because the running job may have read the state before this change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from pydantic import BaseModel

from imsys.backoff import REDIS_DOWN, Backoff
from imsys.enqueue import enqueue_entries
from imsys.logging import redact_text
from imsys.streams.job import JobSpec
from imsys.streams.producer import Producer

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    from imsys.db import Conn


log = structlog.get_logger("imsys.outbox")

CHANNEL = "imsys_outbox"
BATCH = 2000
# Bulk rows are held while their stream holds this many entries (sync.bulk_backlog).
DEFAULT_BULK_BACKLOG = 2000
HELD_POLL_S = 0.1
RUNNING_RETRY = "1 second"


async def add(
    conn: Conn,
    spec: JobSpec[Any],
    payload: BaseModel | Mapping[str, Any],
    *,
    job_id: str | None = None,
) -> None:
    """Write one outbox row of ``spec``'s job on ``conn`` (inside the caller's transaction);
    the payload is validated first (InvalidJob)."""
    await conn.execute(
        "INSERT INTO outbox (stream, type, payload, job_id) VALUES ($1, $2, $3::jsonb, $4)",
        spec.stream,
        spec.name,
        spec.dump(payload),
        job_id,
    )


async def add_many(
    conn: Conn,
    spec: JobSpec[Any],
    rows: list[tuple[BaseModel | Mapping[str, Any], str | None]],
    *,
    bulk: bool = False,
) -> None:
    """Many outbox rows of ``spec``'s job in one statement (a sweep suspending hundreds).

    ``bulk``: timer-driven work (reconciliation, sweeps). Its rows wait here while the
    stream already holds ``bulk_backlog`` entries, so a change made through the API or by
    a payment never queues behind thousands of them (it is relayed at once)."""
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO outbox (stream, type, payload, job_id, bulk)
        SELECT $1, $2, p::jsonb, j, $5 FROM unnest($3::text[], $4::text[]) AS u(p, j)
        """,
        spec.stream,
        spec.name,
        [spec.dump(p) for p, _ in rows],
        [j for _, j in rows],
        bulk,
    )


class OutboxRelay:
    def __init__(
        self,
        db: asyncpg.Pool,
        producer: Producer,
        *,
        poll_s: float = 1.0,
        bulk_backlog: int = DEFAULT_BULK_BACKLOG,
    ) -> None:
        self.db = db
        self.producer = producer
        self.poll_s = poll_s
        self.bulk_backlog = bulk_backlog
        # Bulk rows waited for room in their stream at the last pass: look again soon.
        self.held = False
        self._wake = asyncio.Event()

    async def _due(self, conn: Conn) -> list[asyncpg.Record]:
        """The rows to publish now: every due change first, then bulk rows of each stream
        while that stream holds fewer than ``bulk_backlog`` entries (acknowledged entries
        are deleted, so its length is what waits or runs)."""
        rows = list(
            await conn.fetch(
                """
                SELECT id, stream, type, payload::text AS payload, job_id FROM outbox
                WHERE available_at <= now() AND NOT bulk
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                """,
                BATCH,
            )
        )
        streams = await conn.fetch(
            "SELECT DISTINCT stream FROM outbox WHERE bulk AND available_at <= now()"
        )
        self.held = False
        for s in streams:
            room = min(
                self.bulk_backlog - await self.producer.redis.xlen(
                    self.producer.keys.stream(s["stream"])
                ),
                BATCH - len(rows),
            )
            if room <= 0:
                self.held = True
                continue
            rows += await conn.fetch(
                """
                SELECT id, stream, type, payload::text AS payload, job_id FROM outbox
                WHERE available_at <= now() AND bulk AND stream = $2
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                """,
                room,
                s["stream"],
            )
        return rows

    async def relay_once(self) -> int:
        """Publish what is due; returns the number of rows settled."""
        async with self.db.acquire() as conn, conn.transaction():
            rows = await self._due(conn)
            if not rows:
                return 0
            done: list[int] = []
            later: list[int] = []
            # Rows without a job_id (a billing run's thousands of messages) go out in bulk.
            bulk: dict[tuple[str, str], list[asyncpg.Record]] = {}
            # Rows with a job_id: the first of each (stream, job_id) is published, the rest
            # of this pass coalesce with it; pipelined per (stream, type).
            unique: dict[tuple[str, str], list[asyncpg.Record]] = {}
            for row in rows:
                jid = row["job_id"]
                if jid is None:
                    bulk.setdefault((row["stream"], row["type"]), []).append(row)
                else:
                    unique.setdefault((row["stream"], jid), []).append(row)
            by_type: dict[tuple[str, str], list[list[asyncpg.Record]]] = {}
            for same in unique.values():
                by_type.setdefault((same[0]["stream"], same[0]["type"]), []).append(same)
            for (stream, type_), groups in by_type.items():
                jobs = [(g[0]["payload"], g[0]["job_id"]) for g in groups]
                results = await enqueue_entries(self.producer, stream, type_, jobs)
                for same, result in zip(groups, results, strict=True):
                    (later if result.running else done).extend(r["id"] for r in same)
            for (stream, type_), group in bulk.items():
                await self.producer.enqueue_many(stream, type_, (r["payload"] for r in group))
                done += [r["id"] for r in group]
            if done:
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", done)
            if later:
                await conn.execute(
                    f"UPDATE outbox SET available_at = now() + interval '{RUNNING_RETRY}' "
                    "WHERE id = ANY($1::bigint[])",
                    later,
                )
            return len(done)

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until ``stopping``: on NOTIFY at once, else every ``poll_s``."""
        # A short cap: once PostgreSQL is back, pending syncs move within seconds.
        backoff = Backoff(first=0.2, cap=3)
        listener: PoolConnectionProxy | None = None
        try:
            while not stopping.is_set():
                try:
                    if listener is None or listener.is_closed():
                        listener = await self.db.acquire()
                        await listener.add_listener(CHANNEL, self._notified)
                    while await self.relay_once() >= BATCH:
                        pass
                    backoff.reset()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, *REDIS_DOWN) as exc:
                    log.warning("outbox_relay_failed", error=redact_text(str(exc)))
                    if listener is not None:
                        await self._release(listener)
                        listener = None
                    await backoff.sleep()
                    continue
                self._wake.clear()
                # Held bulk rows go as soon as their stream drains, not a poll later.
                within = min(self.poll_s, HELD_POLL_S) if self.held else self.poll_s
                await _first(self._wake, stopping, within=within)
        finally:
            if listener is not None:
                await asyncio.shield(self._release(listener))

    async def _release(self, conn: PoolConnectionProxy) -> None:
        # The pool does not reset sessions (imsys.db): UNLISTEN here, or close the
        # connection, so no pooled connection keeps listening.
        try:
            await conn.remove_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()
        try:
            await self.db.release(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass


async def _first(a: asyncio.Event, b: asyncio.Event, *, within: float) -> None:
    """Wait until either event is set, or ``within`` seconds pass."""
    waits = [asyncio.create_task(a.wait()), asyncio.create_task(b.wait())]
    try:
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
