"""``python -m imsys bench sync``: provisioning and reconciliation at router scale.

The service is the real ``python -m imsys run`` (a child process, demo off) on a fresh
PostgreSQL database and Redis key prefix of its own; the routers are RouterOS
simulators in another child process (`bench_sync_sims`), so the service's CPU is its
own. Everything an operator would do goes through the admin API. Phases, in order:

1. ``creates_per_s``: `--api-creates` single ``POST /api/subscribers`` from `--clients`
   concurrent clients, onto an extra router (the measured routers stay empty).
2. ``bulk_per_s`` and ``synced_*``: ``POST /api/subscribers/bulk`` of routers x
   subscribers (100,000 rows per call at most), timed from the first call to the moment
   every one is ``synced`` in the database *and* on its router; every API sentence the
   routers received meanwhile (login excluded) is ``commands_per_subscriber``.
3. ``reconcile_*``: `--drift` of one router's entries changed on the router itself (half
   removed, half disabled or moved to another profile), the reconciliation queued as an
   external producer does (`queue_reconciliation`); ``reconcile_job_s`` is the job's own
   run time from the engine's job history, ``reconcile_e2e_s`` runs to the last heal.
4. ``priority_*`` (issue 16: with 10,000 reconciliation jobs waiting, an API change to
   one subscriber reaches the router within 2 s): every entry of the same router but one
   moved to another profile on the router (drift a ``set`` repairs, no disconnection,
   so the mass-disconnect guard lets it through), its reconciliation queued; once its
   jobs are queued, ``PATCH /api/subscribers/{id}`` of the one left alone with a new
   password. ``priority_change_s`` runs from the request to the moment the router holds
   the password (polled every 10 ms); ``priority_bulk_waiting`` of the
   ``priority_bulk_total`` drifted entries were still not repaired at that moment.
   Where the change waited: ``priority_relayed_s`` (its outbox row gone),
   ``priority_stream_ahead`` (the sync stream's length then: entries waiting or running
   ahead of it), ``priority_batch_s`` (its subscriber ``syncing``, a batch took it).

Progress goes to stderr, the one JSON line to stdout (`print_result`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from typing import Any

from imsys.bench_sync_bed import (
    MENU,
    BenchTimeout,
    SyncBed,
    SyncBenchOptions,
    cpu_s,
    peak_rss_mb,
    say,
)
from imsys.redisconn import make_redis
from imsys.routeros.menus import BUILTIN_PROFILE
from imsys.settings import Settings
from imsys.streams.keys import Keys
from imsys.streams.producer import Producer
from imsys.streams.scripts import Scripts
from imsys.sync.jobs import reconcile_job_id, sync_job_id
from imsys.sync.service import queue_reconciliation

__all__ = ["FIELDS", "SyncBenchOptions", "command_figures", "run_sync_bench"]

BULK_CALL_MAX = 100_000

FIELDS = (
    "creates_per_s",
    "bulk_per_s",
    "synced_per_s",
    "synced_s",
    "commands_per_subscriber",
    "commands_by_kind",
    "reconcile_job_s",
    "reconcile_e2e_s",
    "reconcile_commands",
    "priority_change_s",
    "priority_bulk_waiting",
    "priority_bulk_total",
    "peak_rss_mb",
)


def command_figures(
    before: list[dict[str, int]], after: list[dict[str, int]], routers: range
) -> tuple[int, dict[str, int]]:
    """Sentences the `routers` received between two counts, login excluded: the total,
    and by kind (the command's verb: print, add, set, remove, other)."""
    kinds: Counter[str] = Counter({"print": 0, "add": 0, "set": 0, "remove": 0})
    for i in routers:
        for command, n in after[i].items():
            delta = n - before[i].get(command, 0)
            if command == "/login" or delta == 0:
                continue
            verb = command.rpartition("/")[2]
            verb = "print" if verb == "getall" else verb
            kinds[verb if verb in kinds else "other"] += delta
    return sum(kinds.values()), dict(kinds)


class SyncBench(SyncBed):
    """One run's phases, and the result line they fill in."""

    def __init__(self, settings: Settings, opts: SyncBenchOptions) -> None:
        super().__init__(settings, opts)
        self.result: dict[str, Any] = {
            "routers": opts.routers,
            "subscribers": opts.subscribers,
            **dict.fromkeys(FIELDS),
            "clients": opts.clients,
            "api_creates": opts.api_creates,
            "drift": opts.drift,
        }

    async def api_creates(self, router_id: int) -> None:
        o = self.opts
        names = iter(f"api{i:06d}" for i in range(o.api_creates))

        async def client() -> None:
            for name in names:
                await self.api("POST", "/api/subscribers", self.body(router_id, name))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(o.clients)))
        took = time.perf_counter() - t0
        self.result["creates_per_s"] = round(o.api_creates / took, 1)
        say(f"{o.api_creates} API creates in {took:.1f}s; waiting for them to sync")
        await self.all_synced([router_id], o.api_creates)

    async def bulk_and_sync(self, router_ids: list[int]) -> None:
        o = self.opts
        assert self.sims is not None
        rows = [
            self.body(rid, f"r{r}-{i:06d}")
            for i in range(o.subscribers)
            for r, rid in enumerate(router_ids)
        ]
        assert self.svc is not None
        before = await self.sims.ask("counts")
        cpu = cpu_s(self.svc.pid), await self.sims.ask("cpu")
        t0 = time.perf_counter()
        for start in range(0, len(rows), BULK_CALL_MAX):
            await self.api("POST", "/api/subscribers/bulk", rows[start : start + BULK_CALL_MAX])
        bulk_s = time.perf_counter() - t0
        self.result["bulk_per_s"] = round(len(rows) / bulk_s, 1)
        say(f"{len(rows)} imported in {bulk_s:.1f}s; waiting for every one to sync")
        try:
            await self.all_synced(router_ids, o.subscribers)
        finally:
            took = time.perf_counter() - t0
            after = await self.sims.ask("counts")
            commands, kinds = command_figures(before, after, range(o.routers))
            done = self.progress
            self.result["synced_per_s"] = round(done / took, 1)
            self.result["commands_per_subscriber"] = round(commands / max(done, 1), 3)
            self.result["commands_by_kind"] = kinds
            # Whose CPU the phase took: the service's, and the simulated routers'.
            self.result["synced_service_cpu_s"] = round(cpu_s(self.svc.pid) - cpu[0], 2)
            self.result["synced_routers_cpu_s"] = round(await self.sims.ask("cpu") - cpu[1], 2)
        self.result["synced_s"] = round(took, 2)

    async def reconcile(self, router_id: int) -> None:
        o = self.opts
        assert self.sims is not None
        index = self.router_ids.index(router_id)
        count = max(2, round(o.subscribers * o.drift))
        drift = await self.sims.ask("drift", index, MENU, self.tag, count, 14)
        count = drift["removed"] + drift["altered"]
        say(f"drift on one router: {drift}; queueing its reconciliation")
        redis = make_redis(self.settings)
        keys = Keys(self.prefix)
        try:
            producer = Producer(redis, keys, Scripts(redis))
            before = await self.sims.ask("counts")
            since_ms = int(time.time() * 1000)
            t0 = time.perf_counter()

            async def queued() -> bool:
                # A duplicate: one already waits or runs (a router that came online
                # queues one); ours goes in once it is done.
                return not (await queue_reconciliation(producer, router_id)).duplicate

            await self.wait(queued, "the reconciliation queued", every=0.05)
            sims = self.sims

            async def healed() -> bool:
                return bool(await sims.ask("healed", index, MENU) == count)

            await self.wait(healed, f"{count} drifted entries healed", every=0.05)
            self.result["reconcile_e2e_s"] = round(time.perf_counter() - t0, 3)
            after = await self.sims.ask("counts")
            commands, kinds = command_figures(before, after, range(index, index + 1))
            self.result["reconcile_commands"] = commands
            self.result["reconcile_commands_by_kind"] = kinds
            job_id = reconcile_job_id(router_id)

            async def recorded() -> bool:
                for _, f in await redis.xrange(keys.history, min=str(since_ms)) or []:
                    fields = f or {}
                    if fields.get("job_id") == job_id and fields.get("outcome") == "done":
                        self.result["reconcile_job_s"] = round(float(fields["ms"]) / 1000, 3)
                        return True
                return False

            await self.wait(recorded, "the reconciliation's entry in the job history")
        finally:
            await redis.aclose()

    async def priority(self, router_id: int) -> None:
        """Phase 4: one API change while the router's whole reconciliation waits."""
        o = self.opts
        assert self.sims is not None
        assert self.db is not None
        sims, db = self.sims, self.db
        index = self.router_ids.index(router_id)
        # Every one synced first: a subscriber still pending would get a job of its own.
        await self.all_synced([router_id], o.subscribers)
        target = await db.fetchrow(
            "SELECT id, username FROM subscribers WHERE router_id = $1 ORDER BY id LIMIT 1",
            router_id,
        )
        assert target is not None
        sid, name = int(target["id"]), str(target["username"])
        total = await sims.ask("move_profiles", index, MENU, self.tag, BUILTIN_PROFILE, name)
        self.result["priority_bulk_total"] = total
        say(f"{total} entries moved to profile {BUILTIN_PROFILE!r}; queueing the reconciliation")
        redis = make_redis(self.settings)
        keys = Keys(self.prefix)
        stream = keys.stream("sync")
        try:
            producer = Producer(redis, keys, Scripts(redis))

            async def queued() -> bool:
                return not (await queue_reconciliation(producer, router_id)).duplicate

            await self.wait(queued, "the reconciliation queued", every=0.05)
            t_queued = time.perf_counter()

            async def jobs_queued() -> bool:
                # The reconciliation marks the drifted pending in the transaction that
                # queues their jobs; a repaired entry means they were queued too.
                marked = await db.fetchval(
                    "SELECT count(*) FROM subscribers WHERE router_id = $1 "
                    "AND sync_status <> 'synced'",
                    router_id,
                )
                return bool(marked >= total or await sims.ask("still_moved", index, MENU) < total)

            await self.wait(jobs_queued, f"the reconciliation's {total} jobs queued", every=0.01)
            outboxed = await db.fetchval("SELECT count(*) FROM outbox WHERE bulk")
            say(
                f"jobs queued: {outboxed} in the outbox, {await redis.xlen(stream)} in the "
                "stream; changing one subscriber through the API"
            )
            password = f"pw-priority-{secrets.token_hex(6)}"
            job_id = sync_job_id(sid)
            marks: dict[str, float] = {}
            waiting: int | None = None
            t0 = time.perf_counter()
            await self.api("PATCH", f"/api/subscribers/{sid}", {"password": password})

            async def landed() -> bool:
                nonlocal waiting
                now = round(time.perf_counter() - t0, 3)
                if "priority_relayed_s" not in marks and not await db.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE job_id = $1 AND NOT bulk)", job_id
                ):
                    marks["priority_relayed_s"] = now
                    marks["priority_stream_ahead"] = await redis.xlen(stream)
                if "priority_batch_s" not in marks and await db.fetchval(
                    "SELECT sync_status FROM subscribers WHERE id = $1", sid
                ) in ("syncing", "synced"):
                    marks["priority_batch_s"] = now
                waiting = await sims.ask("landed", index, MENU, name, password)
                return waiting is not None

            await self.wait(landed, "the API change on the router", every=0.01)
            self.result["priority_change_s"] = round(time.perf_counter() - t0, 3)
            self.result["priority_bulk_waiting"] = waiting
            # A step the last poll did not see happened before the change landed.
            for step in ("priority_relayed_s", "priority_batch_s"):
                marks.setdefault(step, self.result["priority_change_s"])
            self.result.update(marks)
            say(
                f"the change landed after {self.result['priority_change_s']}s with {waiting} "
                f"of {total} reconciliation jobs still waiting ({marks})"
            )

            async def repaired() -> bool:
                return bool(await sims.ask("still_moved", index, MENU) == 0)

            await self.wait(repaired, f"{total} moved entries repaired")
            self.result["priority_bulk_s"] = round(time.perf_counter() - t_queued, 2)
        finally:
            await redis.aclose()

    async def run(self) -> dict[str, Any]:
        o = self.opts
        try:
            self.router_ids = await self.start()
            main, extra = self.router_ids[: o.routers], self.router_ids[o.routers]
            if o.api_creates:
                await self.api_creates(extra)
            await self.bulk_and_sync(main)
            await self.reconcile(main[0])
            await self.priority(main[0])
        except BenchTimeout as exc:
            say(str(exc))
            self.result["timed_out"] = str(exc)
        finally:
            if self.svc is not None and self.svc.alive:
                self.result["peak_rss_mb"] = peak_rss_mb(self.svc.pid)
            await self.close()
        return self.result


async def run_sync_bench(settings: Settings, opts: SyncBenchOptions) -> dict[str, Any]:
    """Run the four phases; every field of FIELDS is in the answer (None if not reached)."""
    if opts.routers < 1 or opts.subscribers < 1 or opts.clients < 1 or opts.api_creates < 0:
        raise ValueError("--routers, --subscribers and --clients must be at least 1")
    if not 0 < opts.drift <= 1:
        raise ValueError("--drift is a fraction in (0, 1]")
    return await SyncBench(settings, opts).run()
