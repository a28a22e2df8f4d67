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
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from imsys.backoff import REDIS_DOWN, Backoff
from imsys.errors import (
    Deferred,
    FencedOut,
    ImsysError,
    PermanentError,
    RetryableError,
    Unavailable,
)
from imsys.logging import redact_text
from imsys.settings import EngineSettings, StreamPolicy
from imsys.streams.entries import (
    Entry,
    Malformed,
    as_text,
    decode_entries,
    decode_entry,
    xreadgroup_raw,
)
from imsys.streams.job import Job, Registry, now_ms
from imsys.streams.keys import GROUP, Keys
from imsys.streams.metrics import EngineMetrics
from imsys.streams.moves import Finished, History, StreamMoves
from imsys.streams.scripts import Scripts

log = structlog.get_logger("imsys.streams")

# The part of a huge payload a dead letter keeps (the rest is of no use to anyone).
DEAD_PAYLOAD_KEEP = 65_536
# The longest a job waits for PostgreSQL or Redis to come back before it looks again.
INFRA_DELAY_CAP = 5.0
# Strong references to fire-and-forget hook tasks (the loop keeps only weak ones).
_BACKGROUND: set[asyncio.Task[None]] = set()


class PoisonMessage(PermanentError):
    """The entry was delivered too many times: its process kept dying on it."""


class JobTimeout(RetryableError):
    """The handler ran past its timeout and was cancelled; the attempt counts."""


class InvalidEntry(PermanentError):
    """The entry's bytes are not text (its reason names the field)."""


