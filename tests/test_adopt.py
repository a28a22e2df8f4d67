"""Adopting a router that already has logins, and subscribers blocked by unmanaged twins.

Real Redis and PostgreSQL, the RouterOS simulator, the real librouteros client.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imsys.http import api_network, api_sync
from imsys.http.server import build_app
from imsys.intents import Republisher
from imsys.sync import adopt as adopting
from tests.conftest import ROOT, subprocess_env
from tests.sync_support import Stack

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[web.Request, web.Application]

SECRET = "/ppp/secret"
ACTIVE = "/ppp/active"


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The admin app with the sync routes, served for real on 127.0.0.1."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    api_sync.add_routes(app, stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        yield client


def commands(stack: Stack, since: int = 0) -> Counter[str]:
    """The router commands received since ``since`` (e.g. ``/ppp/secret/set``), counted."""
    return Counter(c.command for c in stack.sim.commands[since:])


def writes(c: Counter[str]) -> Counter[str]:
    verbs = ("/add", "/set", "/remove", "/enable", "/disable", "/unset")
    return Counter({k: v for k, v in c.items() if k.endswith(verbs)})


async def backend_events(stack: Stack, type_: str) -> list[dict[str, Any]]:
    rows = await stack.deps.redis.xrange(stack.engine.keys.backend_events)
    out = []
    for _, fields in rows:
        if fields["type"] == type_:
            out.append(orjson.loads(fields["payload"]))
    return out


async def reconcile(stack: Stack) -> None:
    """One reconciliation of the stack's router, through the stream, its work settled."""
    await stack.engine.producer.enqueue("sync", "sync_router", {"router_id": stack.router_id})
    await stack.settle()


async def test_twin_blocks_the_subscriber_as_a_state_with_the_remedy(stack: Stack) -> None:
    """An unmanaged twin leaves the subscriber 'error' naming 'adopt router N', publishes
    one event with blocked_by, dead-letters nothing, and reconciliation does not re-queue
    it; adopting the router then syncs it without touching the entry's .id."""
    twin_id = stack.sim.add_item(SECRET, name="henry", password="hand", profile="basic")
    sid = await stack.add_subscriber("henry", password="hand")
    await stack.settle()
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "error"
    assert f"adopt router {stack.router_id}" in row["sync_error"]
    assert await stack.engine.dead_letters.list() == []
    [event] = await backend_events(stack, "subscriber_sync_failed")
    assert event["subscriber_id"] == sid
    assert event["blocked_by"] == {"menu": SECRET, "id": twin_id, "name": "henry"}
    assert event["remedy"] == f"adopt router {stack.router_id}"

    seen = len(stack.sim.commands)
    await reconcile(stack)
    assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 0
    assert writes(commands(stack, seen)) == Counter()
    # Nothing but the reconciliation's own reads reached the router: no sync ran again.
    assert commands(stack, seen)[f"{SECRET}/print"] == 1
    assert len(await backend_events(stack, "subscriber_sync_failed")) == 1
    assert (await stack.subscriber(sid))["sync_status"] == "error"
    assert await stack.engine.dead_letters.list() == []

    result = await adopting.adopt(stack.deps, stack.router_id, apply=True)
    assert [m.subscriber_id for m in result.matched] == [sid]
    await stack.settle()
    row = await stack.subscriber(sid)
    assert (row["sync_status"], row["sync_error"]) == ("synced", None)
    [entry] = stack.sim.items(SECRET)
    assert (entry[".id"], entry["comment"]) == (twin_id, f"imsys:sub={sid}")


