"""Active tenants (seed 001: the expiry scheduler "finds active tenants").

A tenant switched off (``tenants.active`` false, ``PATCH /api/tenants/{id}``) keeps its
data, but imsys does nothing for it: the timers leave it out (no expiry sweep, no bills,
no reminders, no reconciliation), and a job that still arrives for it (queued before the
switch, or by another producer) is refused with a reason that names the tenant. It goes
to the dead-letter stream, not silently completed: an operator sees what was held back,
and once the tenant is active again replays exactly those jobs (nothing is lost, and
nothing ran for a tenant that should get nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imsys.errors import PermanentError
from imsys.network.errors import Conflict

if TYPE_CHECKING:
    from imsys.db import Executor


class TenantInactive(PermanentError, Conflict):
    """The job's (or request's) tenant is switched off: a dead letter for a job, a 409
    for the admin API."""

    def __init__(self, tenant_id: int) -> None:
        super().__init__(
            f"tenant {tenant_id} is inactive: its jobs are refused"
            f" (PATCH /api/tenants/{tenant_id} {{\"active\": true}}, then replay)"
        )
        self.tenant_id = tenant_id


async def require_active(db: Executor, tenant_id: int) -> None:
    """Raise `TenantInactive` when the tenant is switched off (a missing tenant is the
    caller's own error to report)."""
    if await db.fetchval("SELECT active FROM tenants WHERE id = $1", tenant_id) is False:
        raise TenantInactive(tenant_id)
