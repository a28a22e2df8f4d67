"""What the Bouncer domain's timers and handlers share, built once from `Deps`."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from imsys.bouncer.ratelimit import RateLimiter
from imsys.deps import Deps
from imsys.providers.bouncer import BouncerClient
from imsys.settings import BouncerBatchingSettings
from imsys.streams.producer import Producer


@dataclass(frozen=True, slots=True)
class BouncerContext:
    db: asyncpg.Pool
    producer: Producer
    client: BouncerClient
    cfg: BouncerBatchingSettings
    limiter: RateLimiter

    @classmethod
    def from_deps(cls, deps: Deps) -> BouncerContext:
        cfg = deps.settings.bouncer_batching
        return cls(
            db=deps.db,
            producer=deps.engine.producer,
            client=BouncerClient(deps.http, deps.settings.bouncer),
            cfg=cfg,
            limiter=RateLimiter(deps.db, cfg),
        )


def batch_name(batch_id: int) -> str:
    """The ``name`` sent with every e-mail of our batch ``batch_id``; Bouncer echoes it in
    each result, so a result always says which of our batches it answers."""
    return f"imsys:{batch_id}"
