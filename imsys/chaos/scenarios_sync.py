"""Router sync under chaos: a stopped process, a router or Redis back empty."""

from __future__ import annotations

import asyncio
import signal
import time

from imsys.chaos.bed import Bed
from imsys.chaos.process import must, until
from imsys.chaos.report import Row
from imsys.sim.routeros import RouterOSSimulator
from imsys.sim.routeros_state import Write

SIGSTOP_TARGET = "0 overlapping, 0 false statuses, 0 lost"
ROUTER_EMPTY_TARGET = "healed ≤ 60 s (short: 20 s), 0 false statuses"
REDIS_EMPTY_TARGET = "pending re-published and synced ≤ 60 s (short: 20 s)"


async def _all_healed(
    bed: Bed, ids: list[int], sim: RouterOSSimulator, limit: float
) -> float | None:
    async def check() -> bool:
        for svc in bed.services:
            if svc.proc is not None and svc.proc.returncode not in (None, -9):
                raise RuntimeError(f"service {svc.name} exited: {svc.tail(600)}")
        healed, _, _ = await bed.truth(ids, sim)
        return healed == len(ids)

    return await until(check, limit, 0.25)


def _adds_per_name(sim: RouterOSSimulator, since: int = 0) -> dict[str, int]:
    """Add commands the router received per `/ppp/secret` name (applied or trapped)."""
    counts: dict[str, int] = {}
    for record in sim.commands[since:]:
        if record.words and record.words[0] == "/ppp/secret/add":
            for word in record.words[1:]:
                if word.startswith("=name="):
                    counts[word[6:]] = counts.get(word[6:], 0) + 1
    return counts


async def router_empty(bed: Bed) -> Row:
    """Every subscriber synced; the router is replaced by an empty one on the same port."""
    row = Row("router_empty", ROUTER_EMPTY_TARGET)
    n = bed.n(1000, 60)
    svc = await bed.service("a")
    await bed.network(svc)
    sim = bed.sims[0]
    ids = await bed.subscribers(svc, n, "re")
    if await _all_healed(bed, ids, sim, bed.t(180, 40)) is None:
        healed, _, _ = await bed.truth(ids, sim)
        row.lost = n - healed
        row.measured = f"initial sync of {n} unfinished: {healed} synced on the router"
        return row
    assert bed.db is not None
    db = bed.db

    async def facts_read() -> bool:
        # A router in service has been read at least once (its uptime is the baseline a
        # restart is told by); in --short the initial sync can beat the first reading.
        uptime = await db.fetchval("SELECT uptime FROM routers WHERE id = $1", bed.router_ids[0])
        return uptime is not None

    await must(facts_read, 30, "imsys never read the router's facts")
    port = sim.port
    await sim.stop()
    bed.sims.remove(sim)
    await asyncio.sleep(0.5)
    fresh = await bed.new_sim(port, uptime=None)  # just booted, nothing configured
    bed.sims.append(fresh)
    took = await _all_healed(bed, ids, fresh, bed.t(60, 20))
    healed, false, dups = await bed.truth(ids, fresh)
    row.lost, row.false_statuses, row.overlapping = n - healed, false, dups
    if took is None:
        row.measured = (
            f"{n} subscribers: {healed} healed after {bed.t(60, 20):.0f} s, "
            f"{false} `synced` while absent"
        )
    else:
        row.measured = f"{n} subscribers: all healed in {took:.1f} s"
    row.ok = took is not None and false == 0 and dups == 0
    return row


async def redis_empty(bed: Bed) -> Row:
    """Subscribers created while their router is down; Redis restarted empty, router back."""
    row = Row("redis_empty", REDIS_EMPTY_TARGET)
    n = bed.n(300, 30)
    svc = await bed.service("a")
    await bed.network(svc)
    sim = bed.sims[0]
    await sim.go_down()
    ids = await bed.subscribers(svc, n, "rd")
    assert bed.db is not None
    db = bed.db

    async def relayed() -> bool:
        return int(await db.fetchval("SELECT count(*) FROM outbox")) == 0

    await must(relayed, 30, "outbox never drained")
    await asyncio.sleep(bed.t(2, 1))  # the jobs ran once and wait on the down router
    pending = int(
        await db.fetchval(
            "SELECT count(*) FROM subscribers WHERE id = ANY($1) AND sync_status <> 'synced'", ids
        )
    )
    await bed.redis.restart_empty()
    await sim.come_up()
    took = await _all_healed(bed, ids, sim, bed.t(60, 20))
    healed, false, dups = await bed.truth(ids, sim)
    row.lost, row.false_statuses, row.overlapping = n - healed, false, dups
    if took is None:
        row.measured = (
            f"{pending} pending when Redis restarted empty: {n - healed} still not synced "
            f"after {bed.t(60, 20):.0f} s"
        )
    else:
        row.measured = f"{pending} pending when Redis restarted empty: all synced in {took:.1f} s"
    if not svc.alive:
        row.notes.append(f"service exited: {svc.tail(300)}")
    row.ok = took is not None and false == 0 and dups == 0 and svc.alive
    return row


