"""Per-router batches of sync_subscriber jobs: one read per menu for a batch, the writes
sent together, one subscriber's failure its own, entries addressed by their router .id
(re-learnt when a reboot renumbered them). Real Redis, PostgreSQL, the real librouteros
client against the RouterOS simulator, the real engine."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from imsys.settings import Settings
from imsys.sync import batch
from tests.sync_support import Stack
from tests.test_sync_faults import run_engine_until

SECRET = "/ppp/secret"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Room for a whole batch in flight, as in production (the suite's default is 10)."""
    streams = dict(settings.streams)
    streams["sync"] = streams["sync"].model_copy(update={"concurrency": 200})
    return settings.model_copy(update={"streams": streams})


def commands(stack: Stack, since: int = 0) -> Counter[str]:
    return Counter(c.command for c in stack.sim.commands[since:])


def writes_named(stack: Stack, name: str, since: int = 0) -> list[str]:
    """The write commands sent for the entry named ``name`` (by its =name= word)."""
    return [
        c.command
        for c in stack.sim.commands[since:]
        if c.command.endswith(("/add", "/set", "/remove")) and f"=name={name}" in c.words
    ]


async def synced(stack: Stack, ids: list[int]) -> int:
    n = await stack.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND sync_status = 'synced'", ids
    )
    return int(n)


async def entries(stack: Stack, sid: int) -> dict[str, str] | None:
    raw = await stack.db.fetchval("SELECT router_entries FROM subscribers WHERE id = $1", sid)
    return None if raw is None else dict(orjson.loads(raw) if isinstance(raw, str) else raw)


async def events_of(stack: Stack, type_: str) -> list[dict[str, Any]]:
    out = []
    for _, fields in await stack.deps.redis.xrange(stack.deps.events.key):
        if fields["type"] == type_:
            out.append(orjson.loads(fields["payload"]))
    return out


async def test_a_batch_reads_each_menu_once_and_writes_each_subscriber_once(stack: Stack) -> None:
    """200 new subscribers of one router: synced in batches (one print of the secrets per
    batch, not three per subscriber), one add each, about one router command per
    subscriber, and each entry's router .id kept for the next change."""
    ids = [await stack.add_subscriber(f"b{i:03d}") for i in range(200)]
    await run_engine_until(stack, lambda: _all(stack, ids), timeout=60)
    c = commands(stack)
    assert c[f"{SECRET}/add"] == 200
    # Batches: far fewer reads than subscribers (one synced alone would read once).
    assert c[f"{SECRET}/print"] <= 40, c
    total = sum(c.values())
    assert total <= 1.2 * 200, c
    on_router = {e["name"]: e[".id"] for e in stack.sim.items(SECRET)}
    for i, sid in enumerate(ids):
        assert await entries(stack, sid) == {SECRET: on_router[f"b{i:03d}"]}
    assert await stack.engine.dead_letters.count() == 0


async def _all(stack: Stack, ids: list[int]) -> bool:
    return await synced(stack, ids) == len(ids)


