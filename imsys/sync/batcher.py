"""Per-router batches of ``sync_subscriber`` jobs.

Each job is still delivered, deduplicated, retried and dead-lettered on its own: its
handler hands the job to the batcher and waits for the job's own outcome. The batcher
gathers the jobs this process is running, groups them by router, and lets one task per
router work through them a batch at a time over one connection (``batch.sync_batch``):
one read per menu for the batch, the writes sent together, one transaction to record.

Jobs that arrive while a router's batch is running wait for the next one, so a busy
router gets big batches and an idle one answers a single change at once. A change made
through the API or by a payment goes ahead of timer-driven work (a reconciliation's or
a sweep's jobs) waiting for the same router.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from imsys.errors import Deferred, PermanentError
from imsys.streams.job import Job
from imsys.sync.jobs import SyncSubscriber

if TYPE_CHECKING:
    from imsys.sync.context import SyncContext

log = structlog.get_logger("imsys.sync")

# Causes of timer-driven work: they wait behind every other change for their router.
BULK_CAUSES = frozenset({"reconciliation", "sweep", "republish"})


@dataclass(eq=False)
class Pending:
    """One job waiting for its batch, and where its outcome goes."""

    job: Job[SyncSubscriber]
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def subscriber_id(self) -> int:
        return self.job.payload.subscriber_id

    @property
    def bulk(self) -> bool:
        return self.job.payload.cause in BULK_CAUSES

    def succeed(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class SyncBatcher:
    """Routes this process's ``sync_subscriber`` jobs into per-router batches."""

    def __init__(self, ctx: SyncContext, size: int) -> None:
        self._ctx = ctx
        self._size = size
        self._unrouted: list[Pending] = []
        self._routing: asyncio.Task[None] | None = None
        # Per router: changes first, then timer-driven work.
        self._queues: dict[int, tuple[deque[Pending], deque[Pending]]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}

    async def run(self, job: Job[SyncSubscriber]) -> None:
        """Sync the job's subscriber in a batch of its router; raises what failed it."""
        pending = Pending(job)
        self._unrouted.append(pending)
        if self._routing is None or self._routing.done():
            self._routing = asyncio.create_task(self._route(), name="sync-batch-route")
        try:
            await pending.future
        finally:
            # A cancelled job (its timeout, a shutdown) leaves the queue it waits in.
            if not pending.future.done():
                pending.future.cancel()

    async def _route(self) -> None:
        """Find the router of every job handed in meanwhile, in one query."""
        await asyncio.sleep(0)  # let the jobs dispatched in the same step arrive
        while self._unrouted:
            batch, self._unrouted = self._unrouted, []
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            try:
                routes = await self._routes([p.subscriber_id for p in batch])
            except Exception as exc:  # the database: every job fails as it would alone
                for p in batch:
                    p.fail(exc)
                continue
            for p in batch:
                router_id = routes.get(p.subscriber_id)
                if router_id is None:
                    p.fail(PermanentError(f"subscriber {p.subscriber_id} does not exist"))
                    continue
                urgent, bulk = self._queues.setdefault(router_id, (deque(), deque()))
                (bulk if p.bulk else urgent).append(p)
                worker = self._workers.get(router_id)
                if worker is None or worker.done():
                    self._workers[router_id] = asyncio.create_task(
                        self._work(router_id), name=f"sync-batch-router-{router_id}"
                    )

    async def _routes(self, subscriber_ids: list[int]) -> dict[int, int]:
        rows = await self._ctx.db.fetch(
            "SELECT id, router_id FROM subscribers WHERE id = ANY($1::bigint[])", subscriber_ids
        )
        return {r["id"]: r["router_id"] for r in rows}

    async def _work(self, router_id: int) -> None:
        """Batches for one router, one after another, until its queue is empty."""
        from imsys.sync.batch import sync_batch  # the batch needs the handlers' plumbing

        queues = self._queues[router_id]
        while any(queues):
            batch: list[Pending] = []
            seen: set[int] = set()
            for queue in queues:
                held: list[Pending] = []
                while queue and len(batch) < self._size:
                    p = queue.popleft()
                    if p.future.done():
                        continue
                    if p.subscriber_id in seen:
                        held.append(p)  # a second job for one subscriber: the next batch
                        continue
                    seen.add(p.subscriber_id)
                    batch.append(p)
                queue.extendleft(reversed(held))
            if not batch:
                continue
            try:
                await sync_batch(self._ctx, router_id, batch)
            except Exception as exc:
                for p in batch:
                    p.fail(exc)
            except asyncio.CancelledError:
                for p in batch:
                    p.fail(Deferred("the process is stopping", delay=0))
                raise
            finally:
                for p in batch:  # a job the batch forgot must not wait for ever
                    p.fail(RuntimeError(f"sync batch left subscriber {p.subscriber_id} unsettled"))
        if not any(queues):
            self._queues.pop(router_id, None)
