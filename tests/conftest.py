"""Shared fixtures: real Redis and PostgreSQL, isolated per test run and per test.

Redis: database 9 (``IMSYS_TEST_REDIS_URL``) and a key prefix unique to each test.
PostgreSQL: a database made fresh for the run (``IMSYS_TEST_DATABASE_URL``), schema applied.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from imsys import logging as imsys_logging
from imsys.db import migrate
from imsys.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TEST_REDIS_URL = os.environ.get("IMSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
TEST_DATABASE_URL = os.environ.get(
    "IMSYS_TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:5432/imsys_test_{os.getpid()}"
)

imsys_logging.configure("warning", json=True)

# The whole-stack fixtures (`stack`, `stack2`) live beside the tests that use them.
pytest_plugins = ["tests.sync_support"]


def _admin_url(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/postgres"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this run, with schema.sql applied; dropped at the end."""
    name = TEST_DATABASE_URL.rsplit("/", 1)[1]

    async def setup() -> None:
        conn = await asyncpg.connect(_admin_url(TEST_DATABASE_URL))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        await migrate(TEST_DATABASE_URL)

    async def teardown() -> None:
        conn = await asyncpg.connect(_admin_url(TEST_DATABASE_URL))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(setup())
    yield TEST_DATABASE_URL
    asyncio.run(teardown())


@pytest.fixture
async def isolated_database(database_url: str, prefix: str) -> AsyncIterator[str]:
    """A database of this test's own, for a service process that must see nothing else."""
    url = f"{database_url}_{prefix}"
    await migrate(url)
    yield url
    conn = await asyncpg.connect(_admin_url(url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def settings(prefix: str, database_url: str) -> Settings:
    """Settings for one test: own key prefix, fast engine timings, no real waits."""
    return Settings(
        redis={"url": TEST_REDIS_URL, "prefix": prefix},
        database={"url": database_url},
        http={"port": 0, "token": "test-token"},
        # Tests share one database: re-publication would pull other tests' intents into
        # this test's streams. tests/test_intents.py turns it on, on a database of its own.
        recovery={"enabled": False},
        engine={
            "read_block_ms": 50,
            "claim_idle_s": 1.0,
            "heartbeat_s": 0.25,
            "recover_interval_s": 0.25,
            "promote_interval_s": 0.05,
            "grace_period_s": 5.0,
        },
        streams={
            "sync": {"concurrency": 10, "max_attempts": 3, "backoff": [0.05, 0.1]},
            "billing": {"concurrency": 10, "max_attempts": 3, "backoff_base": 0.05},
            "events": {"concurrency": 10, "max_attempts": 3, "backoff_base": 0.05},
            "bouncer": {"concurrency": 2, "max_attempts": 1},
        },
    )


@pytest.fixture
async def redis(settings: Settings, prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis.url.get_secret_value(), decode_responses=True)
    yield client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    assert pool is not None
    yield pool
    await pool.close()


def subprocess_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that gives a child process the same settings as this test."""
    env = dict(os.environ)
    env.update(
        {
            "IMSYS_REDIS__URL": settings.redis.url.get_secret_value(),
            "IMSYS_REDIS__PREFIX": settings.redis.prefix,
            "IMSYS_DATABASE__URL": settings.database.url.get_secret_value(),
            "IMSYS_LOG__FORMAT": "json",
            "PYTHONPATH": str(ROOT),
            **extra,
        }
    )
    return env


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
