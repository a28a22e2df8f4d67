"""examples/node: a Node backend (ioredis) enqueues a sync and reads the backend events,
against the real service process (`python -m imsys run`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import pytest
from redis.asyncio import Redis

from imsys.network import models
from imsys.network import service as network
from imsys.streams.keys import Keys
from tests.conftest import ROOT, TEST_REDIS_URL, subprocess_env
from tests.sync_support import Stack
from tests.test_sync_processes import Service

EXAMPLE = ROOT / "examples" / "node"
SCRIPT = "enqueue-and-listen.js"
# The plain service, its timers out of the way: only the Node script's job syncs.
SERVICE_ENV = {
    "IMSYS_HTTP__ENABLED": "false",
    "IMSYS_RECOVERY__ENABLED": "false",
    "IMSYS_ENGINE__READ_BLOCK_MS": "100",
    "IMSYS_SYNC__EXPIRE_EVERY_S": "86400",
    "IMSYS_SYNC__FACTS_EVERY_S": "86400",
    "IMSYS_SYNC__RECONCILE_EVERY_S": "86400",
}


async def no_job(_conn: object, _subscriber_id: int, _correlation: str) -> None:
    """A subscriber written without its sync job: only the Node script queues one."""


async def settle(redis: Redis, keys: Keys, service: Service) -> None:
    """Until the service's start-up work (each timer's first tick: the router's
    reconciliation, the expiry sweep) is done and the sync stream is idle."""
    deadline = time.monotonic() + 60
    while True:
        assert service.proc.poll() is None, service.output()[-3000:]
        assert time.monotonic() < deadline, service.output()[-3000:]
        if await redis.exists(keys.stream("sync")):
            done = {h[1]["type"] for h in await redis.xrange(keys.history)}
            groups = await redis.xinfo_groups(keys.stream("sync"))
            idle = all(g["pending"] == 0 and not g["lag"] for g in groups) and groups
            if {"sync_router", "expire_tenant"} <= done and idle:
                return
        await asyncio.sleep(0.1)


pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (EXAMPLE / "node_modules" / "ioredis").is_dir(),
    reason="node or the example's packages are missing: run `make node-example` "
    "(scripts/node_example.sh)",
)


async def test_node_example_enqueues_a_sync_and_reads_its_event(
    isolated_stack: Stack, redis: Redis
) -> None:
    """The Node script's XADD (type, payload, job_id) is run by the live service: the
    subscriber reaches the router, the history records the job by that job_id, and the
    script reads `subscriber_synced` with a consumer group of its own."""
    stack = isolated_stack
    env = subprocess_env(stack.deps.settings, **SERVICE_ENV)
    service = Service(env)
    keys = stack.engine.keys
    try:
        await settle(redis, keys, service)
        row = await network.create_subscriber(
            stack.db,
            models.SubscriberIn(
                tenant_id=stack.tenant_id,
                router_id=stack.router_ids[0],
                package_id=stack.basic,
                username="node-ann",
                password="pw-node-ann",
                service="pppoe",
            ),
            "test:node-example",
            on_change=no_job,
        )
        sub_id = int(row["id"])
        node = await asyncio.to_thread(
            subprocess.run,
            ["node", SCRIPT, str(sub_id)],
            cwd=EXAMPLE,
            env={
                **env,
                "REDIS_URL": TEST_REDIS_URL,
                "IMSYS_PREFIX": stack.prefix,
                "GROUP": "backend-test",
                "TIMEOUT_MS": "60000",
            },
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert node.returncode == 0, node.stdout + node.stderr + service.output()[-3000:]
        lines = [json.loads(line) for line in node.stdout.splitlines()]
        print(node.stdout)  # the example's output, for the record (pytest -s)
        assert lines[0]["step"] == "enqueued"
        assert lines[0]["job_id"] == f"sync_subscriber:{sub_id}"
        synced = [x for x in lines if x["step"] == "event" and x["type"] == "subscriber_synced"]
        assert synced[0]["payload"]["subscriber_id"] == sub_id
        assert "node-ann" in stack.secrets()
        status = await stack.db.fetchval(
            "SELECT sync_status FROM subscribers WHERE id = $1", sub_id
        )
        assert status == "synced"
        history = await redis.xrange(keys.history)
        ran = [h for h in history if h[1]["job_id"] == f"sync_subscriber:{sub_id}"]
        assert [h[1]["outcome"] for h in ran] == ["done"], history
        groups = {g["name"] for g in await redis.xinfo_groups(keys.backend_events)}
        assert groups == {"backend-test"}  # imsys publishes; only the backend's group reads
    finally:
        service.kill()
