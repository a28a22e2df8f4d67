"""A subscriber's sync state says what is happening (seed 001, Phase 5): `syncing` while
a job works on it, `retrying` with the attempt, the next try's time and the last error
while retries remain, `error` only when none will come; `Retry` marks it `pending` at
once. Real engine, Redis, PostgreSQL, the RouterOS simulator."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from imsys.settings import Settings
from imsys.sync import batch
from imsys.sync.service import request_sync
from tests.sync_support import Stack
from tests.test_sync_faults import run_engine_until


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Retries a moment apart, so the last attempt comes within the test."""
    streams = dict(settings.streams)
    streams["sync"] = streams["sync"].model_copy(update={"backoff": [0.3, 0.3]})
    return settings.model_copy(update={"streams": streams})


async def failures(stack: Stack, sid: int) -> list[dict[str, Any]]:
    out = []
    for _, fields in await stack.deps.redis.xrange(stack.deps.events.key):
        payload = orjson.loads(fields["payload"])
        if fields["type"] == "subscriber_sync_failed" and payload["subscriber_id"] == sid:
            out.append(payload)
    return out


async def test_syncing_while_its_job_works(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the job reads the router, the subscriber shows `syncing`; then `synced`."""
    sid = await stack.add_subscriber("busy")
    seen: list[str] = []
    original = batch.find_entries

    async def look(ros: Any, items: Any, tag: str) -> None:
        seen.append((await stack.subscriber(sid))["sync_status"])
        await original(ros, items, tag)

    monkeypatch.setattr(batch, "find_entries", look)
    assert (await stack.subscriber(sid))["sync_status"] == "pending"
    await stack.settle()
    assert seen == ["syncing"]
    assert (await stack.subscriber(sid))["sync_status"] == "synced"


async def test_retrying_until_the_last_attempt_then_error(stack: Stack) -> None:
    """A session that survives every kick: `retrying` after each failed attempt while
    attempts remain (tests/test_sync.py checks the row's attempt, next try and reason),
    `error` with the job dead-lettered after the last; the backend hears the same
    states."""
    sid = await stack.add_subscriber("stubborn")
    await stack.settle()
    stack.sim.connect_session("stubborn")
    stack.sim.sessions_survive_remove = True
    await stack.patch(sid, is_suspended=True)

    async def dead() -> bool:
        return await stack.engine.dead_letters.count() == 1

    await run_engine_until(stack, dead, timeout=30)
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "error"
    assert row["sync_attempt"] == 3
    assert row["next_sync_at"] is None
    events = await failures(stack, sid)
    assert [e["status"] for e in events] == ["retrying", "retrying", "error"]
    assert [e["attempt"] for e in events] == [1, 2, 3]
    assert events[0]["next_attempt_at"] is not None
    assert events[2]["next_attempt_at"] is None


async def test_retrying_while_the_router_is_away(stack: Stack) -> None:
    """A router that does not answer: `retrying` with the reason and the next try (no
    attempt spent), then `synced` once it is back."""
    sid = await stack.add_subscriber("away")
    await stack.sim.refuse_connections(True)
    await stack.relay.relay_once()
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "retrying"
    assert row["next_sync_at"] is not None
    assert "connect" in row["sync_error"]
    await stack.sim.refuse_connections(False)
    await stack.settle()
    assert (await stack.subscriber(sid))["sync_status"] == "synced"


async def test_retry_marks_the_subscriber_pending_at_once(stack: Stack) -> None:
    """`Retry` (POST /api/subscribers/{id}/sync) shows `pending` before its job runs."""
    sid = await stack.add_subscriber("again")
    await stack.db.execute(
        "UPDATE subscribers SET sync_status = 'error', sync_error = 'x' WHERE id = $1", sid
    )
    await request_sync(stack.db, sid, "test:retry")
    assert (await stack.subscriber(sid))["sync_status"] == "pending"
    await stack.settle()
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
