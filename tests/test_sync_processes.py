"""The real service process (`python -m imsys run`) killed in the middle of reconciliation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imsys.sim.routeros_state import Write
from tests.conftest import ROOT, subprocess_env
from tests.sync_support import Stack

SERVICE_ENV = {
    "IMSYS_HTTP__ENABLED": "false",
    "IMSYS_ENGINE__CLAIM_IDLE_S": "1.0",
    "IMSYS_ENGINE__HEARTBEAT_S": "0.25",
    "IMSYS_ENGINE__RECOVER_INTERVAL_S": "0.25",
    "IMSYS_ENGINE__READ_BLOCK_MS": "100",
    "IMSYS_ENGINE__LIMIT_LEASE_S": "1.0",
    "IMSYS_SYNC__ROUTER_TIMEOUT_S": "2",
    "IMSYS_SYNC__CIRCUIT_SCHEDULE_S": "[0.2, 0.4, 1.0]",
    "IMSYS_SYNC__CIRCUIT_MAX_S": "1",
    "IMSYS_SYNC__EXPIRE_EVERY_S": "3600",
    "IMSYS_SYNC__FACTS_EVERY_S": "3600",
    "IMSYS_SYNC__RECONCILE_EVERY_S": "3600",
    "IMSYS_SYNC__OUTBOX_POLL_S": "0.2",
}


class Service:
    def __init__(self, env: dict[str, str]) -> None:
        self.log = Path(tempfile.mkstemp(prefix="imsys-service-", suffix=".log")[1])
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imsys", "run"], env=env, cwd=ROOT,
                stdout=out, stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text()


async def test_sigkill_mid_reconciliation_then_restart_converges(isolated_stack: Stack) -> None:
    """A service killed mid-reconciliation leaves the router half done; after a restart
    every subscriber is on the router exactly once and marked synced."""
    stack = isolated_stack
    await stack.db.execute(
        "UPDATE routers SET max_concurrency = 2 WHERE id = $1", stack.router_id
    )
    ids = [await stack.add_subscriber(f"k{i:03d}") for i in range(120)]
    # Synced in the database, missing on the router: as if deleted by hand.
    await stack.db.execute(
        "UPDATE subscribers SET sync_status = 'synced', synced_version = desired_version"
        " WHERE id = ANY($1)",
        ids,
    )
    await stack.db.execute("DELETE FROM outbox")
    env = subprocess_env(stack.deps.settings, **SERVICE_ENV)
    victim: list[Service] = []
    adds = 0

    def kill_on_30th_add(write: Write) -> bool:
        nonlocal adds
        if write.command == "add":
            adds += 1
            if adds == 30 and victim:
                os.kill(victim[0].proc.pid, signal.SIGKILL)  # mid-write, mid-run
        return False  # never drop: this hook only watches

    stack.sim.drop_after_write(n=10_000, on_item=kill_on_30th_add)
    first = Service(env)
    victim.append(first)
    second: Service | None = None
    try:
        deadline = time.monotonic() + 30
        while first.proc.poll() is None:
            assert time.monotonic() < deadline, f"never reached 30 adds: {first.output()[-2000:]}"
            await asyncio.sleep(0.02)
        present = len(stack.secrets())
        assert 30 <= present < 120, "the kill must land in the middle of the work"
        second = Service(env)

        async def converged() -> bool:
            synced = await stack.db.fetchval(
                "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND sync_status = 'synced'",
                ids,
            )
            return len(stack.secrets()) == 120 and synced == 120

        deadline = time.monotonic() + 60
        while not await converged():
            assert second.proc.poll() is None, second.output()[-3000:]
            assert time.monotonic() < deadline, second.output()[-3000:]
            await asyncio.sleep(0.1)
        entries = stack.sim.items("/ppp/secret")
        assert sorted(e["name"] for e in entries) == [f"k{i:03d}" for i in range(120)]
        assert {e["comment"] for e in entries} == {f"imsys:sub={i}" for i in ids}
        dead = await stack.deps.redis.xrange(stack.engine.keys.dead)
        assert [d for d in dead if "k0" in d[1].get("payload", "")] == []
    finally:
        stack.sim.reset_faults()
        first.kill()
        if second is not None:
            second.proc.send_signal(signal.SIGTERM)
            try:
                assert second.proc.wait(20) == 0
            finally:
                second.kill()
