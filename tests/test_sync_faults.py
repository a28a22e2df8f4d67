"""Router sync under faults: outages, lost replies, hand edits, silent routers, mass cuts."""

from __future__ import annotations

import asyncio
import time

from imsys.network import service
from imsys.sim.routeros_state import Write
from imsys.sync.reconcile import router_facts
from imsys.sync.repo import load_router
from tests.sync_support import Stack, past

SECRET = "/ppp/secret"


async def reconcile(stack: Stack) -> None:
    """What the 15-minute timer does, for this test's router only (the database is shared)."""
    await stack.engine.producer.enqueue(
        "sync",
        "sync_router",
        {"router_id": stack.router_id},
        job_id=f"sync_router:{stack.router_id}",
    )


async def sweep(stack: Stack) -> None:
    """What the expiry timer does, for this test's tenant only."""
    await stack.engine.producer.enqueue("sync", "expire_tenant", {"tenant_id": stack.tenant_id})


def hand_edit(stack: Stack, verb: str, **args: str) -> None:
    """A technician's change in Winbox: straight into the router's state, no API client."""
    stack.sim.state.execute(SECRET, verb, args, [])


async def run_engine_until(stack: Stack, check, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Run the real engine (readers, promoter, recovery) and relay until ``check`` holds."""
    engine = stack.engine
    # Timers work on the whole (shared) test database; these tests are about the jobs.
    engine.timers.clear()
    runner = asyncio.create_task(engine.run())
    relay = asyncio.create_task(stack.relay.run(engine.stopping))
    try:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached while the engine ran")
            await asyncio.sleep(0.05)
    finally:
        engine.stop()
        await asyncio.wait_for(asyncio.gather(runner, relay), 15)


async def test_outage_scenario_all_subscribers_end_synced(stack: Stack) -> None:
    """The seed's outage: #50's write lands, its reply is lost, the router stays down a
    while: all 100 end synced and disabled, no 'already exists', no dead letter, no
    guard tripped by the reconciliation that heals the router when it is back."""
    ids = [await stack.add_subscriber(f"user{i:03d}") for i in range(1, 101)]
    await stack.settle()
    assert len(stack.secrets()) == 100
    dropped = asyncio.Event()

    def on_item(write: Write) -> bool:
        hit = any(item.get("name") == "user050" for item in write.items)
        if hit:
            dropped.set()
        return hit

    stack.sim.drop_after_write(on_item=on_item)

    async def outage() -> None:
        await dropped.wait()
        await stack.sim.go_down(2.0)

    outage_task = asyncio.create_task(outage())
    for sid in ids:
        await stack.patch(sid, is_suspended=True, correlation="test:outage")

    async def all_synced() -> bool:
        n = await stack.db.fetchval(
            "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND sync_status = 'synced'"
            " AND is_suspended",
            ids,
        )
        return bool(n == 100)

    await run_engine_until(stack, all_synced)
    await outage_task
    assert dropped.is_set()
    assert all(e["disabled"] == "true" for e in stack.secrets().values())
    assert await stack.engine.dead_letters.count() == 0
    errors = await stack.db.fetchval(
        "SELECT count(*) FROM audit_log WHERE correlation_id = 'test:outage'"
        " AND outcome ILIKE '%already%'"
    )
    assert errors == 0
    lost = await stack.db.fetchval(
        "SELECT count(*) FROM audit_log WHERE correlation_id = 'test:outage'"
        " AND outcome LIKE 'unknown: connection lost%'"
    )
    assert lost >= 1  # #50's write; others in flight when the router went down may add to it
    router = await service.get_router(stack.db, stack.router_id)
    assert router["online"] is True
    # Back from offline, the router was reconciled at once; the suspensions still on
    # their way have jobs of their own, so the guard did not count them as cuts.
    assert router["guard_tripped_at"] is None


async def test_reconciliation_repairs_hand_edits_and_leaves_unmanaged_alone(stack: Stack) -> None:
    """Re-enabled by hand → disabled again; deleted by hand → re-created; foreign entries stay;
    managed entries the database does not know are removed."""
    suspended = await stack.add_subscriber("sam", is_suspended=True)
    deleted = await stack.add_subscriber("tess")
    await stack.settle()
    secrets = stack.secrets()
    hand_edit(stack, "set", **{".id": secrets["sam"][".id"], "disabled": "false"})
    hand_edit(stack, "remove", **{".id": secrets["tess"][".id"]})
    stack.sim.add_item(SECRET, name="neighbour", password="x", profile="default")
    stack.sim.add_item(
        SECRET, name="ghost", password="x", profile="basic", comment="imsys:sub=999999999"
    )
    writes_before = sum(stack.sim.writes.values())
    await reconcile(stack)
    await stack.settle()
    after = stack.secrets()
    assert after["sam"]["disabled"] == "true"
    assert after["tess"]["comment"] == f"imsys:sub={deleted}"
    assert after["neighbour"]["password"] == "x"
    assert "ghost" not in after
    assert sum(stack.sim.writes.values()) - writes_before == 3  # disable, add, remove ghost
    assert (await stack.subscriber(suspended))["sync_status"] == "synced"


async def test_plan_is_a_dry_run(stack: Stack) -> None:
    """The plan lists what reconciliation would change and changes nothing."""
    from imsys.sync.reconcile import build_plan
    from imsys.sync.repo import load_router

    sid = await stack.add_subscriber("uma")
    await stack.settle()
    hand_edit(stack, "set", **{".id": stack.secrets()["uma"][".id"], "profile": "premium"})
    writes = sum(stack.sim.writes.values())
    result = (await build_plan(stack.sync, await load_router(stack.db, stack.router_id))).as_dict()
    assert result["changes"] == [
        {
            "subscriber_id": sid,
            "commands": [
                {
                    "action": "set",
                    "menu": SECRET,
                    "id": stack.secrets()["uma"][".id"],
                    "fields": {"profile": "basic"},
                }
            ],
        }
    ]
    assert result["guard"] is None
    assert sum(stack.sim.writes.values()) == writes


async def test_mass_disconnect_guard_stops_sweep_until_confirmed(stack: Stack) -> None:
    """A sweep that would cut off most of a router stops, changes nothing, until confirmed."""
    ids = [await stack.add_subscriber(f"v{i}", expires_at=past(3600)) for i in range(6)]
    keep = [await stack.add_subscriber(f"w{i}") for i in range(2)]
    await stack.settle()
    await sweep(stack)
    await stack.settle()
    router = await service.get_router(stack.db, stack.router_id)
    assert router["guard_tripped_at"] is not None
    assert "would cut off 6 of 8" in router["guard_reason"]
    assert not any(e["disabled"] == "true" for e in stack.secrets().values())
    suspended = await stack.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND is_suspended", ids
    )
    assert suspended == 0

    await service.confirm_guard(stack.db, stack.router_id, 60)
    await sweep(stack)
    await stack.settle()
    secrets = stack.secrets()
    assert all(secrets[f"v{i}"]["disabled"] == "true" for i in range(6))
    assert all(secrets[f"w{i}"]["disabled"] == "false" for i in range(2))
    assert len(keep) == 2


async def test_expiry_sweep_respects_grace_and_utc(stack: Stack) -> None:
    """Only subscribers past expires_at plus the tenant's grace are suspended."""
    await stack.db.execute(
        "UPDATE tenants SET grace_period = interval '1 hour' WHERE id = $1", stack.tenant_id
    )
    late = await stack.add_subscriber("x1", expires_at=past(7200))
    in_grace = await stack.add_subscriber("x2", expires_at=past(600))
    for i in range(8):
        await stack.add_subscriber(f"x-other{i}")
    await stack.settle()
    await sweep(stack)
    await stack.settle()
    assert (await stack.subscriber(late))["is_suspended"] is True
    assert (await stack.subscriber(in_grace))["is_suspended"] is False
    assert stack.secrets()["x1"]["disabled"] == "true"
    assert stack.secrets()["x2"]["disabled"] == "false"


async def test_down_router_defers_jobs_without_spending_attempts(stack: Stack) -> None:
    """While the router refuses connections, its jobs wait (attempt stays 1), then resume."""
    sid = await stack.add_subscriber("yara")
    await stack.sim.refuse_connections(True)
    await stack.relay.relay_once()
    for _ in range(4):
        await stack.engine.consumers["sync"].process_once(block_ms=10)
        await asyncio.sleep(0.3)
        await stack.engine.promote_once()
    entries = await stack.deps.redis.xrange(stack.engine.keys.stream("sync"))
    delayed = await stack.deps.redis.zrange(stack.engine.keys.delayed("sync"), 0, -1)
    assert len(entries) + len(delayed) == 1
    assert '"attempt","1"' in (delayed[0] if delayed else "") or entries[0][1]["attempt"] == "1"
    router = await service.get_router(stack.db, stack.router_id)
    assert router["online"] is False
    assert (await stack.subscriber(sid))["sync_status"] == "retrying"  # the router is away
    await stack.sim.refuse_connections(False)
    await stack.settle()
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
    assert (await service.get_router(stack.db, stack.router_id))["online"] is True
    assert await stack.engine.dead_letters.count() == 0


async def test_refused_login_holds_jobs_and_shows_why_until_fixed(stack: Stack) -> None:
    """A router that refuses imsys's login (wrong password, untrusted certificate) holds
    its jobs without spending attempts or dead-lettering, shows offline with the reason
    (never the password), and syncs once its settings are fixed."""
    sid = await stack.add_subscriber("zora")
    right = await stack.db.fetchval("SELECT password FROM routers WHERE id = $1", stack.router_id)
    await stack.db.execute(
        "UPDATE routers SET password = 'not-the-password' WHERE id = $1", stack.router_id
    )
    await stack.relay.relay_once()
    for _ in range(3):
        await stack.engine.consumers["sync"].process_once(block_ms=10)
        await asyncio.sleep(0.3)
        await stack.engine.promote_once()
    router = await service.get_router(stack.db, stack.router_id)
    assert router["online"] is False
    assert "PATCH /api/routers/" in router["last_error"]
    assert "not-the-password" not in router["last_error"]
    assert (await stack.subscriber(sid))["sync_status"] == "retrying"  # held, with why
    assert await stack.engine.dead_letters.count() == 0
    await stack.db.execute("UPDATE routers SET password = $2 WHERE id = $1", stack.router_id, right)
    await stack.settle()
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
    assert await stack.engine.dead_letters.count() == 0


async def test_silent_router_does_not_slow_the_others(stack2: Stack) -> None:
    """A router that swallows packets delays only its own subscribers."""
    fast = [await stack2.add_subscriber(f"fast{i}", router=0) for i in range(10)]
    slow = [await stack2.add_subscriber(f"slow{i}", router=1) for i in range(10)]
    stack2.sims[1].stall()

    async def fast_done() -> bool:
        n = await stack2.db.fetchval(
            "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND sync_status = 'synced'", fast
        )
        return bool(n == 10)

    await run_engine_until(stack2, fast_done, timeout=15)
    pending_slow = await stack2.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND sync_status <> 'synced'", slow
    )
    assert pending_slow == 10
    stack2.sims[1].reset_faults()


