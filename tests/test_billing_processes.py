"""A billing run killed (SIGKILL) half-way through, then restarted."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.conftest import subprocess_env
from tests.sync_support import Stack
from tests.test_sync_processes import SERVICE_ENV, Service

BILLABLE = 60_000


async def test_sigkill_mid_billing_run_leaves_exactly_one_invoice_each(
    isolated_stack: Stack,
) -> None:
    """Killed while generate_bills runs and restarted: every billable subscriber has exactly
    one invoice and one invoice message."""
    s = isolated_stack
    await s.db.execute(
        """
        INSERT INTO subscribers (tenant_id, router_id, package_id, username, password, service,
                                 phone, sync_status)
        SELECT $1, $2, $3, 'bulk' || g, 'pw', 'pppoe', '+2547' || lpad(g::text, 8, '0'), 'synced'
        FROM generate_series(1, $4) AS g
        """,
        s.tenant_id,
        s.router_id,
        s.basic,
        BILLABLE,
    )
    await s.db.execute("ANALYZE subscribers")
    # Reconciliation runs at start-up; with the router out of reach its jobs just wait,
    # which keeps this test about billing.
    await s.db.execute("UPDATE routers SET port = 9 WHERE id = $1", s.router_id)
    env = subprocess_env(
        s.deps.settings,
        **SERVICE_ENV,
        IMSYS_BILLING__BILLS_EVERY_S="3600",
        # Messages wait in the queue: this test is about the invoices and their ledger rows.
        IMSYS_STREAMS__BILLING__CONCURRENCY="1",
        IMSYS_SMS__URL="http://127.0.0.1:9/version1/messaging",
    )
    progress_key = s.engine.keys.progress("billing")
    first = Service(env)
    second: Service | None = None
    try:
        deadline = time.monotonic() + 30
        while not await s.deps.redis.hlen(progress_key):
            assert first.proc.poll() is None, first.output()[-2000:]
            assert time.monotonic() < deadline, "no billing run started: " + first.output()[-2000:]
            await asyncio.sleep(0.005)
        first.proc.send_signal(signal.SIGKILL)  # the run's statement is in flight
        first.proc.wait(10)
        mid = await s.db.fetchval("SELECT count(*) FROM invoices WHERE tenant_id = $1", s.tenant_id)
        assert mid in (0, BILLABLE)  # all or nothing: one transaction
        second = Service(env)
        deadline = time.monotonic() + 90
        while not await s.db.fetchval(
            "SELECT count(*) FROM billing_runs WHERE tenant_id = $1", s.tenant_id
        ):
            assert second.proc.poll() is None, second.output()[-2000:]
            assert time.monotonic() < deadline, "the run never finished: " + second.output()[-2000:]
            await asyncio.sleep(0.1)
        counts = await s.db.fetchrow(
            """
            SELECT (SELECT count(*) FROM invoices WHERE tenant_id = $1) AS invoices,
                   (SELECT count(DISTINCT subscriber_id) FROM invoices
                     WHERE tenant_id = $1) AS invoiced,
                   (SELECT count(*) FROM notifications
                     WHERE tenant_id = $1 AND template = 'invoice') AS messages,
                   (SELECT count(DISTINCT subscriber_id) FROM notifications
                     WHERE tenant_id = $1 AND template = 'invoice') AS messaged
            """,
            s.tenant_id,
        )
        assert dict(counts) == {
            "invoices": BILLABLE,
            "invoiced": BILLABLE,
            "messages": BILLABLE,
            "messaged": BILLABLE,
        }
    finally:
        first.kill()
        if second is not None:
            second.kill()
            Path("/tmp/billing-second.log").write_text(second.output())
