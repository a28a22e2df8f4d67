"""The dependencies every domain receives: built once at start-up, typed, frozen."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import asyncpg
from redis.asyncio import Redis

from imsys.publisher import EventPublisher
from imsys.routeros import RouterPool
from imsys.settings import Settings
from imsys.streams.engine import Engine
from imsys.sync.circuit import RouterCircuit


@dataclass(frozen=True)
class Deps:
    settings: Settings
    redis: Redis
    db: asyncpg.Pool
    engine: Engine
    http: aiohttp.ClientSession
    routers: RouterPool
    circuit: RouterCircuit
    events: EventPublisher
