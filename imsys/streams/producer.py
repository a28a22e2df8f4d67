"""Putting jobs on streams: one at a time, in bulk, later, or once per ``job_id``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from imsys.streams.job import JobSpec, now_ms
from imsys.streams.keys import Keys
from imsys.streams.moves import StreamMoves
from imsys.streams.scripts import Scripts

BULK_CHUNK = 2000


def _payload_text(payload: Mapping[str, Any] | str) -> str:
    return payload if isinstance(payload, str) else orjson.dumps(payload).decode()


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What became of an enqueue: the entry id, ``delayed``, or None for a duplicate."""

    entry_id: str | None
    # For a duplicate: the live job is already running (it may have read its inputs
    # before the caller's change), rather than waiting.
    running: bool = False

    @property
    def duplicate(self) -> bool:
        return self.entry_id is None


class Producer:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self._moves: dict[str, StreamMoves] = {}

    async def send(
        self,
        spec: JobSpec[Any],
        payload: Any,
        *,
        job_id: str | None = None,
        delay: float = 0.0,
    ) -> Enqueued:
        """Add one job of ``spec``'s type; its payload is validated first (InvalidJob)."""
        return await self.enqueue(
            spec.stream, spec.name, spec.dump(payload), job_id=job_id, delay=delay
        )

    async def enqueue(
        self,
        stream: str,
        type_: str,
        payload: Mapping[str, Any] | str,
        *,
        job_id: str | None = None,
        delay: float = 0.0,
    ) -> Enqueued:
        """Add one job; with ``job_id`` it is dropped while one like it waits or runs."""
        now = now_ms()
        fields = {
            "type": type_,
            "payload": _payload_text(payload),
            "attempt": "1",
            "enqueued_at": str(now),
        }
        if job_id:
            fields["job_id"] = job_id
        if not job_id and delay <= 0:
            return Enqueued(await self.redis.xadd(self.keys.stream(stream), fields))  # type: ignore[arg-type]
        due = now + int(delay * 1000) if delay > 0 else None
        result = await self.moves(stream).enqueue(fields, job_id=job_id, due_ms=due)
        if result.startswith("dup:"):
            return Enqueued(None, running=result == "dup:running")
        return Enqueued(result)

    def moves(self, stream: str) -> StreamMoves:
        moves = self._moves.get(stream)
        if moves is None:
            moves = self._moves[stream] = StreamMoves(self.redis, self.scripts, self.keys, stream)
        return moves

    async def enqueue_many(
        self, stream: str, type_: str, payloads: Iterable[Mapping[str, Any] | str]
    ) -> int:
        """Bulk enqueue without dedupe, a chunk per script call; returns the count.

        A chunk is atomic; chunks stay small so no call holds Redis for long.
        """
        count = 0
        chunk: list[str] = []
        for payload in payloads:
            chunk.append(_payload_text(payload))
            if len(chunk) >= BULK_CHUNK:
                count += await self._bulk(stream, type_, chunk)
                chunk = []
        if chunk:
            count += await self._bulk(stream, type_, chunk)
        return count

    async def _bulk(self, stream: str, type_: str, payloads: list[str]) -> int:
        return await self.moves(stream).enqueue_bulk(type_, payloads)
