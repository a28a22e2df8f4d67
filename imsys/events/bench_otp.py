"""``python -m imsys.events.bench_otp``: OTP latency while a bulk run saturates a channel.

One in-process service (every domain registered, the real engine, real Redis and
PostgreSQL) and the gateway simulator (``--latency`` per call, like a provider). It
queues ``--bulk`` SMS notifications of one tenant (``send_notification`` jobs on the
billing stream, paced at ``--bulk-rate`` per second), and while they go out it enqueues
a ``whatsapp_otp`` every ``--otp-every`` seconds. An OTP's latency is from its enqueue
to the moment the simulator received it. Prints one JSON line per run and, with
``--runs`` > 1, the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from imsys import logging as imsys_logging
from imsys.app import build_deps
from imsys.db import migrate
from imsys.redisconn import make_redis
from imsys.settings import Settings, load_settings
from imsys.sim.gateway import GatewaySimulator


def _bench_settings(base: Settings, gateway: GatewaySimulator, db_url: str,
                    bulk_rate: float) -> Settings:
    return base.model_copy(update={
        "redis": base.redis.model_copy(update={"prefix": f"bench-otp-{secrets.token_hex(4)}"}),
        "database": base.database.model_copy(update={"url": db_url}),
        "recovery": base.recovery.model_copy(update={"enabled": False}),
        "sms": base.sms.model_copy(update={"url": f"{gateway.url}/version1/messaging"}),
        "whatsapp": base.whatsapp.model_copy(update={"base_url": f"{gateway.url}/v21.0"}),
        "billing": base.billing.model_copy(update={
            "send_rate_per_s": {"sms": bulk_rate, "whatsapp": bulk_rate, "email": bulk_rate},
        }),
    })


async def run_once(base: Settings, *, bulk: int, bulk_rate: float, latency: float,
                   otp_every: float, db_url: str) -> dict[str, Any]:
    gateway = GatewaySimulator(latency=latency)
    await gateway.start()
    settings = _bench_settings(base, gateway, db_url, bulk_rate)
    redis = make_redis(settings)
    db = await asyncpg.create_pool(db_url, min_size=2, max_size=20)
    deps = build_deps(settings, redis, db)
    engine = deps.engine
    enqueued: dict[str, float] = {}
    try:
        await engine.prepare()
        tenant = await db.fetchval(
            "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"bench-{secrets.token_hex(4)}"
        )
        ids = await db.fetch(
            """
            INSERT INTO notifications (tenant_id, channel, recipient, template, body, dedupe_key)
            SELECT $1::bigint, 'sms', '+2547' || lpad(i::text, 8, '0'), 'reminder',
                   'Hi, your service expires soon', 'bench:' || $1::bigint || ':' || i
            FROM generate_series(1, $2::int) AS i RETURNING id
            """,
            tenant, bulk,
        )
        await engine.producer.enqueue_many(
            "billing", "send_notification",
            (orjson.dumps({"notification_id": r["id"]}).decode() for r in ids),
        )
        runner = asyncio.create_task(engine.run())
        started = time.monotonic()
        n = 0
        while len(gateway.messages("sms")) < bulk:
            n += 1
            number = f"+25479{n:07d}"
            enqueued[number] = time.time()
            await engine.producer.enqueue("events", "whatsapp_otp", {
                "recipient": number, "otp": "482913", "user_name": "bench",
                "expires_at": int((time.time() + 600) * 1000),
            })
            await asyncio.sleep(otp_every)
            if time.monotonic() - started > 3600:
                raise TimeoutError("bulk run did not finish in an hour")
        bulk_s = time.monotonic() - started
        # The last OTPs still in flight.
        deadline = time.monotonic() + 30
        while len(gateway.messages("whatsapp")) < len(enqueued) and (  # noqa: ASYNC110
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        engine.stop()
        await runner
    finally:
        await deps.http.close()
        await deps.closing.aclose()
        async for key in redis.scan_iter(match=f"{settings.redis.prefix}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()
        await db.close()
        await gateway.stop()
    got = {m.to: m.at for m in gateway.messages("whatsapp")}
    lat = sorted((got[k].timestamp() - t) for k, t in enqueued.items() if k in got)
    if not lat:
        raise RuntimeError("no OTP reached the provider")
    return {
        "bulk": bulk,
        "bulk_rate_per_s": bulk_rate,
        "bulk_s": round(bulk_s, 1),
        "otps": len(enqueued),
        "otps_delivered": len(lat),
        "otp_p50_s": round(statistics.median(lat), 3),
        "otp_p95_s": round(lat[max(0, int(len(lat) * 0.95) - 1)], 3),
        "otp_max_s": round(lat[-1], 3),
        "provider_latency_s": latency,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imsys.events.bench_otp")
    p.add_argument("--bulk", type=int, default=10_000)
    p.add_argument("--bulk-rate", type=float, default=200.0, help="bulk sends per second")
    p.add_argument("--latency", type=float, default=0.02, help="provider seconds per call")
    p.add_argument("--otp-every", type=float, default=0.25)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/imsys_bench_otp")
    args = p.parse_args(argv)
    base = load_settings()
    imsys_logging.configure("warning", json=True)

    async def go() -> None:
        await migrate(args.database)
        results = []
        for _ in range(args.runs):
            r = await run_once(base, bulk=args.bulk, bulk_rate=args.bulk_rate,
                               latency=args.latency, otp_every=args.otp_every,
                               db_url=args.database)
            results.append(r)
            print(orjson.dumps(r).decode(), flush=True)
        if len(results) > 1:
            med = {k: statistics.median(r[k] for r in results)
                   for k in ("otp_p50_s", "otp_p95_s", "otp_max_s", "bulk_s")}
            print(orjson.dumps({"runs": len(results), "median": med}).decode(), flush=True)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
