"""Re-publication of intents: PostgreSQL is the truth, Redis a cache of work.

Every job imsys runs stands for an intent recorded in PostgreSQL: a subscriber not yet
synced, a payment not yet applied, a message not yet sent, a period not yet billed, a
Bouncer batch whose results are not yet stored. When Redis loses its data (a restart
without persistence, a failover to a replica that had not caught up) those jobs are gone
while their intents remain; so are the jobs the outbox relay had already moved. This
module puts them back, each with the ``job_id`` its domain uses, so a job still waiting
or running is never doubled:

- at once, for one stream, whenever that stream's consumer group had to be created
  (``Engine.on_group_created``);
- periodically (``[recovery] sweep_every_s``), for intents older than ``intent_age_s``.
  An intent the sweep had to re-publish (its job was lost, or dead-lettered) is not
  re-published by the sweep again for ``republish_cooldown_s``: a job that keeps failing
  stays visible in the dead letters instead of being retried every minute.

The events stream holds no intents of PostgreSQL (one-time passwords live only in their
jobs): the backend asks again for a code that never came.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import structlog

from imsys.backoff import REDIS_DOWN, Backoff
from imsys.billing.domain import due_billing_runs
from imsys.billing.handlers import GENERATE_BILLS, generate_bills_job_id
from imsys.billing.notify import SEND_NOTIFICATION, notification_job_id
from imsys.billing.payments import PAYMENT_RECEIVED, payment_job_id
from imsys.bouncer.results import DOWNLOAD_RESULTS, download_job_id
from imsys.deps import Deps
from imsys.enqueue import enqueue_unique_many
from imsys.logging import redact_text
from imsys.streams.job import JobSpec
from imsys.sync.jobs import SYNC_SUBSCRIBER, sync_job_id

log = structlog.get_logger("imsys.intents")

# Rows per query: every query is a bounded walk of a partial index, in id order.
BATCH: Final = 1000
# Tries of a re-publication after a group was created, while PostgreSQL or Redis is away.
HOOK_TRIES: Final = 6

# A job to put back: its payload and its job_id.
Item = tuple[Mapping[str, Any], str]
# A source of one job type: yields batches of items for intents recorded before ``cutoff``.
Source = Callable[[asyncpg.Pool, datetime], AsyncIterator[list[Item]]]

# Keyset-paged queries; each reads only the rows of its partial index (schema.sql).
UNSYNCED_SUBSCRIBERS: Final = """
SELECT id FROM subscribers
WHERE (sync_status <> 'synced' OR desired_version > synced_version)
  AND blocked_version IS DISTINCT FROM desired_version  -- a state, not lost work
  AND updated_at <= $1 AND id > $2
ORDER BY id LIMIT $3
"""
UNAPPLIED_PAYMENTS: Final = """
SELECT id FROM payments
WHERE applied_at IS NULL AND created_at <= $1 AND id > $2
ORDER BY id LIMIT $3
"""
QUEUED_NOTIFICATIONS: Final = """
SELECT id FROM notifications
WHERE status = 'queued' AND created_at <= $1 AND id > $2
ORDER BY id LIMIT $3
"""
COMPLETED_BOUNCER_BATCHES: Final = """
SELECT id, bouncer_batch_id FROM bouncer_batches
WHERE status = 'completed' AND bouncer_batch_id IS NOT NULL AND download_attempts < $4
  AND updated_at <= $1 AND id > $2
