"""Inspecting, replaying and dropping dead letters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from imsys.streams.job import now_ms
from imsys.streams.keys import Keys
from imsys.streams.scripts import Scripts

ENTRY_ID = r"\d{1,20}-\d{1,20}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    fields: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.fields}


class DeadLetters:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts

    async def count(self) -> int:
        return int(await self.redis.xlen(self.keys.dead))

    async def list(
        self, *, limit: int = 100, before: str | None = None, stream: str | None = None
    ) -> list[DeadLetter]:
        """Newest first; ``before`` pages back from an id; ``stream`` filters."""
        out: list[DeadLetter] = []
        end = f"({before}" if before else "+"
        while len(out) < limit:
            batch = cast(
                list[tuple[str, dict[str, str]]],
                await self.redis.xrevrange(self.keys.dead, max=end, min="-", count=max(limit, 100)),
            )
            if not batch:
                break
            for eid, fields in batch:
                if stream is None or fields.get("stream") == stream:
                    out.append(DeadLetter(eid, fields))
                    if len(out) >= limit:
                        break
            end = f"({batch[-1][0]}"
        return out

    async def get(self, dead_id: str) -> DeadLetter | None:
        rows = cast(
            list[tuple[str, dict[str, str]]],
            await self.redis.xrange(self.keys.dead, min=dead_id, max=dead_id),
        )
        return DeadLetter(rows[0][0], rows[0][1]) if rows else None

    async def replay(self, dead_id: str) -> str | None:
        """Put the job back on its stream as attempt 1; None when there is no such letter."""
        new_id = await self.scripts.replay(
            keys=[self.keys.dead], args=[dead_id, self.keys.prefix, now_ms()]
        )
        return str(new_id) if new_id else None

    async def replay_all(self, *, stream: str | None = None) -> int:
        count = 0
        for letter in await self.list(limit=1_000_000, stream=stream):
            if await self.replay(letter.id):
                count += 1
        return count

    async def drop(self, dead_id: str) -> bool:
        return bool(await self.redis.xdel(self.keys.dead, dead_id))

    async def purge(self, *, stream: str | None = None, older_than_ms: int | None = None) -> int:
        """Drop dead letters (all, one stream's, or those older than an age)."""
        if stream is None and older_than_ms is None:
            n = await self.count()
            await self.redis.delete(self.keys.dead)
            return n
        cutoff = now_ms() - older_than_ms if older_than_ms is not None else None
        doomed = [
            d.id
            for d in await self.list(limit=1_000_000, stream=stream)
            if cutoff is None or int(d.id.split("-")[0]) < cutoff
        ]
        for i in range(0, len(doomed), 500):
            await self.redis.xdel(self.keys.dead, *doomed[i : i + 500])
        return len(doomed)
