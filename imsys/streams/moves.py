"""The engine's atomic moves, one typed method each, for one stream.

Python and the Lua in ``scripts.py`` agree on every move here and nowhere else: each
method owns its script's KEYS and ARGV, in order, so no caller builds an argument list.
The ``job_id`` bookkeeping the moves share (a mark per live job: its entry id, or
``delayed:<due>`` while it waits in the delayed store) is described in ``jobids.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from imsys.streams.entries import eval_raw
from imsys.streams.jobids import DEDUPE_STALE_MS
from imsys.streams.keys import GROUP, Keys
from imsys.streams.scripts import Scripts, as_str_list

# A minute's throughput counter outlives the hour the dashboard charts by a margin.
THROUGHPUT_TTL_S = 2 * 3600


@dataclass(frozen=True, slots=True)
class History:
    """The bounded stream of finished jobs: at most ``max`` entries, none older than
    ``hours``."""

    max: int
    hours: float

    def minid(self) -> str:
        return str(_now_ms() - int(self.hours * 3_600_000))


@dataclass(slots=True)  # not frozen: one is made per job, and frozen __init__ costs twice
class Finished:
    """A job that succeeded, waiting for its acknowledgement."""

    entry_id: str
    type: str
    job_id: str
    seconds: float
    # When this process last knew the claim was fresh (read or claimed): see ``ack``.
    claimed_at: float


class StreamMoves:
    """Every atomic move of one stream's entries."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        stream: str,
        history: History | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.stream = stream
        # Producers' moves write no history; a consumer's do.
        self.history = history or History(0, 24.0)
        self.key = keys.stream(stream)

    def _mark(self, job_id: str | None) -> str:
        return self.keys.dedupe(self.stream, job_id) if job_id else ""

    async def enqueue(
        self, fields: dict[str, str], *, job_id: str | None, due_ms: int | None = None
    ) -> str:
        """Add an entry (or put it in the delayed store when ``due_ms`` is given), unless
        a live job has the same ``job_id``: then ``dup:waiting`` or ``dup:running``.
        Returns the entry id, ``delayed`` or the duplicate's answer."""
        member = "" if due_ms is None else delayed_member(fields, job_id, unique=None)
        result = await self.scripts.enqueue(
            keys=[self.key, self.keys.delayed(self.stream), self.keys.stats(self.stream)],
            args=[
                self._mark(job_id),
                _now_ms(),
                DEDUPE_STALE_MS,
                "" if due_ms is None else due_ms,
                member,
                GROUP,
                *_flat(fields),
            ],
        )
        return str(result)

    async def enqueue_bulk(self, job_type: str, payloads: Sequence[str]) -> int:
        """Add first attempts of one type without dedupe, in one atomic step."""
        return int(
            await self.scripts.bulk_enqueue(keys=[self.key], args=[job_type, _now_ms(), *payloads])
        )

    async def claim_job_ids(self, pairs: Iterable[tuple[str, str]]) -> list[str]:
        """Entries just read whose ``job_id`` belongs to a live job are duplicates: they
        are acknowledged and deleted here, and their ids returned."""
        args: list[Any] = [GROUP, self.keys.dedupe_prefix(self.stream), _now_ms(), DEDUPE_STALE_MS]
        for entry_id, job_id in pairs:
            args += (entry_id, job_id)
        return as_str_list(
            await self.scripts.claim_job_ids(
                keys=[self.key, self.keys.stats(self.stream)], args=args
            )
        )

    async def ack(self, consumer: str, batch: list[Finished], verify: list[str]) -> list[str]:
        """Acknowledge and delete finished entries with their history, in one step.

        Entries in ``verify`` (their claim may have been taken while this process
        stalled) are settled only if still ``consumer``'s; the others are returned.
        """
        hmax = self.history.max
        recent = batch[-hmax:] if hmax else []
        payload = orjson.dumps(
            [
                [d.entry_id for d in batch],
                [[d.job_id, d.entry_id] for d in batch if d.job_id],
                [[d.type, d.job_id, f"{d.seconds * 1000:.1f}"] for d in recent],
                verify,
            ]
        )
        return as_str_list(
            await self.scripts.ack(
                keys=[
                    self.key,
                    self.keys.stats(self.stream),
                    self.keys.history,
                    self.keys.throughput(self.stream, _now_ms() // 60_000),
                ],
                args=[
                    GROUP,
                    hmax,
                    self.history.minid(),
                    self.stream,
                    self.keys.dedupe_prefix(self.stream),
                    payload,
                    consumer,
                    THROUGHPUT_TTL_S,
                ],
            )
        )

    async def retry(
        self,
        consumer: str,
        *,
        entry_id: str,
        job_type: str,
        job_id: str | None,
        fields: dict[str, str],
        due_ms: int,
        seconds: float,
        deferred: bool,
    ) -> bool:
        """Move a running entry to the delayed store (as ``fields``), if still ours."""
        counter = "deferred" if deferred else "retried"
        moved = await self.scripts.retry(
            keys=[
                self.key,
                self.keys.delayed(self.stream),
                self.keys.stats(self.stream),
                self.keys.history,
            ],
            args=[
                GROUP,
                consumer,
                entry_id,
                due_ms,
                delayed_member(fields, job_id, unique=entry_id),
                self._mark(job_id),
                counter,
                self.history.max,
                self.history.minid(),
                self.stream,
                job_type,
                job_id or "",
                f"{seconds * 1000:.1f}",
                counter,
            ],
        )
        return bool(moved)

    async def dead(
        self,
        consumer: str,
        *,
        entry_id: str,
        job_type: str,
        job_id: str | None,
        dead_fields: dict[str, str],
        seconds: float | None,
        keep_days: float,
        check_owner: bool = True,
    ) -> bool:
        """Move an entry to the dead letters (``dead_fields``), if still ours (or, with
        ``check_owner`` False, whoever holds it); trims letters older than ``keep_days``."""
        minid = _now_ms() - int(keep_days * 86_400_000)
        moved = await self.scripts.dead(
            keys=[self.key, self.keys.dead, self.keys.stats(self.stream), self.keys.history],
            args=[
                GROUP,
                consumer,
                entry_id,
                minid,
                self._mark(job_id),
                self.history.max,
                self.history.minid(),
                self.stream,
                job_type,
                job_id or "",
                "" if seconds is None else f"{seconds * 1000:.1f}",
                "1" if check_owner else "0",
                *_flat(dead_fields),
            ],
        )
        return bool(moved)

    async def promote(self, limit: int) -> int:
        """Move up to ``limit`` due delayed jobs back onto the stream."""
        return int(
            await self.scripts.promote(
                keys=[self.keys.delayed(self.stream), self.key],
                args=[_now_ms(), limit, self.keys.dedupe_prefix(self.stream)],
            )
        )

    async def recover(
        self, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[Any, list[Any]]:
        """Claim idle entries from ``cursor``: (next cursor, [(id, flat fields, deliveries)]),
        left as bytes (they may not be text; see ``entries.py``)."""
        raw = await eval_raw(
            self.redis,
            self.scripts.recover,
            [self.key],
            [GROUP, consumer, min_idle_ms, cursor, count],
        )
        return raw[0], list(raw[1])

    async def heartbeat(self, consumer: str, ids: Sequence[str]) -> list[str]:
        """Refresh ``consumer``'s claims on ``ids``; returns those it no longer holds."""
        lost: list[str] = []
        for i in range(0, len(ids), 500):
            lost += as_str_list(
                await self.scripts.heartbeat(
                    keys=[self.key], args=[GROUP, consumer, *ids[i : i + 500]]
                )
            )
        return lost

    async def release(self, entries: Sequence[tuple[str, dict[str, str]]]) -> int:
        """Hand unstarted entries back: a fresh copy at the stream's end each."""
        args: list[Any] = [GROUP, self.keys.dedupe_prefix(self.stream)]
        for entry_id, fields in entries:
            flat = _flat(fields)
            args += [entry_id, fields.get("job_id", ""), len(flat), *flat]
        return int(await self.scripts.release(keys=[self.key], args=args))


def delayed_member(fields: dict[str, str], job_id: str | None, *, unique: str | None) -> str:
    """A delayed-store member: the entry's fields, its job_id, something unique."""
    import secrets

    return orjson.dumps(
        {"f": _flat(fields), "j": job_id or "", "u": unique or secrets.token_hex(8)}
    ).decode()


def _flat(fields: dict[str, str]) -> list[str]:
    return [x for kv in fields.items() for x in kv]


def _now_ms() -> int:
    return int(time.time() * 1000)
