"""Job progress: a long job's ``job.progress(done, total, note)`` shows in GET /api/queues
and in ``python -m imsys queues`` while it runs, and is gone once it ends."""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import orjson
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel
from redis.asyncio import Redis

from imsys.http.server import build_app
from imsys.settings import Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry
from tests.conftest import ROOT, subprocess_env

TOKEN = "test-token"


class Download(BaseModel):
    bouncer_batch_id: str


async def imsys_queues(settings: Settings, *args: str) -> str:
    """``python -m imsys queues ARGS`` in a child process, without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imsys",
        "queues",
        *args,
        env=subprocess_env(settings),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_running_job_progress_is_visible(
    redis: Redis, settings: Settings, db: asyncpg.Pool
) -> None:
    """Progress a running job reports reaches the admin API and the CLI, then clears."""
    release = asyncio.Event()
    reported = asyncio.Event()

    async def download(job: Job[Download]) -> None:
        await job.progress(3, 10, "downloading results")
        reported.set()
        await release.wait()
        await job.progress(10, 10, "done")

    registry = Registry()
    registry.register("bouncer", "download_results", Download, download)
    engine = Engine(redis, settings, registry, consumer="progress-test")
    await engine.prepare()
    enqueued = await engine.producer.enqueue(
        "bouncer", "download_results", {"bouncer_batch_id": "b1"}
    )
    running = asyncio.create_task(engine.consumers["bouncer"].process_once(block_ms=100))
    await asyncio.wait_for(reported.wait(), timeout=5)

    app = build_app(engine, redis, db, TOKEN)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/api/queues", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 200
        body = await resp.json()
        [row] = body["progress"]["bouncer"]
        assert row["entry_id"] == enqueued.entry_id
        assert (row["type"], row["done"], row["total"], row["note"]) == (
            "download_results",
            3,
            10,
            "downloading results",
        )
        assert row["consumer"] == "progress-test"
        assert row["updated_at"] <= time.time() * 1000

        text = await imsys_queues(settings)
        assert f"bouncer download_results {enqueued.entry_id}: 3/10  downloading results" in text
        as_json = orjson.loads(await imsys_queues(settings, "--json"))
        assert as_json["progress"]["bouncer"][0]["done"] == 3

        release.set()
        await asyncio.wait_for(running, timeout=5)
        resp = await client.get("/api/queues", headers={"Authorization": f"Bearer {TOKEN}"})
        assert (await resp.json())["progress"]["bouncer"] == []
    assert "download_results" not in await imsys_queues(settings)
