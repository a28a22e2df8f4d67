"""The Bouncer domain's registration: the download handler and, with an API key, timers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import structlog

from imsys.bouncer.context import BouncerContext
from imsys.bouncer.creator import create_batches
from imsys.bouncer.repo import CHECK_TYPES
from imsys.bouncer.results import DOWNLOAD_RESULTS, download_results
from imsys.bouncer.status import check_batches
from imsys.deps import Deps
from imsys.errors import ConfigError
from imsys.streams.timers import TimerFn

log = structlog.get_logger("imsys.bouncer")


def register(deps: Deps) -> None:
    ctx = BouncerContext.from_deps(deps)
    deps.engine.registry.add(DOWNLOAD_RESULTS, partial(download_results, ctx))
    if not deps.settings.bouncer.api_key.get_secret_value():
        # Every call would be refused: user batches are accepted and wait for a key.
        log.info("bouncer_batching_off", reason="bouncer.api_key is empty")
        return
    cfg = deps.settings.bouncer_batching
    if cfg.creating_timeout_s <= deps.settings.bouncer.timeout:
        raise ConfigError(
            "bouncer_batching.creating_timeout_s must exceed bouncer.timeout, or a create"
            " still in flight could be given up and its e-mails sent twice"
        )
    for check_type in CHECK_TYPES:
        deps.engine.add_timer(
            f"bouncer_create_{check_type}", _tick(create_batches, ctx, check_type),
            every=cfg.create_every_s,
        )
        deps.engine.add_timer(
            f"bouncer_status_{check_type}", _tick(check_batches, ctx, check_type),
            every=cfg.status_every_s,
        )


def _tick(
    step: Callable[[BouncerContext, str], Awaitable[object]], ctx: BouncerContext,
    check_type: str,
) -> TimerFn:
    async def tick(_slot: int) -> None:
        await step(ctx, check_type)

    return tick
