"""The engine under chaos: garbage on the streams, PostgreSQL going away under load."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import orjson

from imsys.chaos.bed import Bed
from imsys.chaos.process import must, until
from imsys.chaos.report import Row

MALFORMED_TARGET = "all dead-lettered with a reason, valid jobs done, 0 stalls, /healthz honest"
POSTGRES_TARGET = "0 dead-lettered, resumes ≤ 10 s after ready, 503 (no 500) while down"
NO_SUCH = 999_999_999

Fields = dict[bytes, bytes]


def _j(value: object) -> bytes:
    return orjson.dumps(value)


def _kinds(job: bytes, key: str) -> list[tuple[str, Callable[[int], Fields]]]:
    """Fifteen kinds of malformed entry for one stream whose real job type is `job`
    and whose payload names an id under `key`."""
    ok = _j({key: NO_SUCH})
    return [
        ("type_not_utf8", lambda i: {b"type": b"\xff\xfe", b"payload": ok}),
        (
            "payload_not_utf8",
            lambda i: {b"type": job, b"payload": b'{"' + key.encode() + b'": 1\xff}'},
        ),
        ("field_name_not_utf8", lambda i: {b"type": job, b"payload": ok, b"\xc3\x28": b"x"}),
        ("missing_type", lambda i: {b"payload": ok}),
        ("missing_payload", lambda i: {b"type": job}),
        ("payload_not_json", lambda i: {b"type": job, b"payload": b"{not json"}),
        ("payload_not_object", lambda i: {b"type": job, b"payload": b"[1, 2]"}),
        ("unknown_type", lambda i: {b"type": b"no_such_job_type", b"payload": ok}),
        ("wrong_field_types", lambda i: {b"type": job, b"payload": _j({key: "abc"})}),
        ("huge_payload", lambda i: {b"type": job, b"payload": _j({"pad": "x" * 65536})}),
        ("bad_attempt", lambda i: {b"type": job, b"payload": ok, b"attempt": b"abc"}),
        ("negative_id", lambda i: {b"type": job, b"payload": _j({key: -5 - i})}),
        (
            "id_beyond_64_bits",
            lambda i: {
                b"type": job,
                b"payload": b'{"' + key.encode() + b'": ' + str(2**70 + i).encode() + b"}",
            },
        ),
        ("bad_enqueued_at", lambda i: {b"type": job, b"payload": ok, b"enqueued_at": b"yesterday"}),
        (
            "job_id_not_utf8",
            lambda i: {b"type": job, b"payload": ok, b"job_id": b"\xff" + bytes([i % 200])},
        ),
    ]


async def _runs(bed: Bed, periods: list[str]) -> int:
    """Billing runs finished for the empty tenant in `periods` (the billing timer's own
    run for the current period is not one of ours)."""
    assert bed.db is not None
    return int(
        await bed.db.fetchval(
            "SELECT count(*) FROM billing_runs WHERE tenant_id = $1 AND period = ANY($2)",
            bed.empty_tenant_id,
            periods,
        )
    )


def _period(i: int) -> str:
    return f"{2001 + i // 12}-{i % 12 + 1:02d}"


async def malformed(bed: Bed) -> Row:
    """10,000 malformed entries of 15 kinds on sync and billing while valid jobs flow."""
    row = Row("malformed", MALFORMED_TARGET)
    total = bed.n(10_000, 1_500)
    n_subs, n_bills = bed.n(200, 40), bed.n(120, 24)
    svc = await bed.service("a")
    await bed.network(svc)
    sim = bed.sims[0]
    kinds = {
        b"imsys:sync": _kinds(b"sync_subscriber", "subscriber_id"),
        b"imsys:billing": _kinds(b"payment_received", "payment_id"),
    }
    raw = bed.redis.client(decode=False)
    # (stream, entry id) → kind: the two streams number their entries independently.
    bad_ids: dict[tuple[bytes, bytes], str] = {}
    ids: list[int] = []

    async def garbage() -> None:
        for start in range(0, total, 500):
            pipe = raw.pipeline(transaction=False)
            names: list[tuple[bytes, str]] = []
            for i in range(start, min(start + 500, total)):
                stream = b"imsys:sync" if i % 2 == 0 else b"imsys:billing"
                name, make = kinds[stream][(i // 2) % 15]
                pipe.xadd(stream, make(i))  # type: ignore[arg-type]
                names.append((stream.split(b":")[-1], name))
            for entry_id, (short, name) in zip(await pipe.execute(), names, strict=True):
                bad_ids[short, entry_id] = name
            await asyncio.sleep(0.05)

    async def valid() -> None:
        ids.extend(await bed.subscribers(svc, n_subs, "ok", parallel=4))

    async def bills() -> None:
        for i in range(n_bills):
            await raw.xadd(
                b"imsys:billing",
                {
                    b"type": b"generate_bills",
                    b"job_id": f"chaos-bill-{i}".encode(),
                    b"payload": _j({"tenant_id": bed.empty_tenant_id, "period": _period(i)}),
                },
            )
            await asyncio.sleep(0.02)

    async def done() -> int:
        runs = await _runs(bed, [_period(i) for i in range(n_bills)])
        return (await bed.truth(ids, sim))[0] + runs if ids else runs

    stall_s = bed.t(10, 5)
    stalls = false_health = 0
    try:
        feeders = asyncio.gather(garbage(), valid(), bills())
        last, last_change, stalled = -1, time.monotonic(), False
        deadline = time.monotonic() + bed.t(120, 40)
        while time.monotonic() < deadline:
            now_done = await done()
            if now_done != last:
                last, last_change, stalled = now_done, time.monotonic(), False
            finished = feeders.done() and now_done == n_subs + n_bills
            if not finished and time.monotonic() - last_change > stall_s and not stalled:
                stalled, stalls = True, stalls + 1
            status, _ = await bed.call(svc, "GET", "/healthz")
            false_health += stalled and status == 200
            if finished and await _dead_count(bed, bad_ids) >= len(bad_ids):
                break
            await asyncio.sleep(0.5)
        if not feeders.done():
            feeders.cancel()
        await asyncio.gather(feeders, return_exceptions=True)
        status, _ = await bed.call(svc, "GET", "/healthz")
        false_health += status != 200 and stalls == 0
    finally:
        await raw.aclose()
    dead = {_dead_key(f): f for f in await bed.dead()}
    missing = Counter(name for eid, name in bad_ids.items() if eid not in dead)
    no_reason = sum(1 for eid in bad_ids if eid in dead and not dead[eid].get(b"error"))
    valid_left = n_subs + n_bills - await done()
    row.lost = sum(missing.values()) + max(0, valid_left) + no_reason
    row.stalls, row.false_statuses = stalls, false_health
    row.measured = (
        f"{len(bad_ids) - sum(missing.values())}/{len(bad_ids)} dead-lettered, "
        f"{n_subs + n_bills - max(0, valid_left)}/{n_subs + n_bills} valid done"
    )
    if missing:
        row.notes.append(
            "not dead-lettered: " + ", ".join(f"{k} x{v}" for k, v in missing.most_common())
        )
    if no_reason:
        row.notes.append(f"{no_reason} dead letters without an error")
    row.notes.append(f"service alive: {svc.alive}; error log lines: {svc.errors()}")
    row.ok = row.lost == 0 and stalls == 0 and false_health == 0
    return row


def _dead_key(fields: Fields) -> tuple[bytes, bytes]:
    return fields.get(b"stream", b""), fields.get(b"original_id", b"")


async def _dead_count(bed: Bed, wanted: dict[tuple[bytes, bytes], str]) -> int:
    return sum(1 for f in await bed.dead() if _dead_key(f) in wanted)


async def postgres_restart(bed: Bed) -> Row:
    """PostgreSQL stopped (fast) for a while under sync and billing load, then started."""
    row = Row("postgres_restart", POSTGRES_TARGET)
    n = bed.n(100, 20)
    # Long enough for billing's default three attempts (1 s, 2 s apart) to run out.
    down_s = bed.postgres_down_s or bed.t(10, 6)
    svc = await bed.service("a")
    await bed.network(svc)
    sim = bed.sims[0]
    ids = await bed.subscribers(svc, n, "pg")

    async def healed() -> bool:
        return (await bed.truth(ids, sim))[0] == n

    await must(healed, bed.t(60, 30), "initial sync never finished")
    raw = bed.redis.client(decode=False)
    periods: list[str] = []
    answers: Counter[tuple[str, int]] = Counter()
    # "down" while stopped, "starting" while it starts (it may answer before pg_ctl says
    # so), "" otherwise; a request counts in a phase it began and ended in.
    window = {"phase": ""}
    wrong_answers: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set() and i < 10_000:
            await raw.xadd(
                b"imsys:sync",
                {b"type": b"sync_subscriber", b"payload": _j({"subscriber_id": ids[i % n]})},
            )
            if i % 3 == 0:
                periods.append(_period(len(periods)))
                await raw.xadd(
                    b"imsys:billing",
                    {
                        b"type": b"generate_bills",
                        b"payload": _j({"tenant_id": bed.empty_tenant_id, "period": periods[-1]}),
                    },
                )
            i += 1
            await asyncio.sleep(0.1)

    async def probe() -> None:
        while not stop.is_set():
            # Only a request that began and ended inside the outage must be a 503: one
            # begun just before the stop, or answered just after the start, may be a 200.
            began = window["phase"]
            status, _ = await bed.call(svc, "GET", f"/api/subscribers/{ids[0]}")
            if began and window["phase"] == began:
                answers[began, status] += 1
                # Down: only 503 is honest. Starting: 503 until it serves, then 200.
                if status != 503 and not (began == "starting" and status == 200):
                    wrong_answers.append(status)
            await asyncio.sleep(0.25)

    dead_before = len(await bed.dead())
    tasks = [asyncio.create_task(load()), asyncio.create_task(probe())]
    resume: float | None = None
    try:
        await asyncio.sleep(1)
        await bed.pg.stop("fast")
        window["phase"] = "down"
        await asyncio.sleep(down_s)
        window["phase"] = "starting"
        await bed.pg.start()  # waits until it accepts connections: "starting up" is probed
        window["phase"] = ""
        ready = time.monotonic()
        # A change made the moment PostgreSQL is back must reach the router in time.
        target = ids[1]
        status = 0
        while status != 200 and time.monotonic() - ready < 30:
            status, _ = await bed.call(
                svc, "PATCH", f"/api/subscribers/{target}", {"password": "after-restart"}
            )
            await asyncio.sleep(0.1 if status != 200 else 0)
        username = (await bed.sub_rows([target]))[0]["username"]

        async def applied() -> bool:
            rows = [e for e in sim.items("/ppp/secret") if e["name"] == username]
            synced = (await bed.sub_rows([target]))[0]["sync_status"] == "synced"
            return synced and bool(rows) and rows[0].get("password") == "after-restart"

        if await until(applied, 30, 0.1) is not None:
            resume = time.monotonic() - ready
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def billed() -> bool:
        return await _runs(bed, periods) >= len(periods)

    await until(billed, bed.t(30, 15), 0.5)
    runs = await _runs(bed, periods)
    await raw.aclose()
    dead_new = len(await bed.dead()) - dead_before
    wrong = len(wrong_answers)
    row.lost = dead_new + max(0, len(periods) - runs)
    row.false_statuses = wrong
    row.stalls = 0 if resume is not None and resume <= 10 else 1
    row.measured = (
        f"down {down_s:.0f} s: {dead_new} dead-lettered, API "
        + ", ".join(f"{p} {s or 'no answer'} x{c}" for (p, s), c in sorted(answers.items()))
        + (f", resumed {resume:.1f} s after ready" if resume is not None else ", never resumed")
    )
    row.ok = row.lost == 0 and wrong == 0 and row.stalls == 0
    return row