async def sigstop(bed: Bed) -> Row:
    """Process A holds jobs on a stalled router; when the router answers, A reads every
    subscriber's state and is SIGSTOPped at its first write (a stale plan in hand) past
    claim_idle_s while B takes the jobs over; then A continues."""
    row = Row("sigstop", SIGSTOP_TARGET)
    n = bed.n(50, 20)
    stop_s = bed.t(20, 6)
    slow = "60"
    a = await bed.service("a", IMSYS_SYNC__ROUTER_TIMEOUT_S=slow)
    await bed.network(a, max_concurrency=50)
    sim = bed.sims[0]
    sim.stall()
    ids = await bed.subscribers(a, n, "st")
    stopped_at: list[float] = []

    def stop_a_at_first_write(_write: Write) -> bool:
        if not stopped_at:
            a.signal(signal.SIGSTOP)  # in the router's own write path: A is frozen mid-plan
            stopped_at.append(time.monotonic())
        return False  # never drop a reply: this only watches

    r = bed.redis.client()
    try:

        async def held() -> bool:
            info = await r.xpending("imsys:sync", "imsys")
            return int(info["pending"]) >= n and len(sim.commands) > 0

        await must(held, 30, f"process A never held {n} jobs")
        a_conns = sim.connections  # every connection so far is A's (B is not started)
        b = await bed.service("b", IMSYS_SYNC__ROUTER_TIMEOUT_S=slow)
        base = len(sim.commands)
        sim.drop_after_write(n=10**9, on_item=stop_a_at_first_write)
        sim.unstall()

        async def a_stopped() -> bool:
            return bool(stopped_at)

        await must(a_stopped, 30, "process A never wrote to the router")
        await asyncio.sleep(max(0.0, stop_s - (time.monotonic() - stopped_at[0])))
        healed_while_stopped, _, _ = await bed.truth(ids, sim)
        resumed_at = len(sim.commands)
        a.signal(signal.SIGCONT)
        took = await _all_healed(bed, ids, sim, bed.t(30, 15))
        # A's stale work, if it has any, happens within a few seconds of SIGCONT.
        await asyncio.sleep(bed.t(5, 3))
    finally:
        await r.aclose()
        sim.reset_faults()
    adds = _adds_per_name(sim)
    overlap = sum(1 for c in adds.values() if c > 1)
    stale_adds = sum(c - 1 for c in _adds_per_name(sim, base).values() if c > 1)
    healed, false, dups = await bed.truth(ids, sim)
    lost_claims = len(a.events("job_claim_lost"))
    fenced = len(a.events("job_fenced_out"))
    row.lost, row.overlapping, row.false_statuses = n - healed, overlap + dups, false
    row.measured = (
        f"A held {n}, stopped {stop_s:.0f} s; B healed {healed_while_stopped} meanwhile; "
        f"{overlap} names added twice; A logged job_claim_lost x{lost_claims}, "
        f"job_fenced_out x{fenced}" + ("" if took is not None else "; never all synced")
    )
    if stale_adds:
        row.notes.append(f"{stale_adds} repeated add commands reached the router")
    from_a = [
        c
        for c in sim.commands[resumed_at:]
        if c.connection <= a_conns and c.words[0].endswith(("/add", "/set", "/remove"))
    ]
    twice = [name for name, c in adds.items() if c > 1]
    if twice:
        where = [
            (i, c.connection)
            for i, c in enumerate(sim.commands)
            if c.words[0] == "/ppp/secret/add" and f"=name={twice[0]}" in c.words
        ]
        row.notes.append(
            f"e.g. {twice[0]} added as (command #, connection) {where}; A's connections "
            f"1-{a_conns}; B started at #{base}, A continued at #{resumed_at}"
        )
    if from_a:
        row.notes.append(f"A sent {len(from_a)} router writes after SIGCONT on its old connections")
    row.ok = took is not None and overlap == 0 and dups == 0 and false == 0 and healed == n
    row.notes.append(f"B alive at the end: {b.alive}")
    return row
