"""The greedy batch creator: fill every free Bouncer slot with pending e-mails, oldest first.

Each slot goes through intent → call → settlement:

1. intent, committed before any call: a ``bouncer_batches`` row in 'creating' with up to
   ``batch_size`` pending e-mails assigned to it (FIFO over user batches, splitting them
   as needed), and the call recorded in the rate limiter;
2. the create call, every e-mail named ``imsys:<our id>``;
3. settlement: Bouncer's batch id stored ('processing'), or, when the call failed, the
   batch abandoned and its e-mails pending again for the next cycle (no retry now), its
   user batches back to 'queued' unless other batches hold e-mails of theirs.

A failed create does not end the cycle (the seed: "continue with next batch if an
individual API call fails"): the next slot takes *other* pending e-mails, never the ones
just released ("do NOT retry failed batch creation attempts in same cycle"). Only a
failure that every further call would meet too ends it: 429 (rate limited), 402 (no
credit), 401/403 (our key refused), Bouncer not reachable at all.

A create whose answer was lost (``maybe_applied``) is abandoned the same way: Bouncer has
no endpoint listing batches, so its id can never be learnt. That batch may have been
charged, but its e-mails are neither lost (they are pending again) nor stuck, nor counted
twice here: its results could only arrive under an id we never stored, and
``download_results`` ignores ids it does not know. A process that dies between 1 and 3
leaves a 'creating' row: `release_stale` gives it up after ``creating_timeout_s`` (well
past the call's own timeout); if that call's answer still came later, the settlement
finds the row abandoned and the batch is logged as orphaned, its results ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import structlog

from imsys.bouncer import repo
from imsys.bouncer.context import BouncerContext, batch_name
from imsys.providers.errors import (
    OutOfCredits,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)

log = structlog.get_logger("imsys.bouncer")


@dataclass(slots=True)
class CycleResult:
    """What one creator cycle did, for logs and tests."""

    check_type: str
    created: list[int] = field(default_factory=list)
    emails: int = 0
    # Why the cycle ended: capacity, empty, rate_limit, failed (a failure every further
    # call would meet too), or slots (all free slots tried).
    stopped: str = "slots"
    released: int = 0
    # Our ids of the batches whose create failed in this cycle (abandoned).
    failed: list[int] = field(default_factory=list)


async def release_stale(ctx: BouncerContext, check_type: str) -> int:
    """Give up creates still unsettled after ``creating_timeout_s``; e-mails go back."""
    released = 0
    for batch_id in await repo.stale_creating(ctx.db, check_type, ctx.cfg.creating_timeout_s):
        count = await repo.release(
            ctx.db, batch_id, "no settlement within creating_timeout_s (process died?)"
        )
        if count is not None:
            released += count
            log.warning("bouncer_create_given_up", batch=batch_id, check_type=check_type,
                        released=count)
    return released


async def create_batches(ctx: BouncerContext, check_type: str) -> CycleResult:
    """One cycle for one check type: as many batches as free slots, e-mails and rate allow."""
    result = CycleResult(check_type)
    result.released = await release_stale(ctx, check_type)
    for _ in range(ctx.cfg.capacity):
        async with ctx.db.acquire() as conn:
            claim = await repo.claim_batch(
                conn, ctx.limiter, check_type, capacity=ctx.cfg.capacity,
                size=ctx.cfg.batch_size, skip_released_from=result.failed,
            )
        if isinstance(claim, str):
            result.stopped = claim
            break
        sent = await _send(ctx, check_type, claim)
        if sent == "created":
            result.created.append(claim.id)
            result.emails += len(claim.emails)
            continue
        result.failed.append(claim.id)
        if sent == "stop":
            result.stopped = "failed"
            break
    if result.created or result.released or result.failed:
        log.info("bouncer_create_cycle", check_type=check_type, created=len(result.created),
                 emails=result.emails, stopped=result.stopped, released=result.released,
                 failed=len(result.failed))
    return result


def _ends_cycle(exc: ProviderError) -> bool:
    """A failure every further create would meet too, not one of this batch alone."""
    if isinstance(exc, RateLimited | OutOfCredits | ProviderAuthError):
        return True
    # Not reached at all (refused, DNS): no answer, and nothing was sent.
    return isinstance(exc, ProviderUnavailable) and exc.status is None and not exc.maybe_applied


async def _send(
    ctx: BouncerContext, check_type: str, claim: repo.Claimed
) -> Literal["created", "failed", "stop"]:
    """Create the claimed batch at Bouncer and settle the intent: ``created``, or
    ``failed`` (the next slot may go on), or ``stop`` (the cycle should end)."""
    name = batch_name(claim.id)
    started = time.perf_counter()
    try:
        created = await ctx.client.create_batch([(email, name) for email in claim.emails])
    except ProviderError as exc:
        # 429, 402, 5xx, lost answer, refused: no retry in this cycle; the e-mails wait
        # for the next one.
        maybe_charged = isinstance(exc, ProviderUnavailable) and exc.maybe_applied
        released = await repo.release(ctx.db, claim.id, str(exc))
        event = log.error if isinstance(exc, OutOfCredits) else log.warning
        event(
            "bouncer_create_failed",
            batch=claim.id,
            check_type=check_type,
            emails=len(claim.emails),
            error=str(exc),
            http_status=exc.status,
            maybe_charged=maybe_charged,
            released=released,
        )
        return "stop" if _ends_cycle(exc) else "failed"
    if not await repo.settle_created(ctx.db, claim.id, created.batch_id):
        log.error(
            "bouncer_batch_orphaned",
            batch=claim.id,
            bouncer_batch_id=created.batch_id,
            check_type=check_type,
            hint="answered after creating_timeout_s; its e-mails were re-queued and its"
            " results will be ignored",
        )
        return "failed"
    log.info(
        "bouncer_batch_created",
        batch=claim.id,
        bouncer_batch_id=created.batch_id,
        check_type=check_type,
        emails=len(claim.emails),
        user_batches=len(claim.user_batch_ids),
        duplicates=created.duplicates,
        ms=round((time.perf_counter() - started) * 1000, 1),
    )
    return "created"
