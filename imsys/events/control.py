"""``service_control`` jobs: start, stop, restart or ask about a delivery channel.

Each one answers with a ``service_status`` backend event carrying the state Redis holds
afterwards (the truth every process acts on), so the backend needs no reply channel.
"""

from __future__ import annotations

from typing import Literal

import structlog
from pydantic import BaseModel, Field

from imsys.backoff import REDIS_DOWN
from imsys.errors import RetryableError
from imsys.events.channels import Channel, ChannelControl, ServiceState
from imsys.events.context import EventsContext
from imsys.streams.job import Job, JobSpec

log = structlog.get_logger("imsys.events")


class ServiceControl(BaseModel):
    """``{"action", "service"}`` (DESIGN.md); ``requested_by`` optionally names the operator."""

    action: Literal["start", "stop", "restart", "status"]
    service: Channel
    requested_by: str | None = Field(default=None, min_length=1, max_length=200)
    # ``start`` with a tenant: end only that tenant's out-of-credit stop.
    tenant_id: int | None = Field(default=None, gt=0)


SERVICE_CONTROL = JobSpec("events", "service_control", ServiceControl)


async def service_control(ctx: EventsContext, job: Job[ServiceControl]) -> None:
    p = job.payload
    by = p.requested_by or f"{job.type} job {job.job_id or job.id}"
    # A stale delivery must not flip a channel the current one may already have set.
    await job.ensure_current()
    try:
        state = await _apply(ctx.channels, p, by)
    except REDIS_DOWN as exc:
        raise RetryableError(f"Redis unavailable for service {p.service}: {exc}") from exc
    await ctx.events.publish(
        "service_status", {**state.as_dict(), "action": p.action, "job_id": job.job_id}
    )
    log.info(
        "service_controlled",
        action=p.action,
        service=p.service,
        state=state.state,
        changed=state.changed,
        by=by,
    )


async def _apply(channels: ChannelControl, p: ServiceControl, by: str) -> ServiceState:
    if p.action == "status":
        return await channels.status(p.service)
    if p.action == "restart":
        return await channels.restart(p.service, by)
    if p.action == "stop":
        return await channels.stop(p.service, by)
    return await channels.start(p.service, by, p.tenant_id)
