"""Sync through an API user without the `sensitive` policy: the router prints no passwords,
so imsys writes a password only when the digest of the one it last wrote differs."""

from __future__ import annotations

import pytest

from imsys.routeros import RouterTarget
from imsys.routeros.menus import PPP_SECRET
from imsys.sync import repo
from imsys.sync.desired import password_digest
from imsys.sync.handlers import router_target
from tests.sync_support import Stack


async def reconcile(stack: Stack) -> None:
    await stack.engine.producer.enqueue("sync", "sync_router", {"router_id": stack.router_id})
    await stack.settle()


async def router_writes(stack: Stack) -> int:
    return sum(stack.sim.writes.values())


@pytest.mark.parametrize("stack", [False], ids=["no-sensitive"], indirect=True)
async def test_hundred_subscribers_then_reconciliation_writes_nothing(stack: Stack) -> None:
    """100 subscribers sync with their passwords although none is printed; a second
    reconciliation sends no write, and the database keeps digests, not passwords."""
    ids = [
        await stack.add_subscriber(
            f"ns{i:03}", password=f"secret-{i}", service="hotspot" if i % 4 == 0 else "pppoe"
        )
        for i in range(100)
    ]
    await stack.settle(timeout=60)
    rows = await stack.db.fetch(
        "SELECT id, sync_status, router_password_hash FROM subscribers WHERE id = ANY($1)", ids
    )
    assert {r["sync_status"] for r in rows} == {"synced"}
    for r in rows:
        i = ids.index(r["id"])
        assert r["router_password_hash"] == password_digest(r["id"], f"secret-{i}")
    truth = {e["name"]: e for e in stack.sim.items(PPP_SECRET)}
    truth |= {e["name"]: e for e in stack.sim.items("/ip/hotspot/user")}
    assert all(truth[f"ns{i:03}"]["password"] == f"secret-{i}" for i in range(100))
    async with stack.sync.routers.session(await _target(stack)) as ros:
        printed = await ros.print(PPP_SECRET)
    assert len(printed) == 75
    assert all("password" not in row for row in printed)

    before = await router_writes(stack)
    await reconcile(stack)
    await reconcile(stack)
    assert await router_writes(stack) == before
    statuses = await stack.db.fetch("SELECT sync_status FROM subscribers WHERE id = ANY($1)", ids)
    assert {r["sync_status"] for r in statuses} == {"synced"}


@pytest.mark.parametrize("stack", [False], ids=["no-sensitive"], indirect=True)
async def test_changed_password_is_written_once(stack: Stack) -> None:
    """A new password is sent in one set although the router hides the old one; syncing
    again sends nothing."""
    sid = await stack.add_subscriber("nina", password="first")
    await stack.settle()
    before = await router_writes(stack)
    await stack.patch(sid, password="second")
    await stack.settle()
    assert stack.secrets()["nina"]["password"] == "second"
    assert await router_writes(stack) == before + 1
    await stack.engine.producer.enqueue("sync", "sync_subscriber", {"subscriber_id": sid})
    await stack.settle()
    await reconcile(stack)
    assert await router_writes(stack) == before + 1


@pytest.mark.parametrize("stack", [False, True], ids=["no-sensitive", "sensitive"], indirect=True)
async def test_unrecorded_password_is_decided_by_what_the_router_shows(stack: Stack) -> None:
    """With no digest on record (an entry synced before imsys kept them), a router that
    hides passwords gets the password once; one that prints it gets no write, and the
    digest is recorded either way."""
    sid = await stack.add_subscriber("olga", password="pw-olga")
    await stack.settle()
    await stack.db.execute("UPDATE subscribers SET router_password_hash = NULL WHERE id = $1", sid)
    before = await router_writes(stack)
    await stack.engine.producer.enqueue("sync", "sync_subscriber", {"subscriber_id": sid})
    await stack.settle()
    expected = before if stack.sim.sensitive else before + 1
    assert await router_writes(stack) == expected
    recorded = await stack.db.fetchval(
        "SELECT router_password_hash FROM subscribers WHERE id = $1", sid
    )
    assert recorded == password_digest(sid, "pw-olga")


async def _target(stack: Stack) -> RouterTarget:
    router = await repo.load_router(stack.db, stack.router_id)
    assert router is not None
    return router_target(stack.sync, router)
