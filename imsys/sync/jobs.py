"""The sync domain's job types: payload, policy and job id, each declared once.

Registration (``sync/domain.py``), the handlers, the outbox rows and every producer
(sync's own timers and heals, the admin API, the demo, other domains) name a sync job by
its spec here. They sit below the handlers rather than beside them because the handlers'
own plumbing enqueues them too (a router back online queues its reconciliation inside
the transaction that records it), and because other domains queue a sync without
importing the router code.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from imsys.streams.job import JobSpec

STREAM = "sync"

# Ids are bigint columns: a larger value can never name a row (a permanent error).
DbId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class SyncSubscriber(BaseModel):
    subscriber_id: DbId
    correlation_id: str | None = None
    cause: str = "api"


class RouterJob(BaseModel):
    router_id: DbId
    correlation_id: str | None = None


class ExpireTenant(BaseModel):
    tenant_id: DbId


# Align one subscriber's router entry with the database (handlers.sync_subscriber).
SYNC_SUBSCRIBER = JobSpec(STREAM, "sync_subscriber", SyncSubscriber)
# Reconcile one router: drift, orphans, the mass-disconnect guard (reconcile.sync_router).
SYNC_ROUTER = JobSpec(STREAM, "sync_router", RouterJob)
# Align one router's package profiles (profile_job.sync_profiles): queued without a job
# id by a package's create, change and delete, so a change never merges into an older
# run that read the package before it.
SYNC_PROFILES = JobSpec(STREAM, "sync_profiles", RouterJob)
# Reboot one router on an operator's request (handlers.reboot_router).
REBOOT_ROUTER = JobSpec(STREAM, "reboot_router", RouterJob)
# Suspend a tenant's expired subscribers (reconcile.expire_tenant).
EXPIRE_TENANT = JobSpec(STREAM, "expire_tenant", ExpireTenant)


def sync_job_id(subscriber_id: int) -> str:
    """One sync per subscriber waits or runs at a time."""
    return f"{SYNC_SUBSCRIBER.name}:{subscriber_id}"


def reconcile_job_id(router_id: int) -> str:
    """The job id of a router's reconciliation: the timer's and a heal's dedupe."""
    return f"{SYNC_ROUTER.name}:{router_id}"


def reboot_job_id(router_id: int) -> str:
    return f"{REBOOT_ROUTER.name}:{router_id}"


def expire_job_id(tenant_id: int) -> str:
    return f"{EXPIRE_TENANT.name}:{tenant_id}"