ORDER BY id LIMIT $3
"""


async def _pages(
    db: asyncpg.Pool, sql: str, cutoff: datetime, *extra: Any
) -> AsyncIterator[list[asyncpg.Record]]:
    last = 0
    while True:
        rows = await db.fetch(sql, cutoff, last, BATCH, *extra)
        if rows:
            yield rows
        if len(rows) < BATCH:
            return
        last = rows[-1]["id"]


async def _subscribers(db: asyncpg.Pool, cutoff: datetime) -> AsyncIterator[list[Item]]:
    # Deleted subscribers too: until a sync removes them, their entries stay on the router.
    async for rows in _pages(db, UNSYNCED_SUBSCRIBERS, cutoff):
        yield [
            ({"subscriber_id": r["id"], "cause": "republish"}, sync_job_id(r["id"])) for r in rows
        ]


async def _payments(db: asyncpg.Pool, cutoff: datetime) -> AsyncIterator[list[Item]]:
    async for rows in _pages(db, UNAPPLIED_PAYMENTS, cutoff):
        yield [({"payment_id": r["id"]}, payment_job_id(r["id"])) for r in rows]


async def _notifications(db: asyncpg.Pool, cutoff: datetime) -> AsyncIterator[list[Item]]:
    async for rows in _pages(db, QUEUED_NOTIFICATIONS, cutoff):
        yield [({"notification_id": r["id"]}, notification_job_id(r["id"])) for r in rows]


async def _billing_runs(db: asyncpg.Pool, cutoff: datetime) -> AsyncIterator[list[Item]]:
    due = await due_billing_runs(db, opened_before=cutoff)
    if due:
        yield [({"tenant_id": t, "period": p}, generate_bills_job_id(t, p)) for t, p in due]


def _downloads(max_attempts: int) -> Source:
    async def source(db: asyncpg.Pool, cutoff: datetime) -> AsyncIterator[list[Item]]:
        # The status checker re-queues these too, but only while an API key is set and
        # only every status_every_s; its job_id is Bouncer's batch id.
        async for rows in _pages(db, COMPLETED_BOUNCER_BATCHES, cutoff, max_attempts):
            ids = [r["bouncer_batch_id"] for r in rows]
            yield [({"bouncer_batch_id": b}, download_job_id(b)) for b in ids]

    return source


@dataclass(slots=True)
class Outcome:
    """What one re-publication did, per job type."""

    stream: str
    enqueued: Counter[str]
    # Still waiting or running: left alone.
    duplicates: Counter[str]
    # Re-published by a sweep within the cooldown: left alone.
    cooling: Counter[str]

    @property
    def total(self) -> int:
        return sum(self.enqueued.values())


class Republisher:
    """Puts back the jobs of intents recorded in PostgreSQL, per stream."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.cfg = deps.settings.recovery
        self.producer = deps.engine.producer
        self.keys = deps.engine.keys
        downloads = _downloads(deps.settings.bouncer_batching.max_download_attempts)
        # The events stream holds no intents of PostgreSQL (see above).
        sources: list[tuple[JobSpec[Any], Source]] = [
            (SYNC_SUBSCRIBER, _subscribers),
            (PAYMENT_RECEIVED, _payments),
            (SEND_NOTIFICATION, _notifications),
            (GENERATE_BILLS, _billing_runs),
            (DOWNLOAD_RESULTS, downloads),
        ]
        self.sources: dict[str, list[tuple[JobSpec[Any], Source]]] = {}
        for spec, source in sources:
            self.sources.setdefault(spec.stream, []).append((spec, source))

    async def republish(self, stream: str, *, older_than_s: float | None = None) -> Outcome:
        """Enqueue every intent of ``stream`` whose job may be gone.

        ``older_than_s=None`` (Redis lost the stream): every intent, now. Otherwise (the
        sweep): intents at least that old, skipping those re-published within the cooldown.
        """
        sweep = older_than_s is not None
        now = datetime.now(UTC)
        cutoff = now + timedelta(days=1) if older_than_s is None else now - timedelta(
            seconds=older_than_s
        )
        outcome = Outcome(stream, Counter(), Counter(), Counter())
        started = time.perf_counter()
        for spec, source in self.sources.get(stream, []):
            type_ = spec.name
            async for items in source(self.deps.db, cutoff):
                if sweep and self.cfg.republish_cooldown_s > 0:
                    items = await self._not_cooling(stream, type_, items, outcome)
                if not items:
                    continue
                results = await enqueue_unique_many(self.producer, spec, items)
                fresh = [job_id for (_, job_id), r in zip(items, results, strict=True)
                         if not r.duplicate]
                if fresh:
                    outcome.enqueued[type_] += len(fresh)
                if len(items) > len(fresh):
                    outcome.duplicates[type_] += len(items) - len(fresh)
                if sweep and fresh and self.cfg.republish_cooldown_s > 0:
                    await self._cool(stream, fresh)
        fields = {
            "stream": stream,
            "reason": "sweep" if sweep else "group_created",
            "enqueued": dict(outcome.enqueued),
            "still_queued": sum(outcome.duplicates.values()),
            "cooling": sum(outcome.cooling.values()),
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if outcome.total:
            # Work that had no job: lost with Redis, or dead-lettered (sweep).
            log.warning("intents_republished", **fields)
        else:
            log.debug("intents_checked", **fields)
        return outcome

    async def _not_cooling(
        self, stream: str, type_: str, items: list[Item], outcome: Outcome
    ) -> list[Item]:
        async with self.deps.redis.pipeline(transaction=False) as pipe:
            for _, job_id in items:
                pipe.exists(self.keys.republished(stream, job_id))
            marked = await pipe.execute()
        keep = [item for item, m in zip(items, marked, strict=True) if not m]
        if len(keep) < len(items):
            outcome.cooling[type_] += len(items) - len(keep)
        return keep

    async def _cool(self, stream: str, job_ids: list[str]) -> None:
        ttl_ms = max(int(self.cfg.republish_cooldown_s * 1000), 1)
        async with self.deps.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.set(self.keys.republished(stream, job_id), "1", px=ttl_ms)
            await pipe.execute()

    async def sweep(self) -> list[Outcome]:
        """Every stream's intents older than ``intent_age_s`` that have no job."""
        return [
            await self.republish(stream, older_than_s=self.cfg.intent_age_s)
            for stream in self.deps.engine.consumers
        ]

    async def on_group_created(self, stream: str) -> None:
        """Redis lost ``stream`` (or never had it): put back all of its intents now.

        Retried while PostgreSQL or Redis is away; the sweep is the net beyond that.
        """
        backoff = Backoff(first=1, cap=15)
        for attempt in range(1, HOOK_TRIES + 1):
            try:
                await self.republish(stream)
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, *REDIS_DOWN) as exc:
                log.warning(
                    "intents_republish_failed",
                    stream=stream,
                    attempt=attempt,
                    error=redact_text(str(exc)),
                )
                if attempt < HOOK_TRIES:
                    await backoff.sleep()


def register(deps: Deps) -> Republisher | None:
    """Wire re-publication into the engine: on a created group, and as a periodic sweep."""
    cfg = deps.settings.recovery
    if not cfg.enabled:
        return None
    republisher = Republisher(deps)
    deps.engine.on_group_created(republisher.on_group_created)

    async def sweep(_slot: int) -> None:
        await republisher.sweep()

    deps.engine.add_timer("intents_sweep", sweep, every=cfg.sweep_every_s)
    return republisher

