"""Reconciliation's load on the router: one print per menu (a login menu limited to the
fields the diff compares), no write of its own but what it removes, and the drift's writes
to heal it — counted on the simulator, which records every sentence it receives."""

from __future__ import annotations

from imsys.sim.routeros_api import CommandRecord
from imsys.sync.reconcile_plan import LOGIN_PROPLIST
from tests.sync_support import Stack

SECRET = "/ppp/secret"
HOTSPOT = "/ip/hotspot/user"
LOGIN_MENUS = (SECRET, HOTSPOT)
PROFILE_MENUS = ("/ppp/profile", "/ip/hotspot/user/profile")
WRITE_VERBS = frozenset({"add", "set", "remove", "unset", "enable", "disable"})


def since(stack: Stack, mark: int) -> list[CommandRecord]:
    return [c for c in stack.sim.commands[mark:] if c.command != "/login"]


def prints(records: list[CommandRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in records:
        path, _, verb = c.command.rpartition("/")
        if verb == "print":
            out[path] = out.get(path, 0) + 1
    return out


def writes(records: list[CommandRecord]) -> list[str]:
    return [c.command for c in records if c.command.rpartition("/")[2] in WRITE_VERBS]


async def reconcile_once(stack: Stack) -> list[CommandRecord]:
    """Run exactly one sync_router job; the commands it sent."""
    mark = len(stack.sim.commands)
    await stack.engine.producer.enqueue(
        "sync", "sync_router", {"router_id": stack.router_id}, job_id="reconcile-reads"
    )
    assert await stack.engine.consumers["sync"].process_once(block_ms=100)
    return since(stack, mark)


async def test_reconciliation_reads_each_menu_once_and_writes_only_the_drift(
    stack: Stack,
) -> None:
    """A router with drift in both login menus, an orphan entry and an unused imsys profile:
    the reconciliation job sends one print per login menu (with a .proplist of the compared
    fields) and one per profile menu, the login menus are not read again to learn which
    profiles are in use, and its only writes remove the orphans; the queued syncs then
    write exactly the drift (2 re-adds, 2 sets), after which the router is as the database
    wants it and another reconciliation writes nothing."""
    pppoe = [await stack.add_subscriber(f"p{i}") for i in range(12)]
    hotspot = [await stack.add_subscriber(f"h{i}", service="hotspot") for i in range(4)]
    await stack.settle()
    secrets = stack.secrets()
    users = {u["name"]: u for u in stack.sim.items(HOTSPOT)}
    # Drift, as a technician makes it in Winbox (straight into the router's state).
    stack.sim.state.execute(SECRET, "remove", {".id": secrets["p3"][".id"]}, [])
    stack.sim.state.execute(HOTSPOT, "remove", {".id": users["h1"][".id"]}, [])
    stack.sim.state.execute(SECRET, "set", {".id": secrets["p7"][".id"], "profile": "premium"}, [])
    stack.sim.state.execute(HOTSPOT, "set", {".id": users["h2"][".id"], "disabled": "yes"}, [])
    stack.sim.add_item(SECRET, name="ghost", password="x", comment="imsys:sub=999999999")
    stack.sim.add_item("/ppp/profile", name="retired", comment="imsys:profile")
    stack.sim.add_item(SECRET, name="neighbour", password="x")  # not imsys's: left alone

    sent = await reconcile_once(stack)

    assert prints(sent) == dict.fromkeys((*LOGIN_MENUS, *PROFILE_MENUS), 1), sent
    for c in sent:
        if c.command in {f"{menu}/print" for menu in LOGIN_MENUS}:
            assert f"=.proplist={','.join(LOGIN_PROPLIST)}" in c.words, c.words
    assert sorted(writes(sent)) == ["/ppp/profile/remove", "/ppp/secret/remove"]
    drifted = {pppoe[3], pppoe[7], hotspot[1], hotspot[2]}
    rows = await stack.db.fetch(
        "SELECT id, sync_status FROM subscribers WHERE id = ANY($1::bigint[])",
        pppoe + hotspot,
    )
    assert {r["id"] for r in rows if r["sync_status"] == "pending"} == drifted

    mark = len(stack.sim.commands)
    await stack.settle()
    assert sorted(writes(since(stack, mark))) == [
        "/ip/hotspot/user/add",
        "/ip/hotspot/user/set",
        "/ppp/secret/add",
        "/ppp/secret/set",
    ]
    secrets = stack.secrets()
    users = {u["name"]: u for u in stack.sim.items(HOTSPOT)}
    assert sorted(secrets) == sorted([*(f"p{i}" for i in range(12)), "neighbour"])
    assert sorted(users) == [f"h{i}" for i in range(4)]
    assert secrets["p7"]["profile"] == "basic"
    assert users["h2"]["disabled"] == "false"
    assert "retired" not in {p["name"] for p in stack.sim.items("/ppp/profile")}
    statuses = await stack.db.fetch(
        "SELECT DISTINCT sync_status FROM subscribers WHERE id = ANY($1::bigint[])",
        pppoe + hotspot,
    )
    assert [r["sync_status"] for r in statuses] == ["synced"]

    again = await reconcile_once(stack)
    assert writes(again) == []
    assert prints(again) == dict.fromkeys((*LOGIN_MENUS, *PROFILE_MENUS), 1)
    assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 0