async def test_one_failed_write_fails_only_its_subscriber(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-made entry appears between the batch's read and its adds: that one add is
    refused; only that subscriber's job is tried again (and then finds the twin and is
    blocked with the remedy); every other subscriber of the batch was added once and is
    synced, with no second run."""
    ids = [await stack.add_subscriber(f"f{i:02d}") for i in range(20)]
    original = batch.find_entries
    appeared: list[str] = []

    async def read_then_hand_edit(ros: Any, items: Any, tag: str) -> None:
        await original(ros, items, tag)
        if not appeared and len(items) > 1:
            appeared.append(stack.sim.add_item(SECRET, name="f07", password="x", profile="default"))

    monkeypatch.setattr(batch, "find_entries", read_then_hand_edit)
    victim = ids[7]

    async def done() -> bool:
        row = await stack.subscriber(victim)
        return await synced(stack, ids) == 19 and "adopt router" in (row["sync_error"] or "")

    await run_engine_until(stack, done, timeout=60)
    assert appeared, "the batch held more than one subscriber"
    for i in range(20):
        name = f"f{i:02d}"
        assert writes_named(stack, name) == [f"{SECRET}/add"], name
    failed = await events_of(stack, "subscriber_sync_failed")
    assert [e["subscriber_id"] for e in failed] == [victim, victim]
    assert "appeared after this sync read the router" in failed[0]["error"]
    assert failed[0]["attempt"] == 1
    assert failed[1]["attempt"] == 2
    assert failed[1]["blocked_by"]["name"] == "f07"
    synced_events = Counter(e["subscriber_id"] for e in await events_of(stack, "subscriber_synced"))
    assert synced_events == Counter({sid: 1 for sid in ids if sid != victim})
    assert await stack.engine.dead_letters.count() == 0
    # Blocked is a final state: the first attempt's retry details are gone.
    row = await stack.subscriber(victim)
    assert (row["sync_status"], row["sync_attempt"], row["next_sync_at"]) == ("error", None, None)
    outcomes = await stack.db.fetch(
        "SELECT outcome FROM audit_log WHERE subscriber_id = $1 ORDER BY id", victim
    )
    assert len(outcomes) == 1
    assert outcomes[0]["outcome"].startswith("failed:")


async def test_stale_ids_after_a_reboot_are_relearnt(stack: Stack) -> None:
    """After a reboot renumbered every entry, the kept .ids name nothing or another
    subscriber's entry: the change is not sent to them; the batch looks its entries up
    by comment once, re-learns their ids, and sets the right entry only."""
    ids = [await stack.add_subscriber(f"r{i:02d}") for i in range(10)]
    await stack.settle()
    before = {e["name"]: dict(e) for e in stack.sim.items(SECRET)}
    await stack.sim.reboot()
    after = {e["name"]: e[".id"] for e in stack.sim.items(SECRET)}
    assert all(after[n] != before[n][".id"] for n in after)
    target = ids[3]
    kept = await entries(stack, target)
    seen = len(stack.sim.commands)
    await stack.patch(target, password="changed-after-reboot")
    await stack.settle()
    assert await synced(stack, [target]) == 1
    # Looked up by its kept id and name first, then (stale) by its comment.
    prints = [c.words for c in stack.sim.commands[seen:] if c.command == f"{SECRET}/print"]
    assert any(f"?.id={kept[SECRET]}" in w for w in prints if kept)
    assert any(f"?comment=imsys:sub={target}" in w for w in prints)
    now = {e["name"]: dict(e) for e in stack.sim.items(SECRET)}
    assert now["r03"]["password"] == "changed-after-reboot"
    for name, entry in now.items():
        if name != "r03":
            assert entry["password"] == before[name]["password"], name
    sets = [c for c in stack.sim.commands[seen:] if c.command == f"{SECRET}/set"]
    assert len(sets) == 1
    assert f"=.id={after['r03']}" in sets[0].words
    assert kept is not None
    assert kept[SECRET] != after["r03"]
    assert await entries(stack, target) == {SECRET: after["r03"]}
    assert commands(stack, seen)[f"{SECRET}/add"] == 0


async def test_entries_of_unknown_ids_are_found_by_comment(stack: Stack) -> None:
    """Subscribers from before the ids were kept (router_entries NULL) are found by their
    comment, not added again; their ids are learnt."""
    ids = [await stack.add_subscriber(f"n{i:02d}") for i in range(5)]
    await stack.settle()
    await stack.db.execute("UPDATE subscribers SET router_entries = NULL WHERE id = ANY($1)", ids)
    for sid in ids:
        await stack.patch(sid, password=f"new-{sid}")
    seen = len(stack.sim.commands)
    await stack.settle()
    assert await synced(stack, ids) == 5
    c = commands(stack, seen)
    assert c[f"{SECRET}/add"] == 0
    assert c[f"{SECRET}/set"] == 5
    on_router = {e["name"]: e[".id"] for e in stack.sim.items(SECRET)}
    for i, sid in enumerate(ids):
        assert await entries(stack, sid) == {SECRET: on_router[f"n{i:02d}"]}
