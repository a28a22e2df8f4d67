"""The sync domain's registration: its job handlers and timers."""

from __future__ import annotations

from functools import partial

from imsys.deps import Deps
from imsys.sync.handlers import RouterJob, SyncSubscriber, reboot_router, sync_subscriber
from imsys.sync.reconcile import (
    ExpireTenant,
    all_router_facts,
    enqueue_expiry,
    enqueue_reconciliation,
    expire_tenant,
    sync_router,
)


def register(deps: Deps) -> None:
    reg = deps.engine.registry
    reg.register("sync", "sync_subscriber", SyncSubscriber, partial(sync_subscriber, deps))
    reg.register("sync", "sync_router", RouterJob, partial(sync_router, deps))
    reg.register("sync", "reboot_router", RouterJob, partial(reboot_router, deps))
    reg.register("sync", "expire_tenant", ExpireTenant, partial(expire_tenant, deps))
    cfg = deps.settings.sync

    async def reconcile(_slot: int) -> None:
        await enqueue_reconciliation(deps)

    async def sweep(_slot: int) -> None:
        await enqueue_expiry(deps)

    async def facts(_slot: int) -> None:
        await all_router_facts(deps)

    deps.engine.add_timer("reconcile", reconcile, every=cfg.reconcile_every_s)
    deps.engine.add_timer("expire_sweep", sweep, every=cfg.expire_every_s)
    deps.engine.add_timer("router_facts", facts, every=cfg.facts_every_s)
