"""One stream's consumer: read sized to free slots, run handlers, settle every entry.

Every entry read ends in exactly one of: acknowledged and deleted (done), moved to the
delayed store (retry / deferred), moved to the dead-letter stream, or left pending for
recovery (shutdown, lost Redis). The settling steps are Lua scripts, so each move is
atomic.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from imsys.errors import Deferred, PermanentError, RetryableError
from imsys.logging import redact_text
from imsys.settings import EngineSettings, StreamPolicy
from imsys.streams.backoff import REDIS_DOWN, Backoff
from imsys.streams.job import Job, Registry, now_ms
from imsys.streams.keys import GROUP, Keys
from imsys.streams.metrics import EngineMetrics
from imsys.streams.scripts import Scripts, as_str_list

log = structlog.get_logger("imsys.streams")

# A delayed mark older than its due time by this much belongs to a job that is gone.
DEDUPE_STALE_MS = 3_600_000
# The part of a huge payload a dead letter keeps (the rest is of no use to anyone).
DEAD_PAYLOAD_KEEP = 65_536
# Strong references to fire-and-forget hook tasks (the loop keeps only weak ones).
_BACKGROUND: set[asyncio.Task[None]] = set()


class PoisonMessage(PermanentError):
    """The entry was delivered too many times: its process kept dying on it."""


@dataclass(slots=True)
class _Done:
    entry_id: str
    type: str
    job_id: str
    seconds: float


@dataclass
class StreamConsumer:
    redis: Redis
    scripts: Scripts
    keys: Keys
    stream: str
    policy: StreamPolicy
    engine: EngineSettings
    registry: Registry
    consumer: str
    metrics: EngineMetrics
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _done: list[_Done] = field(default_factory=list)
    _unflushed: set[str] = field(default_factory=set)
    _slot_free: asyncio.Event = field(default_factory=asyncio.Event)
    _ack_ready: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _with_progress: set[str] = field(default_factory=set)
    # Slots promised to a read still in flight (several readers per stream overlap
    # their round trips; each only asks for slots nobody else has claimed).
    _reserved: int = 0
    # Entries read ahead of a free slot: a slot that frees starts the next job at once
    # instead of waiting a Redis round trip. Bounded by the stream's ``prefetch``.
    _buffer: deque[tuple[str, dict[str, str]]] = field(default_factory=deque)
    # Called (in a task of its own) with the stream's name whenever this consumer had to
    # create the group: Redis lost it, or never had it. The app re-publishes intents.
    on_group_created: Callable[[str], Coroutine[Any, Any, None]] | None = None

    def __post_init__(self) -> None:
        self.key = self.keys.stream(self.stream)
        self.log = log.bind(stream=self.stream)

    # --- group -----------------------------------------------------------------------

    async def ensure_group(self, *, lost: bool = False) -> None:
        """Create the consumer group (and the stream); after a loss, say so loudly."""
        try:
            await self.redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return
        if self.on_group_created is not None:
            hook = self.on_group_created
            task = asyncio.get_running_loop().create_task(hook(self.stream))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        if lost:
            self.log.warning(
                "consumer_group_recreated",
                possible_data_loss=True,
                hint="Redis lost the group (restart without persistence?): "
                "jobs that were waiting may be gone; reconciliation timers will re-enqueue work",
            )

    # --- the read loop -----------------------------------------------------------------

    @property
    def free(self) -> int:
        """How many entries a read may ask for now."""
        return (
            self.policy.concurrency
            + self.policy.read_ahead
            - len(self.running)
            - len(self._buffer)
            - self._reserved
        )

    async def read_loop(self) -> None:
        backoff = Backoff()
        while not self._stopping:
            free = self.free
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                # Let the other jobs finishing in this loop turn free their slots too:
                # one larger read instead of several small ones.
                await asyncio.sleep(0)
                continue
            self._reserved += free
            try:
                entries = await self.read(free, self.engine.read_block_ms)
            except REDIS_DOWN as exc:
                self._reserved -= free
                self.log.warning("redis_unavailable", where="read", error=redact_text(str(exc)))
                await backoff.sleep()
                continue
            except ResponseError as exc:
                self._reserved -= free
                if "NOGROUP" not in str(exc):
                    raise
                await self._recreate_group()
                continue
            except BaseException:
                self._reserved -= free
                raise
            self._reserved -= free
            if backoff.reset():
                self.log.info("redis_reconnected", where="read")
            if entries:
                await self.dispatch(entries)

    async def _recreate_group(self) -> None:
        try:
            await self.ensure_group(lost=True)
        except REDIS_DOWN:
            await asyncio.sleep(0.5)

    async def read(self, count: int, block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        resp = cast(
            list[tuple[str, list[tuple[str, dict[str, str] | None]]]],
            await self.redis.xreadgroup(
                GROUP, self.consumer, {self.key: ">"}, count=count, block=block_ms
            ),
        )
        if not resp:
            return []
        return [(eid, fields) for eid, fields in resp[0][1] if fields is not None]

    async def dispatch(
        self, entries: list[tuple[str, dict[str, str]]], *, recovered: bool = False
    ) -> None:
        """Start a task per entry, after dropping duplicates of a live ``job_id``."""
        with_ids = [(eid, f["job_id"]) for eid, f in entries if f.get("job_id")]
        dropped: set[str] = set()
        if with_ids and not recovered:
            args: list[Any] = [
                GROUP,
                self.keys.dedupe_prefix(self.stream),
                now_ms(),
                DEDUPE_STALE_MS,
            ]
            for eid, jid in with_ids:
                args += (eid, jid)
            try:
                dropped = set(
                    as_str_list(
                        await self.scripts.claim_job_ids(
                            keys=[self.key, self.keys.stats(self.stream)], args=args
                        )
                    )
                )
            except REDIS_DOWN:
                # Left pending: recovery delivers them again once Redis answers.
                self.log.warning("dedupe_check_failed", entries=len(entries))
                return
            if dropped:
                self.log.info("duplicates_dropped", count=len(dropped))
        buffered = {eid for eid, _ in self._buffer} if recovered else set()
        for entry in entries:
            # Recovery can hand back an entry this process still runs (its claim went idle
            # while the loop was stalled): one run of it is enough.
            if entry[0] in dropped or entry[0] in self.running or entry[0] in buffered:
                continue
            if len(self.running) < self.policy.concurrency:
                self._start(*entry)
            else:
                self._buffer.append(entry)

    def _start(self, entry_id: str, fields: dict[str, str]) -> None:
        task = asyncio.get_running_loop().create_task(self._work(entry_id, fields))
        self.running[entry_id] = task

    async def _work(self, entry_id: str, fields: dict[str, str]) -> None:
        """Run a job, then the read-ahead entries while any wait, in this one task.

        A slot that frees takes the next entry in the same step: no new task and no loop
        turn between two jobs, which is most of what a slot would otherwise sit idle.
        """
        task = self.running[entry_id]
        while True:
            try:
                await self._run(entry_id, fields, task)
            except Exception as exc:
                # A settling step failed in a way no retry covers: the entry stays pending
                # and recovery hands it out again; this slot goes on with the next one.
                self.log.exception("job_settle_failed", entry_id=entry_id, error=_error_text(exc))
            self._slot_free.set()
            if not self._buffer or self._stopping:
                return
            entry_id, fields = self._buffer.popleft()
            self.running[entry_id] = task

    # --- one job -----------------------------------------------------------------------

    async def _run(self, entry_id: str, fields: dict[str, str], task: asyncio.Task[None]) -> None:
        started = time.perf_counter()
        type_ = fields.get("type", "")
        try:
            try:
                reg, job = self.registry.parse(self.stream, entry_id, fields)
            except PermanentError as exc:
                await self._settle(self._dead(entry_id, fields, exc, started))
                return
            job.report = self._report_progress
            try:
                await reg.handler(job)
            except asyncio.CancelledError:
                raise
            except Deferred as exc:
                await self._settle(self._retry(job, exc, started, delay=exc.delay, deferred=True))
            except PermanentError as exc:
                await self._settle(self._dead(entry_id, fields, exc, started))
            except Exception as exc:
                # Retryable, or a bug nobody classified: retrying loses nothing.
                if job.attempt >= self.policy.max_attempts:
                    await self._settle(self._dead(entry_id, fields, exc, started, exhausted=True))
                else:
                    defer = exc.defer if isinstance(exc, RetryableError) else None
                    delay = defer if defer is not None else self.policy.retry_delay(job.attempt)
                    await self._settle(self._retry(job, exc, started, delay=delay))
            else:
                elapsed = time.perf_counter() - started
                self._done.append(_Done(entry_id, type_, job.job_id or "", elapsed))
                self._unflushed.add(entry_id)
                self._ack_ready.set()
        finally:
            if self.running.get(entry_id) is task:
                del self.running[entry_id]
            if entry_id in self._with_progress:
                self._with_progress.discard(entry_id)
                await self._settle(self._clear_progress(entry_id))

    async def _settle(self, step: Awaitable[None]) -> None:
        # Shielded: a shutdown cancel must not cut a script in half-sent.
        await asyncio.shield(step)

    async def _until_done(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a settling script, riding out a Redis outage; gives up only at shutdown."""
        backoff = Backoff()
        while True:
            try:
                return await call()
            except REDIS_DOWN as exc:
                if self._stopping and backoff.failures >= 3:
                    self.log.warning("settle_abandoned", step=what, error=redact_text(str(exc)))
                    return None
                await backoff.sleep()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._recreate_group()

    def _hist_minid(self) -> str:
        return str(now_ms() - int(self.engine.history_hours * 3_600_000))

    async def _retry(
        self,
        job: Job[Any],
        exc: BaseException,
        started: float,
        *,
        delay: float,
        deferred: bool = False,
    ) -> None:
        elapsed = time.perf_counter() - started
        attempt = job.attempt if deferred else job.attempt + 1
        fields = {**job.fields, "attempt": str(attempt), "last_error": _error_text(exc)}
        due = now_ms() + int(delay * 1000)
        member = orjson.dumps(
            {"f": [x for kv in fields.items() for x in kv], "j": job.job_id or "", "u": job.id}
        ).decode()
        dedupe_key = self.keys.dedupe(self.stream, job.job_id) if job.job_id else ""
        counter = "deferred" if deferred else "retried"
        moved = await self._until_done(
            "retry",
            lambda: self.scripts.retry(
                keys=[
                    self.key,
                    self.keys.delayed(self.stream),
                    self.keys.stats(self.stream),
                    self.keys.history,
                ],
                args=[
                    GROUP,
                    self.consumer,
                    job.id,
                    due,
                    member,
                    dedupe_key,
                    counter,
                    self.engine.history_max,
                    self._hist_minid(),
                    self.stream,
                    job.type,
                    job.job_id or "",
                    f"{elapsed * 1000:.1f}",
                    counter,
                ],
            ),
        )
        if not moved:
            self.log.warning("job_taken_over", entry_id=job.id, type=job.type, step=counter)
            return
        (self.metrics.deferred if deferred else self.metrics.retried).labels(self.stream).inc()
        self.log.log(
            20 if deferred else 30,
            "job_deferred" if deferred else "job_retry_scheduled",
            entry_id=job.id,
            type=job.type,
            job_id=job.job_id,
            attempt=job.attempt,
            next_attempt=attempt,
            delay_s=round(delay, 2),
            error=_error_text(exc),
        )

    async def _dead(
        self,
        entry_id: str,
        fields: dict[str, str],
        exc: BaseException,
        started: float | None,
        *,
        exhausted: bool = False,
        check_owner: bool = True,
    ) -> None:
        error = _error_text(exc)
        if exhausted:
            attempts = f"{fields.get('attempt', '1')}/{self.policy.max_attempts}"
            error = f"attempts exhausted ({attempts}): {error}"
        kept = self.registry.masked_fields(self.stream, fields)
        payload = kept.get("payload")
        if payload is not None and len(payload) > DEAD_PAYLOAD_KEEP:
            kept = {
                **kept,
                "payload": payload[:DEAD_PAYLOAD_KEEP],
                "payload_bytes": str(len(payload)),
            }
        now = now_ms()
        dead_fields = {
            **kept,
            "stream": self.stream,
            "original_id": entry_id,
            "error": error,
            "failed_at": str(now),
        }
        job_id = fields.get("job_id") or ""
        dedupe_key = self.keys.dedupe(self.stream, job_id) if job_id else ""
        minid = now - int(self.engine.dead_letter_days * 86_400_000)
        elapsed_ms = "" if started is None else f"{(time.perf_counter() - started) * 1000:.1f}"
        moved = await self._until_done(
            "dead_letter",
            lambda: self.scripts.dead(
                keys=[self.key, self.keys.dead, self.keys.stats(self.stream), self.keys.history],
                args=[
                    GROUP,
                    self.consumer,
                    entry_id,
                    minid,
                    dedupe_key,
                    self.engine.history_max,
                    self._hist_minid(),
                    self.stream,
                    fields.get("type", ""),
                    job_id,
                    elapsed_ms,
                    "1" if check_owner else "0",
                    *[x for kv in dead_fields.items() for x in kv],
                ],
            ),
        )
        if not moved:
            self.log.warning("job_taken_over", entry_id=entry_id, step="dead_letter")
            return
        self.metrics.dead.labels(self.stream).inc()
        self.log.error(
            "job_dead_lettered",
            entry_id=entry_id,
            type=fields.get("type"),
            job_id=job_id or None,
            attempt=fields.get("attempt", "1"),
            error=error,
        )

    async def _report_progress(
        self, job: Job[Any], done: int, total: int | None, note: str | None
    ) -> None:
        self._with_progress.add(job.id)
        value = orjson.dumps(
            {
                "type": job.type,
                "job_id": job.job_id,
                "done": done,
                "total": total,
                "note": note,
                "updated_at": now_ms(),
                "consumer": self.consumer,
            }
        )
        try:
            await self.redis.hset(self.keys.progress(self.stream), job.id, value)
        except REDIS_DOWN:
            pass  # progress is informative; the job goes on

    async def _clear_progress(self, entry_id: str) -> None:
        await self._until_done(
            "progress", lambda: self.redis.hdel(self.keys.progress(self.stream), entry_id)
        )

    # --- acknowledgements ------------------------------------------------------------------

    async def ack_loop(self) -> None:
        """Flush finished jobs in batches: XACK + XDEL + history in one script call."""
        while True:
            await self._ack_ready.wait()
            # One more loop turn first: jobs whose timers fired together finish together,
            # and one script call for all of them costs far less than one each.
            await asyncio.sleep(0)
            self._ack_ready.clear()
            await self.flush()
            if self._stopping and not self.running and not self._done:
                return

    async def flush(self) -> None:
        while self._done:
            batch, self._done = self._done, []
            ok = await self._until_done("ack", lambda b=batch: self._ack(b))  # type: ignore[misc]
            if ok is None and self._stopping:
                return
            for d in batch:
                self._unflushed.discard(d.entry_id)
                # Observed here, off the path from one job to the next.
                self.metrics.observe(self.stream, d.type, d.seconds)
            self.metrics.processed.labels(self.stream).inc(len(batch))

    async def _ack(self, batch: list[_Done]) -> int:
        recent = batch[-self.engine.history_max :] if self.engine.history_max else []
        payload = orjson.dumps(
            [
                [d.entry_id for d in batch],
                [[d.job_id, d.entry_id] for d in batch if d.job_id],
                [[d.type, d.job_id, f"{d.seconds * 1000:.1f}"] for d in recent],
            ]
        )
        args: list[Any] = [
            GROUP,
            self.engine.history_max,
            self._hist_minid(),
            self.stream,
            self.keys.dedupe_prefix(self.stream),
            payload,
        ]
        keys = [self.key, self.keys.stats(self.stream), self.keys.history]
        return int(await self.scripts.ack(keys=keys, args=args))

    # --- recovery and heartbeat ------------------------------------------------------------

    async def recover_once(self) -> int:
        """Claim entries idle past ``claim_idle_s`` (their process died); follow the cursor."""
        cursor = "0-0"
        claimed = 0
        min_idle = int(self.engine.claim_idle_s * 1000)
        while not self._stopping:
            # Not self.free: an idle reader blocked in XREADGROUP holds every free slot as
            # a reservation, and recovery must still get its turn. Anything beyond the
            # free slots waits in the read-ahead buffer.
            free = self.policy.concurrency - len(self.running) - len(self._buffer)
            if free <= 0:
                break
            raw = await self.scripts.recover(
                keys=[self.key], args=[GROUP, self.consumer, min_idle, cursor, min(free, 100)]
            )
            cursor = raw[0]
            entries: list[tuple[str, dict[str, str]]] = []
            for eid, flat, deliveries in raw[1]:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                if int(deliveries) > self.engine.max_deliveries:
                    exc = PoisonMessage(
                        f"delivered {deliveries} times without finishing "
                        f"(max_deliveries={self.engine.max_deliveries}): its process kept dying"
                    )
                    await self._dead(eid, fields, exc, None)
                else:
                    entries.append((eid, fields))
            if entries:
                claimed += len(entries)
                self.metrics.recovered.labels(self.stream).inc(len(entries))
                self.log.warning("jobs_recovered", count=len(entries))
                await self.dispatch(entries, recovered=True)
            if cursor == "0-0":
                break
        return claimed

    async def heartbeat_once(self) -> list[str]:
        """Keep the claims of our running and read-ahead entries fresh.

        Returns the running ids another process took. A read-ahead entry another process
        took (this one stalled past ``claim_idle_s``) is dropped here: it runs there.
        """
        ids = [*self.running, *self._unflushed, *(eid for eid, _ in self._buffer)]
        lost: list[str] = []
        for i in range(0, len(ids), 500):
            lost += as_str_list(
                await self.scripts.heartbeat(
                    keys=[self.key], args=[GROUP, self.consumer, *ids[i : i + 500]]
                )
            )
        gone = set(lost)
        if self._buffer and gone:
            kept = deque(e for e in self._buffer if e[0] not in gone)
            if len(kept) < len(self._buffer):
                self.log.warning("read_ahead_taken_over", count=len(self._buffer) - len(kept))
                self._buffer = kept
                self._slot_free.set()
        lost = [eid for eid in lost if eid in self.running]
        if lost:
            self.log.warning("job_claim_lost", entry_ids=lost[:20], count=len(lost))
        return lost

    async def promote_once(self, limit: int = 1000) -> int:
        """Move due delayed jobs back onto the stream (atomic per batch)."""
        total = 0
        while True:
            n = int(
                await self.scripts.promote(
                    keys=[self.keys.delayed(self.stream), self.key],
                    args=[now_ms(), limit, self.keys.dedupe_prefix(self.stream)],
                )
            )
            total += n
            if n < limit:
                return total

    # --- shutdown and test hooks -----------------------------------------------------------

    def stop_reading(self) -> None:
        self._stopping = True
        self._slot_free.set()
        self._ack_ready.set()

    async def release_buffer(self) -> int:
        """Give entries read ahead but never started back to the stream for others."""
        buffered, self._buffer = list(self._buffer), deque()
        if not buffered:
            return 0
        args: list[Any] = [GROUP, self.keys.dedupe_prefix(self.stream)]
        for eid, fields in buffered:
            flat = [x for kv in fields.items() for x in kv]
            args += [eid, fields.get("job_id", ""), len(flat), *flat]
        try:
            await self.scripts.release(keys=[self.key], args=args)
        except REDIS_DOWN:
            self.log.warning("read_ahead_left_pending", count=len(buffered))
            return 0
        self.log.info("read_ahead_released", count=len(buffered))
        return len(buffered)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` for running jobs; cancel the rest (they stay pending)."""
        await self.release_buffer()
        tasks = list(self.running.values())
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=grace)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
                self.log.warning("jobs_left_pending", count=len(still))
        self._ack_ready.set()
        await self.flush()
        return len(tasks)

    async def process_once(self, count: int | None = None, block_ms: int | None = None) -> int:
        """Read one batch, run it to the end, flush: one exact step for tests."""
        entries = await self.read(count or self.free, block_ms)
        await self.dispatch(entries)
        while self.running:
            await asyncio.wait(list(self.running.values()))
        await self.flush()
        return len(entries)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return redact_text(text)[:1000]
