"""Bills for 100,000 subscribers in one tenant: generate_bills wall time and round trips.

Usage: bench_billing.py [SUBSCRIBERS] [RUNS]   (defaults 100000, 3). Builds a throwaway
database (imsys_bench_billing), fills it set-based, then times the real handler's
statement on a fresh period each run, counting the statements sent to PostgreSQL.
Prints one JSON line per run and the median.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time

import asyncpg

from imsys.billing import repo
from imsys.billing.handlers import period_bounds
from imsys.db import migrate
from imsys.settings import Settings

BASE = os.environ.get("IMSYS_DATABASE__URL", "postgresql://postgres@127.0.0.1:5432/imsys")
URL = BASE.rsplit("/", 1)[0] + "/imsys_bench_billing"


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    admin = await asyncpg.connect(BASE.rsplit("/", 1)[0] + "/postgres")
    await admin.execute("DROP DATABASE IF EXISTS imsys_bench_billing WITH (FORCE)")
    await admin.close()
    await migrate(URL)
    conn = await asyncpg.connect(URL)
    tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('bench') RETURNING id")
    router = await conn.fetchval(
        "INSERT INTO routers (tenant_id, name, host, username, password)"
        " VALUES ($1, 'r', '127.0.0.1', 'admin', 'x') RETURNING id", tenant)
    package = await conn.fetchval(
        "INSERT INTO packages (tenant_id, name, profile, price, period_days)"
        " VALUES ($1, 'p', 'basic', 10, 30) RETURNING id", tenant)
    await conn.execute(
        """
        INSERT INTO subscribers (tenant_id, router_id, package_id, username, password, service, phone)
        SELECT $1, $2, $3, 'u' || g, 'pw', 'pppoe', '+2547' || lpad(g::text, 8, '0')
        FROM generate_series(1, $4) g
        """, tenant, router, package, n)
    await conn.execute("ANALYZE")
    statements = 0

    def count(_record: object) -> None:
        nonlocal statements
        statements += 1

    conn.add_query_logger(count)
    cfg = Settings().billing
    results = []
    for i in range(runs):
        period = f"20{30 + i}-01"
        start, end = period_bounds(period, "UTC")
        statements = 0
        t0 = time.perf_counter()
        async with conn.transaction():
            row = await repo.generate_bills(
                conn, tenant_id=tenant, period=period, period_start=start, period_end=end,
                template=cfg.templates["invoice"], phone_channel="sms", time_zone="UTC")
        wall = time.perf_counter() - t0
        result = {"bench": "generate_bills", "subscribers": n, "invoices": row["invoices"],
                  "messages": row["messages"], "wall_s": round(wall, 3),
                  "statements": statements}
        results.append(result)
        print(json.dumps(result), flush=True)
    print(json.dumps({"bench": "generate_bills", "summary": "median", "runs": runs,
                      "wall_s": round(statistics.median(r["wall_s"] for r in results), 3),
                      "statements": max(r["statements"] for r in results)}))
    await conn.close()
    admin = await asyncpg.connect(BASE.rsplit("/", 1)[0] + "/postgres")
    if not os.environ.get("BENCH_KEEP"):
        await admin.execute("DROP DATABASE IF EXISTS imsys_bench_billing WITH (FORCE)")
    await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