async def test_redis_losing_its_jobs_does_not_bring_a_blocked_subscriber_back(
    stack: Stack,
) -> None:
    """Re-publication of lost intents skips a blocked subscriber (its state is no lost
    job) but still puts back an unsynced one."""
    stack.sim.add_item(SECRET, name="jabari", password="hand", profile="basic")
    blocked = await stack.add_subscriber("jabari")
    await stack.settle()
    assert (await stack.subscriber(blocked))["sync_status"] == "error"
    waiting = await stack.add_subscriber("zawadi")
    await stack.db.execute("DELETE FROM outbox")  # its job lost with Redis
    await Republisher(stack.deps).republish("sync")
    # The run's other tests share the database: look at this test's two subscribers only.
    key = stack.engine.keys.stream("sync")
    queued = {
        eid: orjson.loads(f["payload"])["subscriber_id"]
        for eid, f in await stack.deps.redis.xrange(key)
    }
    assert waiting in queued.values()
    assert blocked not in queued.values()
    others = [eid for eid, sid in queued.items() if sid != waiting]
    if others:  # other tests' leftovers: their routers are gone, leave them unread
        await stack.deps.redis.xdel(key, *others)
    await stack.settle()
    assert (await stack.subscriber(waiting))["sync_status"] == "synced"
    assert (await stack.subscriber(blocked))["sync_status"] == "error"
    assert len(await backend_events(stack, "subscriber_sync_failed")) == 1


async def test_a_change_to_a_blocked_subscriber_tries_again(stack: Stack) -> None:
    """A blocked subscriber that changes is synced again (and blocked again while the twin
    stays), so a new password or package is never silently ignored."""
    stack.sim.add_item(SECRET, name="ines", password="hand", profile="basic")
    sid = await stack.add_subscriber("ines")
    await stack.settle()
    seen = len(stack.sim.commands)
    await stack.patch(sid, password="new-one")
    await stack.settle()
    # The sync ran: it looked for the twin again (in its one read of the menu).
    assert commands(stack, seen)[f"{SECRET}/print"] >= 1
    assert (await stack.subscriber(sid))["sync_status"] == "error"
    assert len(await backend_events(stack, "subscriber_sync_failed")) == 2
    assert await stack.engine.dead_letters.list() == []


