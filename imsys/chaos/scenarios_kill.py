"""SIGKILL storms while router commands are in flight: every applied command is audited."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter

from imsys.chaos.bed import Bed
from imsys.chaos.process import Service, must, until
from imsys.chaos.report import Row
from imsys.sim.routeros_state import Write

AUDIT_TARGET = "every applied router command has an audit row; 0 lost"


def _key(write: Write) -> tuple[int, str] | None:
    """(subscriber id, audit action) of a write to a managed entry."""
    for item in write.items:
        comment = str(item.get("comment", ""))
        if comment.startswith("imsys:sub="):
            try:
                return int(comment.split("=", 1)[1]), f"{write.command} {write.menu}"
            except ValueError:
                return None
    return None


async def audit_kill(bed: Bed) -> Row:
    """Subscribers queued while the router refuses connections; then the service is killed
    (SIGKILL, from the router's write hook: the command applied, the reply never read)
    again and again, each time restarted, until a last one finishes the work."""
    row = Row("audit_kill", AUDIT_TARGET)
    kills_wanted = bed.n(30, 6)
    n = bed.n(400, 60)
    setup = await bed.service("setup")
    await bed.network(setup)
    sim = bed.sims[0]
    await sim.refuse_connections()
    ids = await bed.subscribers(setup, n, "ak")
    assert bed.db is not None
    db = bed.db

    async def relayed() -> bool:
        return int(await db.fetchval("SELECT count(*) FROM outbox")) == 0

    await must(relayed, 30, "outbox never drained")
    await setup.kill()
    applied: Counter[tuple[int, str]] = Counter()
    victim: list[Service] = []
    budget = [0]

    def watch(write: Write) -> bool:
        key = _key(write)
        if key is not None:
            applied[key] += 1
            budget[0] -= 1
            if budget[0] == 0 and victim and victim[0].alive:
                os.kill(victim[0].pid, signal.SIGKILL)  # right after the write, before !done
        return False  # never drop the reply: this only watches

    async def all_synced() -> bool:
        return (await bed.truth(ids, sim))[0] == n

    sim.drop_after_write(n=10**9, on_item=watch)
    await sim.refuse_connections(False)
    kills = 0
    rng = random.Random(11)
    for k in range(kills_wanted):
        budget[0] = rng.randint(1, 6)
        svc = await bed.service(f"k{k}", start=False, IMSYS_ENGINE__MAX_DELIVERIES="1000")
        victim[:] = [svc]

        async def died(svc: Service = svc) -> bool:
            return not svc.alive

        if await until(died, 20, 0.05) is None:
            if await all_synced():
                break  # no work left to be killed in
        else:
            kills += 1
        await svc.kill()
    victim.clear()
    final = await bed.service("final", IMSYS_ENGINE__MAX_DELIVERIES="1000")
    healed_in = await until(all_synced, bed.t(60, 20), 0.25)
    await final.stop()
    rows = await db.fetch(
        "SELECT subscriber_id, action, outcome FROM audit_log WHERE subscriber_id = ANY($1)",
        ids,
    )
    audited: Counter[tuple[int, str]] = Counter(
        (int(r["subscriber_id"]), str(r["action"])) for r in rows
    )
    missing = sum(max(0, c - audited[k]) for k, c in applied.items())
    unknown = sum(1 for r in rows if "unknown" in str(r["outcome"]))
    done, false, dups = await bed.truth(ids, sim)
    row.lost, row.false_statuses, row.overlapping = n - done, false, dups
    row.measured = (
        f"{kills} kills, {sum(applied.values())} router writes, {missing} without an audit "
        f"row ({unknown} `unknown outcome` rows)"
    )
    if healed_in is None:
        row.notes.append(f"not all {n} synced {bed.t(60, 20):.0f} s after the last kill")
    row.ok = missing == 0 and done == n and false == 0 and dups == 0 and kills > 0
    await asyncio.sleep(0)
    return row
