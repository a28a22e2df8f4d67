"""The sync domain's registration: its context, job handlers and timers."""

from __future__ import annotations

from functools import partial

from imsys.deps import Deps
from imsys.sync.context import SyncContext
from imsys.sync.handlers import reboot_router, sync_subscriber
from imsys.sync.jobs import (
    EXPIRE_TENANT,
    REBOOT_ROUTER,
    SYNC_PROFILES,
    SYNC_ROUTER,
    SYNC_SUBSCRIBER,
)
from imsys.sync.profile_job import sync_profiles
from imsys.sync.reconcile import (
    all_router_facts,
    enqueue_expiry,
    enqueue_reconciliation,
    expire_tenant,
    sync_router,
)


def register(deps: Deps) -> SyncContext:
    """Build sync's context (its router pool closes with ``deps.closing``) and register."""
    ctx = SyncContext.build(deps)
    deps.closing.push_async_callback(ctx.close)
    reg = deps.engine.registry
    reg.add(SYNC_SUBSCRIBER, partial(sync_subscriber, ctx))
    reg.add(SYNC_ROUTER, partial(sync_router, ctx))
    reg.add(REBOOT_ROUTER, partial(reboot_router, ctx))
    reg.add(SYNC_PROFILES, partial(sync_profiles, ctx))
    reg.add(EXPIRE_TENANT, partial(expire_tenant, ctx))
    cfg = deps.settings.sync

    async def reconcile(_slot: int) -> None:
        await enqueue_reconciliation(ctx)

    async def sweep(_slot: int) -> None:
        await enqueue_expiry(ctx)

    async def facts(_slot: int) -> None:
        await all_router_facts(ctx)

    deps.engine.add_timer("reconcile", reconcile, every=cfg.reconcile_every_s)
    deps.engine.add_timer("expire_sweep", sweep, every=cfg.expire_every_s)
    deps.engine.add_timer("router_facts", facts, every=cfg.facts_every_s)
    return ctx
