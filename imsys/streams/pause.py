"""Pausing a stream: it keeps accepting jobs and runs none, in every process.

The state lives in Redis (``Keys.paused``), so a pause from any process, the admin API
or the command line reaches them all: each engine reads it every ``PAUSE_CHECK_S`` and
at start. A paused consumer stops reading, hands back what it read ahead, claims no
entry of a dead process and lets its running jobs finish. Producers and timers are not
affected: what they enqueue waits in the stream until the stream is resumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog
from redis.asyncio import Redis

from imsys.streams.entries import as_text
from imsys.streams.job import now_ms
from imsys.streams.keys import Keys

if TYPE_CHECKING:
    from imsys.streams.consumer import StreamConsumer

log = structlog.get_logger("imsys.streams")

# How often every engine reads the paused streams: a pause or a resume reaches every
# process within about this long (and at once in the process that made it).
PAUSE_CHECK_S = 0.5


class UnknownStream(ValueError):
    """A pause or resume named a stream the engine does not run."""


class Pauses:
    """The paused streams, as Redis holds them for every process."""

    def __init__(self, redis: Redis, keys: Keys, streams: tuple[str, ...]) -> None:
        self.redis = redis
        self.keys = keys
        self.streams = streams

    def _known(self, stream: str) -> str:
        if stream not in self.streams:
            raise UnknownStream(f"unknown stream {stream!r}; streams: {', '.join(self.streams)}")
        return stream

    async def pause(self, stream: str) -> bool:
        """Pause ``stream``; False when it already was (its pause time is kept)."""
        added = await self.redis.hsetnx(self.keys.paused, self._known(stream), str(now_ms()))
        return bool(added)

    async def resume(self, stream: str) -> bool:
        """Resume ``stream``; False when it was not paused."""
        return bool(await self.redis.hdel(self.keys.paused, self._known(stream)))

    async def paused(self) -> dict[str, int]:
        """The paused streams of this engine and when each was paused (epoch ms)."""
        raw: dict[str | bytes, str | bytes] = await self.redis.hgetall(self.keys.paused)
        found = {as_text(s): int(as_text(at)) for s, at in raw.items()}
        return {s: at for s, at in found.items() if s in self.streams}

    async def apply(self, consumers: Mapping[str, StreamConsumer]) -> dict[str, int]:
        """Bring each consumer in line with Redis; returns the paused streams."""
        paused = await self.paused()
        for stream, consumer in consumers.items():
            if not consumer.set_paused(stream in paused):
                continue
            if consumer.paused:
                log.info("stream_paused", stream=stream, consumer=consumer.consumer)
                await consumer.release_buffer()
            else:
                log.info("stream_resumed", stream=stream, consumer=consumer.consumer)
        return paused
