"""What ``/metrics`` reads besides the streams: routers from PostgreSQL, channels from Redis.

The engine's metrics know no domain (``imsys/streams/metrics.py``); the admin server,
which knows them all, gathers the domains' states here and hands them over as plain
records, so the ``/metrics`` handler stays a few lines.
"""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from imsys.events.channels import ChannelControl
from imsys.streams.engine import Engine
from imsys.streams.keys import Keys
from imsys.streams.metrics import ChannelState, RouterState


async def router_states(db: asyncpg.Pool) -> list[RouterState]:
    """Every router: whether it answers (None until first reached), its guard and
    whether it is in maintenance."""
    rows = await db.fetch(
        """
        SELECT id, tenant_id, name, online, guard_tripped_at IS NOT NULL AS tripped,
               coalesce(maintenance_until > now(), false) AS maintenance
        FROM routers ORDER BY id
        """
    )
    return [
        RouterState(
            router_id=r["id"],
            tenant_id=r["tenant_id"],
            name=r["name"],
            online=r["online"],
            guard_tripped=r["tripped"],
            maintenance=r["maintenance"],
        )
        for r in rows
    ]


async def channel_states(redis: Redis, keys: Keys) -> list[ChannelState]:
    """Every delivery channel, as the Redis state every process acts on holds it."""
    control = ChannelControl(redis, keys)
    return [
        ChannelState(
            channel=s.service,
            stopped=not s.running,
            out_of_credit_tenants=len(s.out_of_credit),
        )
        for s in await control.statuses()
    ]


def declare_series(engine: Engine) -> None:
    """Every stream this process consumes and every job type registered on it, at 0."""
    engine.metrics.declare({s: engine.registry.types(s) for s in engine.consumers})