async def test_adopting_500_untagged_secrets(stack: Stack) -> None:
    """300 untagged secrets of subscribers and 200 unknown: the dry run lists 300/200/0;
    applying tags the 300 in place (same .id, nothing kicked or removed, no dead letter);
    importing makes the 200 subscribers; a second sync of everything writes nothing.
    The packages' untagged profiles are adopted too (tagged, the package's rate set)."""
    await stack.db.execute("UPDATE packages SET rate_limit = '10M/10M' WHERE id = $1", stack.basic)
    ids: dict[str, str] = {}
    for i in range(500):
        name = f"u{i:03d}"
        profile = "basic" if i < 400 else "premium"
        # Ten of the subscribers have another password on the router: aligned by the set.
        password = f"old-{name}" if i < 10 else f"pw-{name}"
        ids[name] = stack.sim.add_item(SECRET, name=name, password=password, profile=profile)
    for i in range(0, 300, 30):
        stack.sim.connect_session(f"u{i:03d}", address=f"10.0.0.{i // 30 + 1}")
    for i in range(300):
        await stack.add_subscriber(f"u{i:03d}")
    await stack.settle(timeout=120)
    blocked = await stack.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE router_id = $1 AND sync_status = 'error'",
        stack.router_id,
    )
    assert blocked == 300
    assert await stack.engine.dead_letters.list() == []

    seen = len(stack.sim.commands)
    plan = await adopting.adopt(stack.deps, stack.router_id)
    counts = plan.as_dict()["counts"]
    assert (counts["matched"], counts["unknown"], counts["missing"]) == (300, 200, 0)
    assert counts["profiles"] == 4  # basic and premium, in /ppp/profile and the hotspot's
    assert writes(commands(stack, seen)) == Counter()
    assert sum(1 for m in plan.matched if "password" in m.set) == 10
    assert not any(m.kick for m in plan.matched)

    sessions = {a[".id"] for a in stack.sim.items(ACTIVE)}
    seen = len(stack.sim.commands)
    result = await adopting.adopt(stack.deps, stack.router_id, apply=True)
    assert result.tagged == 300
    await stack.settle(timeout=120)
    assert writes(commands(stack, seen)) == Counter(
        {f"{SECRET}/set": 300, "/ppp/profile/set": 2, "/ip/hotspot/user/profile/set": 2}
    )
    profiles = {p["name"]: p for p in stack.sim.items("/ppp/profile")}
    assert profiles["basic"]["rate-limit"] == "10M/10M"
    assert profiles["basic"]["comment"] == profiles["premium"]["comment"] != ""
    assert {a[".id"] for a in stack.sim.items(ACTIVE)} == sessions
    secrets = stack.secrets()
    assert len(secrets) == 500
    assert all(secrets[n][".id"] == ids[n] for n in ids)
    rows = await stack.db.fetch(
        "SELECT id, username, sync_status FROM subscribers WHERE router_id = $1",
        stack.router_id,
    )
    assert {r["sync_status"] for r in rows} == {"synced"}
    assert all(secrets[r["username"]]["comment"] == f"imsys:sub={r['id']}" for r in rows)
    assert secrets["u000"]["password"] == "pw-u000"
    assert await stack.engine.dead_letters.list() == []

    seen = len(stack.sim.commands)
    result = await adopting.adopt(
        stack.deps,
        stack.router_id,
        apply=True,
        import_unknown=True,
        package_by_profile={"basic": stack.basic, "premium": stack.premium},
    )
    assert (len(result.imported), result.skipped, result.unknown) == (200, [], [])
    await stack.settle(timeout=120)
    assert writes(commands(stack, seen)) == Counter({f"{SECRET}/set": 200})
    imported = await stack.db.fetch(
        """
        SELECT s.username, s.password, s.service, s.sync_status, p.profile
        FROM subscribers s JOIN packages p ON p.id = s.package_id
        WHERE s.router_id = $1 AND s.username >= 'u300'
        """,
        stack.router_id,
    )
    assert len(imported) == 200
    assert {r["sync_status"] for r in imported} == {"synced"}
    assert all(r["password"] == f"pw-{r['username']}" for r in imported)
    assert all(r["service"] == "pppoe" for r in imported)
    assert Counter(r["profile"] for r in imported) == {"basic": 100, "premium": 100}
    secrets = stack.secrets()
    assert all(secrets[n][".id"] == ids[n] for n in ids)
    assert len(secrets) == 500

    # A second sync of every subscriber, and a reconciliation, write nothing.
    seen = len(stack.sim.commands)
    for r in await stack.db.fetch(
        "SELECT id FROM subscribers WHERE router_id = $1", stack.router_id
    ):
        await stack.engine.producer.enqueue("sync", "sync_subscriber", {"subscriber_id": r["id"]})
    await stack.settle(timeout=120)
    await reconcile(stack)
    assert writes(commands(stack, seen)) == Counter()
    assert await stack.engine.dead_letters.list() == []
    again = await adopting.adopt(stack.deps, stack.router_id)
    assert again.as_dict()["counts"] == {
        "matched": 0,
        "unknown": 0,
        "missing": 0,
        "duplicates": 0,
        "profiles": 0,
    }


async def test_adopt_through_the_api(stack: Stack, api: Client) -> None:
    """POST /api/routers/{id}/adopt answers the plan by default and applies on request."""
    stack.sim.add_item(SECRET, name="kofi", password="pw-kofi", profile="basic")
    stack.sim.add_item(SECRET, name="stranger", password="x", profile="default")
    sid = await stack.add_subscriber("kofi")
    await stack.settle()
    await stack.add_subscriber("nobody")  # its sync not run yet: no entry on the router
    url = f"/api/routers/{stack.router_id}/adopt"
    resp = await api.post(url, json={})
    assert resp.status == 200
    body = await resp.json()
    assert [m["subscriber_id"] for m in body["matched"]] == [sid]
    assert [u["name"] for u in body["unknown"]] == ["stranger"]
    assert [m["username"] for m in body["missing"]] == ["nobody"]
    assert all("password" not in u for u in body["unknown"])
    assert stack.secrets()["kofi"].get("comment", "") == ""
    resp = await api.post(url, json={"apply": True})
    assert resp.status == 200
    assert (await resp.json())["tagged"] == 1
    await stack.settle()
    assert stack.secrets()["kofi"]["comment"] == f"imsys:sub={sid}"
    resp = await api.post(url, json={"apply": "perhaps"})
    assert resp.status == 400
    resp = await api.post("/api/routers/999999999/adopt", json={})
    assert resp.status == 404