# Turns a third-party exception (a database driver's, say) into one of ours, or None.
ErrorTranslator = Callable[[BaseException], ImsysError | None]


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
    _done: list[Finished] = field(default_factory=list)
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
    _malformed: list[Malformed] = field(default_factory=list)
    # Called (in a task of its own) with the stream's name whenever this consumer had to
    # create the group: Redis lost it, or never had it. The app re-publishes intents.
    on_group_created: Callable[[str], Coroutine[Any, Any, None]] | None = None
    translators: list[ErrorTranslator] = field(default_factory=list)
    # The running job of each entry (the heartbeat and recovery update its fence).
    _jobs: dict[str, Job[Any]] = field(default_factory=dict)
    # Monotonic time each entry was read or claimed, until it is settled.
    _claimed_at: dict[str, float] = field(default_factory=dict)
    # Delivery counts of recovered entries, until their job starts.
    _deliveries: dict[str, int] = field(default_factory=dict)
    # Entries whose claim another process took: their handlers are being cancelled.
    _lost: set[str] = field(default_factory=set)
    # Running jobs past their deadline (``Job.deadline``) whose handlers are being cancelled.
    _timed_out: set[str] = field(default_factory=set)
    # When the last heartbeat that refreshed every claim of ours was sent.
    _refreshed_at: float = 0.0
    # Claims confirmed before this moment are not fresh (set when the process was frozen).
    _not_before: float = 0.0
    # Jobs deferred in a row because PostgreSQL or Redis was away (sets their delay).
    _infra_failures: int = 0
    # The stream is paused (``streams/pause.py`` keeps this in line with Redis): nothing
    # new is read, started or recovered; running jobs finish.
    paused: bool = False

    def __post_init__(self) -> None:
        self.key = self.keys.stream(self.stream)
        history = History(self.engine.history_max, self.engine.history_hours)
        self.moves = StreamMoves(self.redis, self.scripts, self.keys, self.stream, history)
        # Bound once: every job gets the same three (a bound method made per job costs).
        self._hooks = (self._report_progress, self._fence, self._claim_check)
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
            if self.paused:
                # Woken by a resume, a finishing job or shutdown; it looks again then.
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
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
            if entries and self.paused:
                # Read while the pause came in: back to the stream, to wait there.
                await self._hand_back(entries)
            elif entries:
                await self.dispatch(entries)
            if self._malformed:
                await self.dead_letter_malformed()

    async def _recreate_group(self) -> None:
        try:
            await self.ensure_group(lost=True)
        except REDIS_DOWN:
            await asyncio.sleep(0.5)

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer; undecodable ones are set aside for the dead letters."""
        sent = time.monotonic()
        raw = await xreadgroup_raw(self.redis, GROUP, self.consumer, self.key, count, block_ms)
        good, bad = decode_entries(raw)
        self._malformed += bad
        # Redis delivered them (and reset their idle time) after we asked: their claims
        # are fresh from ``sent`` on, at the latest.
        for eid, _ in good:
            self._claimed_at[eid] = sent
        return good

    async def dead_letter_malformed(self) -> None:
        """Dead-letter the entries that are not text, with their raw bytes; the rest flows."""
        bad, self._malformed = self._malformed, []
        for m in bad:
            await self._dead(m.entry_id, m.fields, InvalidEntry(m.reason), None)

    async def dispatch(
        self, entries: list[tuple[str, dict[str, str]]], *, recovered: bool = False
    ) -> None:
        """Start a task per entry, after dropping duplicates of a live ``job_id``."""
        with_ids = [(eid, f["job_id"]) for eid, f in entries if f.get("job_id")]
        dropped: set[str] = set()
        if with_ids and not recovered:
            try:
                dropped = set(await self.moves.claim_job_ids(with_ids))
            except REDIS_DOWN:
                # Left pending: recovery delivers them again once Redis answers.
                self.log.warning("dedupe_check_failed", entries=len(entries))
                return
            if dropped:
                self.log.info("duplicates_dropped", count=len(dropped))
        buffered = {eid for eid, _ in self._buffer} if recovered else set()
        for entry in entries:
            # Recovery can hand back an entry this process still runs (its claim went idle
            # while the loop was stalled): one run of it is enough, and that run now holds
            # the new delivery (recovery renewed its claim time).
            eid = entry[0]
            if eid in self.running or eid in buffered:
                job = self._jobs.get(eid)
                if job is not None and eid in self._deliveries:
                    job.delivery = self._deliveries.pop(eid)
                continue
            if eid in dropped:
                self._claimed_at.pop(eid, None)
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
            if not self._buffer or self._stopping or self.paused:
                return
            entry_id, fields = self._buffer.popleft()
            self.running[entry_id] = task

    # --- one job -----------------------------------------------------------------------

    async def _run(self, entry_id: str, fields: dict[str, str], task: asyncio.Task[None]) -> None:
        started = time.monotonic()
        type_ = fields.get("type", "")
        try:
            try:
                reg, job = self.registry.parse(self.stream, entry_id, fields)
            except PermanentError as exc:
                await self._settle(self._dead(entry_id, fields, exc, started))
                return
            hooks = self._hooks
            job.report, job.fence, job.claim_check = hooks
            if self._deliveries:
                job.delivery = self._deliveries.pop(entry_id, 1)
            spec = reg.spec
            job.max_attempts = spec.max_attempts or self.policy.max_attempts
            timeout = spec.timeout_s or self.policy.job_timeout_s
            job.deadline = started + timeout
            self._jobs[entry_id] = job
            try:
                await reg.handler(job)
            except asyncio.CancelledError:
                ours = entry_id in self._lost or entry_id in self._timed_out
                if not ours or self._stopping:
                    raise
                # Our cancel, for this job alone: the task goes on with the next entry.
                task.uncancel()
                if entry_id in self._lost:
                    self.log.warning("job_cancelled_claim_lost", entry_id=entry_id, type=type_)
                    return
                expired = JobTimeout(f"timeout: still running after {timeout:g}s, cancelled")
                await self._failed(job, expired, started)
                return
            except Exception as raw:
                await self._failed(job, self._classify(raw), started)
            else:
                self._infra_failures = 0
                elapsed = time.monotonic() - started
                claimed = self._claimed_at.pop(entry_id, 0.0)
                self._done.append(Finished(entry_id, type_, job.job_id or "", elapsed, claimed))
                self._unflushed.add(entry_id)
                self._ack_ready.set()
        finally:
            if self.running.get(entry_id) is task:
                del self.running[entry_id]
            self._jobs.pop(entry_id, None)
            if self._lost:
                self._lost.discard(entry_id)
            if self._timed_out:
                self._timed_out.discard(entry_id)
            if entry_id not in self._unflushed:
                self._claimed_at.pop(entry_id, None)
            if entry_id in self._with_progress:
                self._with_progress.discard(entry_id)
                await self._settle(self._clear_progress(entry_id))

    def _classify(self, exc: Exception) -> Exception:
        """The one place a handler's exception becomes ours: translated, then judged."""
        if isinstance(exc, ImsysError):
            return exc
        # redis-py's own classes only: a bare OSError may be any service's (the translators
        # below know PostgreSQL's), and one nobody claims is retried as usual.
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            return Unavailable(f"Redis unavailable: {redact_text(str(exc))}", delay=1.0)
        for translate in self.translators:
            ours = translate(exc)
            if ours is not None:
                return ours
        return exc

    async def _failed(self, job: Job[Any], exc: Exception, started: float) -> None:
        entry_id, fields = job.id, job.fields
        if isinstance(exc, FencedOut):
            # Most likely another process holds this job now, and then nothing of ours may
            # settle it: the retry script moves the entry only while it is still ours (a
            # stall nobody used), and then it runs again at once.
            self.log.warning("job_fenced_out", entry_id=entry_id, type=job.type, error=str(exc))
            await self._settle(self._retry(job, exc, started, delay=0.0, deferred=True))
        elif isinstance(exc, Unavailable):
            # Not the job's fault: it waits without spending an attempt, however long.
            self._infra_failures += 1
            delay = min(INFRA_DELAY_CAP, 0.5 * 2 ** min(self._infra_failures, 8))
            await self._settle(self._retry(job, exc, started, delay=delay, deferred=True))
        elif isinstance(exc, Deferred):
            await self._settle(self._retry(job, exc, started, delay=exc.delay, deferred=True))
        elif isinstance(exc, PermanentError):
            await self._settle(self._dead(entry_id, fields, exc, started))
        elif job.last_attempt:
            # Retryable, or a bug nobody classified, on its last attempt.
            await self._settle(
                self._dead(entry_id, fields, exc, started, exhausted=job.max_attempts)
            )
        else:
            defer = exc.defer if isinstance(exc, RetryableError) else None
            delay = defer if defer is not None else self.policy.retry_delay(job.attempt)
            await self._settle(self._retry(job, exc, started, delay=delay))

    def _claim_fresh(self, entry_id: str) -> bool:
        """True while nobody can have claimed the entry: too little time has passed.

        Another process claims an entry only once it sat idle ``claim_idle_s`` in Redis.
        Its idle time restarted when it was delivered or claimed to us, or refreshed by a
        heartbeat, each no earlier than we sent that command. Half the idle limit is
        the margin (clock rates, a loop turn late).
        """
        start = max(self._claimed_at.get(entry_id, 0.0), self._refreshed_at)
        return (
            entry_id not in self._lost
            and start >= self._not_before
            and time.monotonic() - start < self.engine.claim_idle_s / 2
        )

    def _claim_check(self, job: Job[Any]) -> None:
        if not self._claim_fresh(job.id):
            raise FencedOut(
                f"entry {job.id}: the claim is not confirmed since this process stalled"
            )

    def stalled(self) -> None:
        """This process was frozen (SIGCONT came): no claim counts as fresh any more.

        Safe from a signal handler: one float assignment.
        """
        self._not_before = time.monotonic()

    async def _fence(self, job: Job[Any]) -> None:
        """Raise FencedOut unless this process still holds the entry's claim.

        While the claim is fresh this returns without awaiting anything, so the side
        effect that follows goes out in the same step (a process frozen in between would
        need to stop within those microseconds). Otherwise (this process stalled) it asks
        Redis, refreshing the claim when it is still ours, in one atomic script.
        """
        if self._claim_fresh(job.id):
            return
        sent = time.monotonic()
        try:
            lost = await self.moves.heartbeat(self.consumer, [job.id])
        except REDIS_DOWN as exc:
            raise Unavailable(
                f"Redis unavailable: cannot confirm the claim: {redact_text(str(exc))}", delay=1.0
            ) from exc
        if lost:
            self._lost.add(job.id)
            raise FencedOut(
                f"entry {job.id} is no longer this process's: another process claimed it "
                "while this one stalled"
            )
        self._claimed_at[job.id] = sent

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

    async def _retry(
        self,
        job: Job[Any],
        exc: BaseException,
        started: float,
        *,
        delay: float,
        deferred: bool = False,
    ) -> None:
        elapsed = time.monotonic() - started
        attempt = job.attempt if deferred else job.attempt + 1
        fields = {**job.fields, "attempt": str(attempt), "last_error": _error_text(exc)}
        counter = "deferred" if deferred else "retried"
        moved = await self._until_done(
            "retry",
            lambda: self.moves.retry(
                self.consumer,
                entry_id=job.id,
                job_type=job.type,
                job_id=job.job_id,
                fields=fields,
                due_ms=now_ms() + int(delay * 1000),
                seconds=elapsed,
                deferred=deferred,
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
        exhausted: int | None = None,
        check_owner: bool = True,
    ) -> None:
        """Dead-letter the entry; ``exhausted`` is the max attempts its last one reached."""
        error = _error_text(exc)
        if exhausted:
            attempts = f"{fields.get('attempt', '1')}/{exhausted}"
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
        moved = await self._until_done(
            "dead_letter",
            lambda: self.moves.dead(
                self.consumer,
                entry_id=entry_id,
                job_type=fields.get("type", ""),
                job_id=job_id,
                dead_fields=dead_fields,
                seconds=None if started is None else time.monotonic() - started,
                keep_days=self.engine.dead_letter_days,
                check_owner=check_owner,
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

    async def _ack(self, batch: list[Finished]) -> int:
        # A claim can only be taken once it sat idle for claim_idle_s. Entries read, claimed
        # or refreshed more recently than half that are certainly still ours; only the
        # others (this process stalled: a freeze, a SIGSTOP) are checked in the script, so
        # a stale run never acknowledges an entry another process now runs.
        now = time.monotonic()
        fresh_for = self.engine.claim_idle_s / 2
        verify = [
            d.entry_id for d in batch if now - max(d.claimed_at, self._refreshed_at) > fresh_for
        ]
        taken = await self.moves.ack(self.consumer, batch, verify)
        if taken:
            self.log.warning("job_taken_over", entry_ids=taken[:20], count=len(taken), step="ack")
        return len(batch) - len(taken)

    # --- recovery and heartbeat ------------------------------------------------------------

    async def recover_once(self) -> int:
        """Claim entries idle past ``claim_idle_s`` (their process died); follow the cursor."""
        cursor = "0-0"
        claimed = 0
        min_idle = int(self.engine.claim_idle_s * 1000)
        # Paused, a dead process's entries stay where they are: claimed, they would run.
        while not self._stopping and not self.paused:
            # Not self.free: an idle reader blocked in XREADGROUP holds every free slot as
            # a reservation, and recovery must still get its turn. Anything beyond the
            # free slots waits in the read-ahead buffer.
            free = self.policy.concurrency - len(self.running) - len(self._buffer)
            if free <= 0:
                break
            sent = time.monotonic()
            raw_cursor, claimed_now = await self.moves.recover(
                self.consumer, min_idle, cursor, min(free, 100)
            )
            cursor = as_text(raw_cursor)
            entries: list[tuple[str, dict[str, str]]] = []
            for raw_id, flat, deliveries in claimed_now:
                decoded = decode_entry(raw_id, flat)
                if isinstance(decoded, Malformed):
                    await self._dead(
                        decoded.entry_id, decoded.fields, InvalidEntry(decoded.reason), None
                    )
                    continue
                eid, fields = decoded
                if int(deliveries) > self.engine.max_deliveries:
                    exc = PoisonMessage(
                        f"delivered {deliveries} times without finishing "
                        f"(max_deliveries={self.engine.max_deliveries}): its process kept dying"
                    )
                    await self._dead(eid, fields, exc, None)
                else:
                    self._deliveries[eid] = int(deliveries)
                    self._claimed_at[eid] = sent
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
        sent_at = time.monotonic()
        lost = await self.moves.heartbeat(self.consumer, ids)
        self._refreshed_at = sent_at
        gone = set(lost)
        if self._buffer and gone:
            kept = deque(e for e in self._buffer if e[0] not in gone)
            if len(kept) < len(self._buffer):
                self.log.warning("read_ahead_taken_over", count=len(self._buffer) - len(kept))
                self._buffer = kept
                for eid in gone:
                    self._claimed_at.pop(eid, None)  # it runs elsewhere: no claim of ours
                self._slot_free.set()
        lost = [eid for eid in lost if eid in self.running]
        if lost:
            self.log.warning("job_claim_lost", entry_ids=lost[:20], count=len(lost))
        for eid in lost:
            # Stop the stale run now; its fence stops any side effect it reaches first.
            task = self.running.get(eid)
            if task is not None and eid in self._jobs and eid not in self._lost:
                self._lost.add(eid)
                task.cancel()
        self.cancel_overdue()
        return lost

    def cancel_overdue(self) -> list[str]:
        """Cancel the handlers past their timeout (the heartbeat calls this)."""
        now = time.monotonic()
        overdue = [
            eid
            for eid, job in self._jobs.items()
            if job.deadline <= now and eid not in self._timed_out and eid not in self._lost
        ]
        for eid in overdue:
            task = self.running.get(eid)
            if task is not None:
                self._timed_out.add(eid)
                task.cancel()
        if overdue:
            self.log.warning("job_timed_out", entry_ids=overdue[:20], count=len(overdue))
        return overdue

    async def promote_once(self, limit: int = 1000) -> int:
        """Move due delayed jobs back onto the stream (atomic per batch)."""
        total = 0
        while True:
            n = await self.moves.promote(limit)
            total += n
            if n < limit:
                return total

    # --- shutdown and test hooks -----------------------------------------------------------

    def set_paused(self, paused: bool) -> bool:
        """Pause or resume this consumer; True when that changed something.

        Pausing stops reads and starts at once; the caller hands back the read-ahead
        entries (``release_buffer``). Resuming wakes the read loop.
        """
        if paused == self.paused:
            return False
        self.paused = paused
        self._slot_free.set()
        return True

    def stop_reading(self) -> None:
        self._stopping = True
        self._slot_free.set()
        self._ack_ready.set()

    async def release_buffer(self) -> int:
        """Give entries read ahead but never started back to the stream for others."""
        buffered, self._buffer = list(self._buffer), deque()
        return await self._hand_back(buffered)

    async def _hand_back(self, entries: list[tuple[str, dict[str, str]]]) -> int:
        if not entries:
            return 0
        for eid, _ in entries:
            self._claimed_at.pop(eid, None)
            self._deliveries.pop(eid, None)
        try:
            await self.moves.release(entries)
        except REDIS_DOWN:
            # Left pending under this consumer: recovery hands them out again later.
            self.log.warning("read_ahead_left_pending", count=len(entries))
            return 0
        self.log.info("read_ahead_released", count=len(entries))
        return len(entries)

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
        await self.dead_letter_malformed()
        while self.running:
            await asyncio.wait(list(self.running.values()))
        await self.flush()
        return len(entries)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return redact_text(text)[:1000]
