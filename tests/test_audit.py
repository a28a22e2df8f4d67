"""Audit before acting: each router command's row is written before the command and
completed after it, so a kill in between leaves 'unknown outcome', never no row."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from imsys.network import models, service
from imsys.sim.routeros_state import Write
from tests.conftest import subprocess_env
from tests.sync_support import Stack
from tests.test_sync_processes import SERVICE_ENV, Service

SECRET = "/ppp/secret"


async def rows(stack: Stack, subscriber_id: int) -> list[tuple[str, str, str, bool]]:
    found = await stack.db.fetch(
        """
        SELECT correlation_id, action, outcome, completed_at IS NOT NULL AS completed
        FROM audit_log WHERE subscriber_id = $1 ORDER BY id
        """,
        subscriber_id,
    )
    return [(r["correlation_id"], r["action"], r["outcome"], r["completed"]) for r in found]


async def test_normal_run_leaves_ok_rows_one_per_command_and_correlation(stack: Stack) -> None:
    """A sync carrying two changes leaves one completed 'ok' row per command and change,
    and nothing 'unknown'."""
    sid = await stack.add_subscriber("olga")
    await stack.patch(sid, correlation="test:suspend", is_suspended=True)
    await stack.settle()
    create = "test:create:olga"
    assert sorted(await rows(stack, sid)) == sorted(
        [
            (create, f"add {SECRET}", "ok", True),
            ("test:suspend", f"add {SECRET}", "ok", True),
            (create, "remove /ppp/active", "ok", True),
            ("test:suspend", "remove /ppp/active", "ok", True),
            (create, "remove /ip/hotspot/active", "ok", True),
            ("test:suspend", "remove /ip/hotspot/active", "ok", True),
        ]
    )
    unknown = await stack.db.fetchval(
        "SELECT count(*) FROM audit_log WHERE outcome = 'unknown outcome' AND router_id = $1",
        stack.router_id,
    )
    assert unknown == 0


async def test_refused_command_completes_its_row_as_failed(stack: Stack) -> None:
    """A command the router refuses (a profile with a rate it cannot parse, in a package
    row older than the API's validation) leaves its row 'failed: …'."""
    pkg = await service.create_package(
        stack.db,
        models.PackageIn(
            tenant_id=stack.tenant_id, name="ghost-plan", profile="nowhere", price=1, period_days=30
        ),
    )
    await stack.db.execute(
        "UPDATE packages SET rate_limit = 'tenmegabits' WHERE id = $1", pkg["id"]
    )
    sid = await stack.add_subscriber("pavel", package_id=pkg["id"])
    await stack.relay.relay_once()
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    [(_, action, outcome, completed)] = await rows(stack, sid)
    assert action == "add /ppp/profile"
    assert outcome.startswith("failed: ")
    assert "rate-limit" in outcome
    assert completed
    assert stack.secrets() == {}


async def test_kill_while_a_router_command_is_in_flight_leaves_unknown_outcome(
    isolated_stack: Stack,
) -> None:
    """A service SIGKILLed after sending an add, before its reply, leaves the add on the
    router and its audit row saying 'unknown outcome' (the row came first)."""
    stack = isolated_stack
    sid = await stack.add_subscriber("quinn")
    env = subprocess_env(stack.deps.settings, **SERVICE_ENV)
    victim: list[Service] = []
    rows_when_sent: list[list[tuple[str, str, str, bool]]] = []
    sent = asyncio.Event()

    def kill_on_the_add(write: Write) -> bool:
        if write.command == "add" and victim and not sent.is_set():
            os.kill(victim[0].proc.pid, signal.SIGKILL)  # the write lands; no reply is read
            sent.set()
        return False  # this hook only watches

    stack.sim.drop_after_write(n=1_000, on_item=kill_on_the_add)
    proc = Service(env)
    victim.append(proc)
    try:
        deadline = time.monotonic() + 30
        while not sent.is_set():
            assert proc.proc.poll() is None, proc.output()[-3000:]
            assert time.monotonic() < deadline, proc.output()[-3000:]
            await asyncio.sleep(0.02)
        proc.proc.wait(10)
        rows_when_sent.append(await rows(stack, sid))
    finally:
        stack.sim.reset_faults()
        proc.kill()
    assert [e["name"] for e in stack.sim.items(SECRET)] == ["quinn"]
    [(correlation, action, outcome, completed)] = rows_when_sent[0]
    assert (correlation, action, outcome, completed) == (
        "test:create:quinn",
        f"add {SECRET}",
        "unknown outcome",
        False,
    )
    # Killed while its job worked on it: still `syncing` until recovery runs the job again.
    assert (await stack.subscriber(sid))["sync_status"] == "syncing"