async def run_cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    """``python -m imsys ARGS`` in a child process (the simulator keeps serving here)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imsys",
        *args,
        env=subprocess_env(stack.deps.settings),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_adopt_from_the_command_line(stack: Stack) -> None:
    """``imsys adopt N`` prints the plan as JSON; ``--apply --import-unknown --package``
    tags the match and imports the unknown login; the router password is never printed."""
    stack.sim.add_item(SECRET, name="ama", password="pw-ama", profile="basic")
    stack.sim.add_item(SECRET, name="yaw", password="yaw-secret", profile="premium")
    sid = await stack.add_subscriber("ama")
    code, out, _ = await run_cli(stack, "adopt", str(stack.router_id))
    assert code == 0
    plan = orjson.loads(out)
    assert (plan["applied"], [m["subscriber_id"] for m in plan["matched"]]) == (False, [sid])
    assert [u["name"] for u in plan["unknown"]] == ["yaw"]
    code, out, err = await run_cli(
        stack,
        "adopt",
        str(stack.router_id),
        "--apply",
        "--import-unknown",
        "--package",
        f"premium={stack.premium}",
    )
    assert code == 0, err
    done = orjson.loads(out)
    assert (done["applied"], done["tagged"], len(done["imported"])) == (True, 2, 1)
    assert "yaw-secret" not in out + err
    assert "pw-ama" not in out + err
    await stack.settle()
    secrets = stack.secrets()
    assert secrets["ama"]["comment"] == f"imsys:sub={sid}"
    assert secrets["yaw"]["comment"] == f"imsys:sub={done['imported'][0]}"
    code, _, err = await run_cli(stack, "adopt", "999999999")
    assert code == 1
    assert "not found" in err


@pytest.mark.parametrize("stack", [False], ids=["no-sensitive"], indirect=True)
async def test_adopting_on_a_router_that_hides_passwords_writes_each_once(stack: Stack) -> None:
    """Through an API user without `sensitive` (passwords not printed), adoption sends
    each password once with its tag and remembers it: the syncs and the reconciliation
    after it write nothing more."""
    sids = []
    for name in ("kamau", "wanjiru", "otieno"):
        stack.sim.add_item(SECRET, name=name, password="old-" + name, profile="basic")
        sids.append(await stack.add_subscriber(name, password="new-" + name))
    await stack.settle()  # blocked by their untagged twins: nothing written
    seen = len(stack.sim.commands)
    result = await adopting.adopt(stack.deps, stack.router_id, apply=True)
    assert sorted(m.subscriber_id for m in result.matched) == sorted(sids)
    assert all("password" in m.set for m in result.matched)
    await stack.settle()  # the adopted subscribers' own syncs
    for sid in sids:
        assert (await stack.subscriber(sid))["sync_status"] == "synced"
        await stack.engine.producer.enqueue("sync", "sync_subscriber", {"subscriber_id": sid})
    await stack.settle()
    await reconcile(stack)
    # Adoption's one set per login (tag and password together), nothing after it (its
    # profile tags are counted elsewhere).
    logins = {k: n for k, n in writes(commands(stack, seen)).items() if k.startswith(SECRET)}
    assert logins == {f"{SECRET}/set": 3}
    assert {e["name"]: e["password"] for e in stack.sim.state.rows(SECRET)} == {
        "kamau": "new-kamau",
        "wanjiru": "new-wanjiru",
        "otieno": "new-otieno",
    }
