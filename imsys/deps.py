"""The dependencies every domain receives: built once at start-up, typed, frozen."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import aiohttp
import asyncpg
from redis.asyncio import Redis

from imsys.publisher import EventPublisher
from imsys.settings import Settings
from imsys.streams.engine import Engine


@dataclass(frozen=True)
class Deps:
    settings: Settings
    redis: Redis
    db: asyncpg.Pool
    engine: Engine
    http: aiohttp.ClientSession
    events: EventPublisher
    # What a domain's own context holds open (sync's router pool): each domain pushes
    # its closing here when it registers; the owner of ``Deps`` closes it at shutdown.
    closing: AsyncExitStack = field(default_factory=AsyncExitStack)