async def test_router_facts_update_router_and_subscribers(stack: Stack) -> None:
    """The facts pull records version/uptime/cpu and each subscriber's session."""
    sid = await stack.add_subscriber("zoe")
    other = await stack.add_subscriber("zack")
    await stack.settle()
    stack.sim.set_resource(version="7.16.2 (stable)", uptime="1w2d3h4m5s", cpu_load=37)
    stack.sim.connect_session("zoe", address="100.64.0.7", uptime=125.0)
    await router_facts(stack.sync, await load_router(stack.db, stack.router_id))
    router = await service.get_router(stack.db, stack.router_id)
    assert (router["online"], router["version"], router["uptime"], router["cpu_load"]) == (
        True,
        "7.16.2 (stable)",
        "1w2d3h4m5s",
        37,
    )
    zoe = await stack.subscriber(sid)
    assert (zoe["online"], zoe["address"]) == (True, "100.64.0.7")
    assert zoe["uptime"] == "2m5s"
    assert (await stack.subscriber(other))["online"] is False
    await stack.sim.go_down()
    await router_facts(stack.sync, await load_router(stack.db, stack.router_id))
    assert (await service.get_router(stack.db, stack.router_id))["online"] is False
    await stack.sim.come_up()


async def test_reboot_router_job(stack: Stack) -> None:
    """reboot_router reboots (ids change), and the next sync finds entries afresh."""
    sid = await stack.add_subscriber("rita")
    await stack.settle()
    old_id = stack.secrets()["rita"][".id"]
    boots = stack.sim.boots
    await stack.engine.producer.enqueue("sync", "reboot_router", {"router_id": stack.router_id})
    await stack.settle()
    assert stack.sim.boots == boots + 1
    assert stack.secrets()["rita"][".id"] != old_id
    await stack.patch(sid, password="after-reboot")
    await stack.settle()
    assert stack.secrets()["rita"]["password"] == "after-reboot"
