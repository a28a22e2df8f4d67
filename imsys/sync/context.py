"""What the sync domain works with: the shared dependencies and its own router plumbing.

``Deps`` is what every domain receives; the router pool and the circuit breakers are
sync's alone, so they live here, built by ``SyncContext.build`` when sync registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from imsys.deps import Deps
from imsys.publisher import EventPublisher
from imsys.routeros import RouterPool
from imsys.settings import Settings
from imsys.streams.engine import Engine
from imsys.sync.batcher import SyncBatcher
from imsys.sync.circuit import RouterCircuit


@dataclass(frozen=True, slots=True)
class SyncContext:
    deps: Deps
    routers: RouterPool
    circuit: RouterCircuit
    # This process's per-router batches of sync_subscriber jobs (sync/batcher.py).
    batcher: SyncBatcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        batcher = SyncBatcher(self, self.deps.settings.sync.batch_size)
        object.__setattr__(self, "batcher", batcher)

    @classmethod
    def build(cls, deps: Deps) -> SyncContext:
        """A context with a router pool of its own; ``close`` it when done."""
        return cls(deps, RouterPool(), make_circuit(deps))

    async def close(self) -> None:
        await self.routers.close()

    @property
    def settings(self) -> Settings:
        return self.deps.settings

    @property
    def db(self) -> asyncpg.Pool:
        return self.deps.db

    @property
    def engine(self) -> Engine:
        return self.deps.engine

    @property
    def events(self) -> EventPublisher:
        return self.deps.events


def make_circuit(deps: Deps) -> RouterCircuit:
    """The routers' circuit breakers (state in Redis, shared by every process)."""
    cfg = deps.settings.sync
    return RouterCircuit(
        deps.redis,
        deps.engine.keys,
        schedule=cfg.circuit_schedule_s,
        max_s=cfg.circuit_max_s,
        probe_s=cfg.router_timeout_s * 3,
    )


async def circuit_open(deps: Deps, router_id: int) -> bool:
    """Whether the router's circuit is open (it stopped answering and is left alone)."""
    return bool(await make_circuit(deps).state(router_id))
