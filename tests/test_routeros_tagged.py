"""Tagged commands in flight together (RouterSession.write_many / print_any over
Connection.run_many), against the RouterOS simulator with the real librouteros client:
results per command, a trap or a refused guard failing only its own command, a lost
connection keeping what was answered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from imsys.errors import FencedOut
from imsys.routeros import AlreadyExists, RouterPool, RouterUnavailable
from imsys.routeros.session import OR_TESTS_PER_PRINT, Write
from imsys.sim.routeros import RouterOSSimulator
from tests.test_routeros_adapter import PASSWORD, USER, target_for

SECRET = "/ppp/secret"


@pytest.fixture
async def sim() -> AsyncIterator[RouterOSSimulator]:
    simulator = RouterOSSimulator(username=USER, password=PASSWORD)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def pool() -> AsyncIterator[RouterPool]:
    routers = RouterPool()
    yield routers
    await routers.close()


def add(name: str, guard: Callable[[], None] | None = None) -> Write:
    return Write("add", SECRET, {"name": name, "password": "pw", "profile": "default"}, guard=guard)


async def test_writes_sent_together_each_get_their_own_result(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """Fifty adds in one go: each answered with its own new .id, in order; one that the
    router refuses (the name exists) fails alone; the others are applied."""
    sim.add_item(SECRET, name="taken", password="x", profile="default")
    writes = [add(f"t{i:02d}") for i in range(50)]
    writes.insert(20, add("taken"))
    async with pool.session(target_for(sim)) as ros:
        results = await ros.write_many(writes)
    assert isinstance(results[20], AlreadyExists)
    ids = [r for i, r in enumerate(results) if i != 20]
    assert all(isinstance(r, str) and r.startswith("*") for r in ids)
    on_router = {e["name"]: e[".id"] for e in sim.items(SECRET)}
    assert [on_router[f"t{i:02d}"] for i in range(50)] == ids
    assert {c.connection for c in sim.commands} == {sim.commands[0].connection}


async def test_a_refused_guard_sends_nothing_for_its_write_only(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A write whose guard refuses it (a job that lost its claim) is not sent; the others
    of the same call are."""

    def lost() -> None:
        raise FencedOut("claimed by another process")

    async with pool.session(target_for(sim)) as ros:
        results = await ros.write_many([add("a"), add("b", guard=lost), add("c")])
    assert isinstance(results[1], FencedOut)
    assert sorted(e["name"] for e in sim.items(SECRET)) == ["a", "c"]
    sent = [c.words for c in sim.commands if c.command == f"{SECRET}/add"]
    assert len(sent) == 2


async def test_a_lost_connection_keeps_the_answered_results(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """The router applies the 3rd write and drops the connection: the first two keep their
    ids, the 3rd is 'maybe applied', the rest failed; the connection is replaced."""
    sim.drop_after_write(n=3)
    async with pool.session(target_for(sim)) as ros:
        results = await ros.write_many([add(f"l{i}") for i in range(6)])
        assert all(isinstance(r, str) for r in results[:2])
        assert all(isinstance(r, RouterUnavailable) for r in results[2:])
        third = results[2]
        assert isinstance(third, RouterUnavailable)
        assert third.maybe_applied
        assert await ros.print(SECRET, where={"name": "l0"})  # a new connection
    assert {e["name"] for e in sim.items(SECRET)} >= {"l0", "l1", "l2"}


async def test_print_any_ors_names_and_ids_across_several_prints(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """More tests than one print carries go in several prints sent together; every row
    matching any test comes back once, rows matching none do not."""
    total = 2 * OR_TESTS_PER_PRINT + 100
    ids = {
        f"p{i:03d}": sim.add_item(SECRET, name=f"p{i:03d}", password="x", profile="default")
        for i in range(total)
    }
    wanted = [("name", f"p{i:03d}") for i in range(0, total, 2)]
    wanted.append((".id", ids["p001"]))
    wanted.append(("name", "p000"))  # the same row twice
    wanted.append(("name", "nobody"))
    async with pool.session(target_for(sim)) as ros:
        rows = await ros.print_any(SECRET, wanted, proplist=[".id", "name"])
    names = sorted(r["name"] for r in rows)
    expected = sorted({f"p{i:03d}" for i in range(0, total, 2)} | {"p001"})
    assert names == expected
    assert all(set(r) == {".id", "name"} for r in rows)
    prints = [c for c in sim.commands if c.command == f"{SECRET}/print"]
    assert len(prints) == 2
