"""One subscriber's run inside a per-router sync batch (``sync/batch.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imsys.errors import FencedOut
from imsys.routeros.menus import LOGIN_BY_SERVICE
from imsys.sync import repo
from imsys.sync.batcher import Pending
from imsys.sync.context import SyncContext
from imsys.sync.desired import Plan
from imsys.sync.handlers import Auditor


@dataclass(eq=False)
class Item:
    """One subscriber's run inside the batch."""

    pending: Pending
    sub: repo.SubscriberRow
    entries: dict[str, str] | None  # menu -> the router's .id, as the database knew them
    managed: dict[str, list[dict[str, str]]] = field(
        default_factory=lambda: {m: [] for m in LOGIN_BY_SERVICE.values()}
    )
    steps: Plan | None = None
    twin: dict[str, str] | None = None
    error: Exception | None = None
    kicked: bool = False
    password_digest: str | None = None
    _correlations: list[str] | None = None

    @property
    def job(self) -> Any:
        return self.pending.job

    @property
    def alive(self) -> bool:
        return self.error is None and self.twin is None

    def correlations(self) -> list[str]:
        if self._correlations is None:
            own = self.job.payload.correlation_id or f"job:{self.job.id}"
            self._correlations = list(dict.fromkeys([*self.sub.correlations, own]))
        return self._correlations

    def auditor(self, ctx: SyncContext) -> Auditor:
        return Auditor(
            ctx,
            self.job,
            correlations=self.correlations(),
            cause=self.job.payload.cause,
            tenant_id=self.sub.tenant_id,
            router_id=self.sub.router_id,
            subscriber_id=self.sub.id,
        )

    def learnt(self) -> dict[str, str]:
        """The router's ids of this subscriber's entries, as last seen in this run."""
        return {menu: rows[0][".id"] for menu, rows in self.managed.items() if rows}


async def fence_items(items: list[Item]) -> None:
    """Check each job's claim before its writes; a job that lost it sends nothing."""
    for i in items:
        try:
            await i.job.ensure_current()
        except FencedOut as exc:
            i.error = exc
