"""Router sync against the RouterOS simulator, through the real librouteros client."""

from __future__ import annotations

import asyncio

from tests.sync_support import ROS_VERSIONS, SENSITIVITY, Stack

# Every test with and without the `sensitive` policy (passwords not printed, so imsys
# decides by the digest of the password it last wrote), each against RouterOS 6.49 and
# 7.18+ (which answers an empty print with `!empty`).
pytestmark = [SENSITIVITY, ROS_VERSIONS]

SECRET = "/ppp/secret"


async def test_new_subscriber_is_created_on_the_router(stack: Stack) -> None:
    """Creating a subscriber writes desired state + outbox; the sync adds a tagged secret."""
    sid = await stack.add_subscriber("alice", password="1234")
    assert (await stack.subscriber(sid))["sync_status"] == "pending"
    await stack.settle()
    entry = stack.secrets()["alice"]
    assert entry["password"] == "1234"
    assert entry["profile"] == "basic"
    assert entry["disabled"] == "false"
    assert entry["comment"] == f"imsys:sub={sid}"
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "synced"
    assert row["last_synced_at"] is not None
    audit = await stack.db.fetch(
        "SELECT action, outcome FROM audit_log"
        " WHERE correlation_id = 'test:create:alice' AND subscriber_id = $1",
        sid,
    )
    assert [(a["action"], a["outcome"]) for a in audit] == [(f"add {SECRET}", "ok")]


async def test_second_sync_writes_nothing(stack: Stack) -> None:
    """Running sync_subscriber again against an aligned router sends no write."""
    sid = await stack.add_subscriber("bob")
    await stack.settle()
    writes = sum(stack.sim.writes.values())
    await stack.engine.producer.enqueue("sync", "sync_subscriber", {"subscriber_id": sid})
    await stack.settle()
    assert sum(stack.sim.writes.values()) == writes
    assert (await stack.subscriber(sid))["sync_status"] == "synced"


async def test_suspension_disables_and_ends_the_live_session(stack: Stack) -> None:
    """Suspending disables the secret and kicks the active session so it takes effect now."""
    sid = await stack.add_subscriber("carol")
    await stack.settle()
    stack.sim.connect_session("carol", address="10.0.0.9")
    await stack.patch(sid, is_suspended=True)
    await stack.settle()
    assert stack.secrets()["carol"]["disabled"] == "true"
    assert stack.sim.items("/ppp/active") == []
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "synced"
    kick = await stack.db.fetchval(
        "SELECT outcome FROM audit_log WHERE correlation_id = 'test:patch' AND action = $1",
        "remove /ppp/active",
    )
    assert kick == "ok"


async def test_a_session_that_survives_the_kick_is_retried(stack: Stack) -> None:
    """If the session is still there after the kick, the subscriber shows `retrying` with
    the attempt, the next try's time and the reason (not yet `error`: retries remain)."""
    sid = await stack.add_subscriber("dave")
    await stack.settle()
    stack.sim.connect_session("dave")
    stack.sim.sessions_survive_remove = True
    await stack.patch(sid, is_suspended=True)
    await stack.relay.relay_once()
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "retrying"
    assert row["sync_attempt"] == 1
    assert row["next_sync_at"] is not None
    assert "still active after the kick" in row["sync_error"]
    stack.sim.sessions_survive_remove = False
    await stack.settle()
    assert (await stack.subscriber(sid))["sync_status"] == "synced"


async def test_package_change_sets_profile_and_kicks(stack: Stack) -> None:
    """A new package changes the profile and ends the session (new speed now)."""
    sid = await stack.add_subscriber("erin")
    await stack.settle()
    stack.sim.connect_session("erin")
    await stack.patch(sid, package_id=stack.premium)
    await stack.settle()
    assert stack.secrets()["erin"]["profile"] == "premium"
    assert stack.sim.items("/ppp/active") == []


async def test_delete_removes_the_entry(stack: Stack) -> None:
    """Deleting a subscriber removes its managed secret and session."""
    from imsys.network import service
    from imsys.sync.service import subscriber_changed

    sid = await stack.add_subscriber("frank")
    await stack.settle()
    await service.delete_subscriber(stack.db, sid, "test:delete", on_change=subscriber_changed)
    await stack.settle()
    assert "frank" not in stack.secrets()


async def test_hotspot_subscriber_and_service_switch(stack: Stack) -> None:
    """Hotspot users live in /ip/hotspot/user; switching service moves the entry."""
    sid = await stack.add_subscriber("gina", service="hotspot")
    await stack.settle()
    users = {u["name"]: u for u in stack.sim.items("/ip/hotspot/user")}
    assert users["gina"]["comment"] == f"imsys:sub={sid}"
    await stack.patch(sid, service="pppoe")
    await stack.settle()
    assert stack.sim.items("/ip/hotspot/user") == []
    assert "gina" in stack.secrets()


async def test_unmanaged_entry_with_same_name_is_left_alone(stack: Stack) -> None:
    """A hand-made secret with the subscriber's name is never taken over silently: the
    subscriber is blocked ('error', the remedy named), the job completes (no dead letter)."""
    stack.sim.add_item(SECRET, name="henry", password="hand", profile="default")
    sid = await stack.add_subscriber("henry")
    await stack.relay.relay_once()
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "error"
    assert "does not manage" in row["sync_error"]
    assert f"adopt router {stack.router_id}" in row["sync_error"]
    assert stack.secrets()["henry"]["password"] == "hand"
    assert await stack.engine.dead_letters.list() == []


async def test_change_during_sync_is_synced_again(stack: Stack) -> None:
    """A desired change landing mid-sync leaves the subscriber pending, then syncs it."""
    sid = await stack.add_subscriber("ivan", password="first")
    await stack.settle()
    await stack.patch(sid, password="second")
    await stack.relay.relay_once()
    stack.sim.stall()
    seen = len(stack.sim.commands)
    consumer = stack.engine.consumers["sync"]
    run = asyncio.create_task(consumer.process_once(block_ms=10))
    for _ in range(200):
        if any("/ppp/secret/print" in " ".join(c.words) for c in stack.sim.commands[seen:]):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the sync never read the router")
    await stack.patch(sid, password="third")  # lands while the sync is reading the router
    assert (await stack.subscriber(sid))["sync_status"] == "pending"
    stack.sim.unstall()
    await run
    assert (await stack.subscriber(sid))["sync_status"] == "pending"
    await stack.settle()
    assert stack.secrets()["ivan"]["password"] == "third"
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
