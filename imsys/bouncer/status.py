"""The status checker: ask Bouncer how each outstanding batch is doing, and act on it.

Completed → a ``download_results`` job (fire-and-forget; job_id = Bouncer's batch id, so a
batch is never downloaded twice at once). Failed, unknown to Bouncer, or not completed
within ``batch_timeout_s`` → the batch and every user batch in it are marked failed, with
an error log for an operator. A status Bouncer does not document is logged as a warning
each time it is seen and treated as not finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from imsys.bouncer import repo
from imsys.bouncer.context import BouncerContext
from imsys.bouncer.results import DOWNLOAD_RESULTS, download_job_id
from imsys.providers.errors import ProviderError, ProviderRejected

log = structlog.get_logger("imsys.bouncer")

RUNNING = ("queued", "processing")


@dataclass(slots=True)
class StatusResult:
    check_type: str
    checked: int = 0
    completed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    downloads_queued: int = 0
    # Why the cycle ended early, if it did: rate_limit, error.
    stopped: str | None = None


async def check_batches(ctx: BouncerContext, check_type: str) -> StatusResult:
    """One cycle for one check type."""
    result = StatusResult(check_type)
    for batch in await repo.outstanding(ctx.db, check_type):
        if batch.status == "completed":
            # Completed earlier, results not stored yet (the job failed or is queued).
            await _queue_download(ctx, batch, result)
            continue
        if not await ctx.limiter.acquire(check_type, "status"):
            result.stopped = "rate_limit"
            break
        try:
            status = await ctx.client.batch_status(batch.bouncer_batch_id)
        except ProviderRejected as exc:
            if exc.status != 404:
                log.warning("bouncer_status_failed", batch=batch.id, error=str(exc))
                result.stopped = "error"
                break
            await _fail(ctx, batch, "Bouncer does not know this batch (404)", result)
            continue
        except ProviderError as exc:
            # Bouncer is down or limiting us: the other batches would fare no better.
            log.warning("bouncer_status_failed", batch=batch.id, error=str(exc))
            result.stopped = "error"
            break
        result.checked += 1
        await repo.record_status(ctx.db, batch.id, status.status)
        if status.completed:
            if await repo.mark_completed(ctx.db, batch.id):
                result.completed.append(batch.id)
                log.info("bouncer_batch_completed", batch=batch.id,
                         bouncer_batch_id=batch.bouncer_batch_id, check_type=check_type)
                await _queue_download(ctx, batch, result)
        elif status.status == "failed":
            await _fail(ctx, batch, "Bouncer reports the batch failed", result)
        elif batch.age_s > ctx.cfg.batch_timeout_s:
            await _fail(ctx, batch, f"not completed after {ctx.cfg.batch_timeout_s:.0f} s"
                        f" (last status {status.status!r})", result)
        elif status.status not in RUNNING:
            log.warning("bouncer_status_unknown", batch=batch.id,
                        bouncer_batch_id=batch.bouncer_batch_id, status=status.status[:100],
                        age_s=round(batch.age_s))
    await ctx.limiter.prune()
    return result


async def _queue_download(ctx: BouncerContext, batch: repo.Outstanding,
                          result: StatusResult) -> None:
    if batch.download_attempts >= ctx.cfg.max_download_attempts:
        await _fail(ctx, batch, f"results download failed {batch.download_attempts} times",
                    result)
        return
    queued = await ctx.producer.send(
        DOWNLOAD_RESULTS,
        {"bouncer_batch_id": batch.bouncer_batch_id},
        job_id=download_job_id(batch.bouncer_batch_id),
    )
    if not queued.duplicate:
        result.downloads_queued += 1


async def _fail(ctx: BouncerContext, batch: repo.Outstanding, reason: str,
                result: StatusResult) -> None:
    user_batches = await repo.fail_batch(ctx.db, batch.id, reason)
    if user_batches is None:
        return
    result.failed.append(batch.id)
    log.error("bouncer_batch_failed", batch=batch.id, bouncer_batch_id=batch.bouncer_batch_id,
              reason=reason, user_batches=user_batches)
