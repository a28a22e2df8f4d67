"""``python -m imsys [--config FILE] COMMAND``: run, migrate, check, queues, dlq, enqueue,
bench, sim, import, tokens."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson

from imsys import logging as imsys_logging
from imsys.errors import ConfigError
from imsys.settings import STREAMS, Settings, load_settings

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def _print_json(data: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imsys", description=__doc__)
    p.add_argument("--config", help="TOML settings file (default: $IMSYS_CONFIG)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="run the service (the default)")
    sub.add_parser("migrate", help="apply schema.sql to the database (idempotent)")
    sub.add_parser("check", help="exit 0 when Redis, PostgreSQL and the groups are healthy")

    q = sub.add_parser("queues", help="per-stream figures, job progress and live processes")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    qsub = q.add_subparsers(dest="queues_command")
    for verb, what in (
        ("pause", "pause a stream in every process: it accepts jobs and runs none"),
        ("resume", "resume a paused stream: its waiting jobs run"),
    ):
        qsub.add_parser(verb, help=what).add_argument("stream", choices=STREAMS)

    dlq = sub.add_parser("dlq", help="dead letters: list, replay, purge")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    dl = dsub.add_parser("list")
    dl.add_argument("--stream", choices=STREAMS)
    dl.add_argument("--limit", type=int, default=50)
    dr = dsub.add_parser("replay")
    dr.add_argument("id", nargs="?", help="dead-letter id (omit with --all)")
    dr.add_argument("--all", action="store_true")
    dr.add_argument("--stream", choices=STREAMS)
    dp = dsub.add_parser("purge")
    dp.add_argument("--stream", choices=STREAMS)
    dp.add_argument("--older-than", type=float, metavar="HOURS")
    dp.add_argument("--yes", action="store_true", help="do not ask")

    e = sub.add_parser("enqueue", help="put one job on a stream")
    e.add_argument("stream", choices=STREAMS)
    e.add_argument("type")
    e.add_argument("payload", help="a JSON object")
    e.add_argument("--job-id", help="idempotency key")
    e.add_argument("--delay", type=float, default=0.0, metavar="SECONDS")

    b = sub.add_parser("bench", help="time the engine (JSON line, like bench/peers)")
    b.add_argument("--jobs", type=int, default=20000)
    b.add_argument("--sleep", type=float, default=0.0)
    b.add_argument("--concurrency", type=int, default=50)
    bsub = b.add_subparsers(dest="bench_workload")
    bs = bsub.add_parser(
        "sync", help="the service and simulated routers at scale (imsys.bench_sync)"
    )
    bs.add_argument("--routers", type=int, required=True)
    bs.add_argument("--subscribers", type=int, required=True, help="per router")
    bs.add_argument("--clients", type=int, default=16, help="concurrent API clients")
    bs.add_argument("--api-creates", type=int, default=2000)
    bs.add_argument("--drift", type=float, default=0.01, help="fraction changed on a router")
    bs.add_argument("--timeout", type=float, default=1800.0, help="longest wait per phase (s)")
    bs.add_argument("--keep", action="store_true", help="keep the database, keys and logs")

    s = sub.add_parser("sim", help="run a simulator standalone")
    s.add_argument("which", choices=("routeros", "bouncer", "gateway"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--username", default="admin")
    s.add_argument("--password", default="")
    s.add_argument(
        "--version",
        dest="ros_version",
        metavar="V",
        help="RouterOS version to model (default 7.19.4; before 7.18 no !empty replies)",
    )
    s.add_argument("--api-key", default="sim-key")
    s.add_argument(
        "--no-sensitive",
        action="store_true",
        help="routeros: an API user without the `sensitive` policy (prints omit passwords)",
    )
    s.add_argument(
        "--tls",
        action="store_true",
        help="routeros: serve API-SSL with a fresh self-signed certificate (prints its SHA-256)",
    )
    s.add_argument(
        "--package",
        action="append",
        metavar="NAME",
        help="routeros: optional package installed, repeatable: wireless, wifi-qcom, "
        "wifi-qcom-ac (default: wireless on 6.x, none on 7.x)",
    )

    a = sub.add_parser("adopt", help="take over a router's untagged logins (dry run by default)")
    a.add_argument("router_id", type=int)
    a.add_argument("--apply", action="store_true", help="carry the plan out (tag in place)")
    a.add_argument(
        "--import-unknown", action="store_true", help="with --apply: unknown logins -> subscribers"
    )
    a.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="PROFILE=PACKAGE_ID",
        help="the package an imported login with that router profile gets (repeatable)",
    )

    t = sub.add_parser("tokens", help="API tokens bound to one tenant: create, list, delete")
    tsub = t.add_subparsers(dest="tokens_command", required=True)
    tc = tsub.add_parser("create", help="print {id, token}: the token is shown this once")
    tc.add_argument("--tenant-id", type=int, required=True)
    tc.add_argument("--name", required=True, help="what the token is for (e.g. reseller-x)")
    tl = tsub.add_parser("list", help="every token (never a secret)")
    tl.add_argument("--tenant-id", type=int, help="only this tenant's")
    tsub.add_parser("delete", help="revoke a token").add_argument("id", type=int)

    i = sub.add_parser("import", help="create subscribers from a CSV, all or nothing")
    i.add_argument("file", metavar="FILE.csv", help="CSV with a header naming the fields")

    sub.add_parser("schema", help="JSON Schema of every job payload and backend event")
    c = sub.add_parser("chaos", help="adversarial scenarios on private Redis/PostgreSQL servers")
    c.add_argument("--short", action="store_true", help="small counts, short outages (< 2 min)")
    c.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    c.add_argument("--json", action="store_true", help="one JSON object per row")
    c.add_argument("--keep", action="store_true", help="keep the temp folder with every log")
    c.add_argument(
        "--postgres-down",
        type=float,
        metavar="SECONDS",
        help="how long postgres_restart keeps PostgreSQL stopped (default 10, short 6)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"imsys: {exc}", file=sys.stderr)
        return 2
    fmt = settings.log.format
    imsys_logging.configure(settings.log.level, json=None if fmt == "auto" else fmt == "json")
    handler: Callable[[Settings, argparse.Namespace], int] = COMMANDS[command]
    try:
        return handler(settings, args)
    except ConfigError as exc:
        print(f"imsys: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from imsys.app import serve

    _run(serve(settings))
    return 0


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from imsys.db import migrate

    _run(migrate(settings.database.url.get_secret_value()))
    print("schema applied")
    return 0


async def _with_engine(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from imsys.redisconn import make_redis
    from imsys.streams.engine import Engine
    from imsys.streams.job import Registry

    redis = make_redis(settings)
    try:
        return await fn(Engine(redis, settings, Registry()))
    finally:
        await redis.aclose()


def cmd_check(settings: Settings, _args: argparse.Namespace) -> int:
    import asyncpg

    from imsys.streams.keys import GROUP

    async def check(engine: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            await engine.redis.ping()
            groups = {}
            for s in STREAMS:
                try:
                    names = [
                        g["name"] for g in await engine.redis.xinfo_groups(engine.keys.stream(s))
                    ]
                except Exception:
                    names = []
                groups[s] = GROUP in names
            out["redis"] = "ok"
            out["groups"] = groups
            out["processes"] = len(await engine.processes())
        except Exception as exc:
            out["redis"] = f"unavailable: {type(exc).__name__}"
        try:
            conn = await asyncpg.connect(settings.database.url.get_secret_value(), timeout=5)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
            out["postgres"] = "ok"
        except Exception as exc:
            out["postgres"] = f"unavailable: {type(exc).__name__}"
        return out

    result = _run(_with_engine(settings, check))
    healthy = result.get("redis") == "ok" and result.get("postgres") == "ok"
    _print_json({"healthy": healthy, **result})
    return 0 if healthy else 1


def cmd_queues(settings: Settings, args: argparse.Namespace) -> int:
    if args.queues_command in ("pause", "resume"):
        return _pause_or_resume(settings, args.queues_command, args.stream)

    async def gather(engine: Any) -> dict[str, Any]:
        return {
            "streams": [f.as_dict() for f in await engine.figures()],
            "dead_letters": await engine.dead_letters.count(),
            "progress": await engine.progress(),
            "processes": await engine.processes(),
        }

    data = _run(_with_engine(settings, gather))
    if args.json:
        _print_json(data)
        return 0
    cols = (
        "stream",
        "length",
        "pending",
        "lag",
        "delayed",
        "oldest_pending_age_s",
        "processed",
        "retried",
        "dead",
        "paused",
    )
    print("  ".join(f"{c:>12}" for c in cols))
    for row in data["streams"]:
        cells = []
        for c in cols:
            v = row[c]
            cells.append(
                f"{v:>12.1f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>12}"
            )
        print("  ".join(cells))
    print(f"dead letters: {data['dead_letters']}   live processes: {len(data['processes'])}")
    for stream, jobs in data["progress"].items():
        for j in jobs:
            total = f"/{j['total']}" if j.get("total") is not None else ""
            note = f"  {j['note']}" if j.get("note") else ""
            print(f"  {stream} {j['type']} {j['entry_id']}: {j['done']}{total}{note}")
    return 0


def _pause_or_resume(settings: Settings, verb: str, stream: str) -> int:
    """Every process sees it within ``streams.pause.PAUSE_CHECK_S``."""

    async def act(engine: Any) -> bool:
        pauses = engine.pauses
        return bool(await (pauses.pause(stream) if verb == "pause" else pauses.resume(stream)))

    changed = _run(_with_engine(settings, act))
    state = "paused" if verb == "pause" else "resumed"
    print(f"{stream} {state}" if changed else f"{stream} was already {state}")
    return 0


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    async def act(engine: Any) -> int:
        dl = engine.dead_letters
        if args.dlq_command == "list":
            for d in await dl.list(limit=args.limit, stream=args.stream):
                print(orjson.dumps(d.as_dict()).decode())
            return 0
        if args.dlq_command == "replay":
            if args.all:
                print(f"replayed {await dl.replay_all(stream=args.stream)}")
                return 0
            if not args.id:
                print("imsys: give a dead-letter id or --all", file=sys.stderr)
                return 2
            new_id = await dl.replay(args.id)
            if new_id is None:
                print(f"imsys: no dead letter {args.id}", file=sys.stderr)
                return 1
            print(f"replayed {args.id} as {new_id}")
            return 0
        older = int(args.older_than * 3_600_000) if args.older_than is not None else None
        print(f"purged {await dl.purge(stream=args.stream, older_than_ms=older)}")
        return 0

    if args.dlq_command == "purge" and not args.yes and sys.stdin.isatty():
        scope = args.stream or "all streams"
        if input(f"purge dead letters of {scope}? [y/N] ").strip().lower() != "y":
            return 1
    return _run(_with_engine(settings, act))


def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    try:
        payload = orjson.loads(args.payload)
    except orjson.JSONDecodeError as exc:
        print(f"imsys: payload is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print("imsys: payload must be a JSON object", file=sys.stderr)
        return 2

    async def put(engine: Any) -> Any:
        return await engine.producer.enqueue(
            args.stream, args.type, payload, job_id=args.job_id, delay=args.delay
        )

    result = _run(_with_engine(settings, put))
    if result.duplicate:
        print(f"duplicate: a job with job_id {args.job_id!r} is waiting or running")
        return 0
    print(result.entry_id)
    return 0


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from imsys.bench import print_result, run_bench

    if args.bench_workload == "sync":
        from imsys.bench_sync import SyncBenchOptions, run_sync_bench

        opts = SyncBenchOptions(
            args.routers,
            args.subscribers,
            args.clients,
            args.api_creates,
            args.drift,
            args.timeout,
            args.keep,
        )
        try:
            result = _run(run_sync_bench(settings, opts))
        except ValueError as exc:
            print(f"imsys: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # the set-up failed, or the service died
            print(f"imsys: bench sync failed: {exc}", file=sys.stderr)
            return 1
        print_result(result)
        return 1 if result.get("timed_out") else 0
    print_result(
        _run(run_bench(settings, jobs=args.jobs, sleep=args.sleep, concurrency=args.concurrency))
    )
    return 0


def cmd_sim(_settings: Settings, args: argparse.Namespace) -> int:
    started = time.time()
    if args.which == "routeros":
        from imsys.sim import routeros
        from imsys.sim.routeros_menus import DEFAULT_VERSION, parse_version
        from imsys.sim.routeros_wireless import check_packages

        version = args.ros_version or DEFAULT_VERSION
        try:
            parse_version(version)
            if args.package:
                check_packages(version, frozenset(args.package))
        except ValueError as exc:
            print(f"sim routeros: {exc}", file=sys.stderr)
            return 2
        context = None
        if args.tls:
            from imsys.sim.routeros_tls import self_signed

            certificate = self_signed(args.host)
            print(f"tls_fingerprint {certificate.fingerprint}", flush=True)
            context = certificate.context
        coro: Coroutine[Any, Any, None] = routeros.serve(
            args.host,
            args.port or (8729 if args.tls else 8728),
            args.username,
            args.password,
            ssl_context=context,
            version=version,
            sensitive=not args.no_sensitive,
            packages=args.package,
        )
    elif args.which == "bouncer":
        from imsys.sim import bouncer

        coro = bouncer.serve(args.host, args.port or bouncer.DEFAULT_PORT, args.api_key)
    else:
        from imsys.sim import gateway

        coro = gateway.serve(args.host, args.port or gateway.DEFAULT_PORT)
    try:
        _run(coro)
    except KeyboardInterrupt:
        print(f"simulator stopped after {time.time() - started:.0f}s", file=sys.stderr)
    return 0


def cmd_adopt(settings: Settings, args: argparse.Namespace) -> int:
    from imsys.app import build_deps
    from imsys.db import connect_pool
    from imsys.errors import Deferred
    from imsys.network.errors import NotFound
    from imsys.redisconn import make_redis
    from imsys.routeros import RouterError
    from imsys.sync.adopt import adopt

    packages: dict[str, int] = {}
    for item in args.package:
        profile, _, package_id = item.rpartition("=")
        if not profile or not package_id.isdigit():
            print(f"imsys: --package wants PROFILE=PACKAGE_ID, not {item!r}", file=sys.stderr)
            return 2
        packages[profile] = int(package_id)

    async def go() -> dict[str, Any]:
        redis = make_redis(settings)
        db = await connect_pool(settings.database.url.get_secret_value(), max_size=4)
        deps = build_deps(settings, redis, db)
        try:
            result = await adopt(
                deps,
                args.router_id,
                apply=args.apply,
                import_unknown=args.import_unknown,
                package_by_profile=packages,
                correlation=f"cli:adopt:{args.router_id}:{int(time.time())}",
            )
            return result.as_dict()
        finally:
            await deps.closing.aclose()
            await deps.http.close()
            await db.close()
            await redis.aclose()

    try:
        _print_json(_run(go()))
    except NotFound as exc:
        print(f"imsys: {exc} not found", file=sys.stderr)
        return 1
    except (Deferred, RouterError) as exc:
        print(f"imsys: cannot adopt router {args.router_id}: {exc}", file=sys.stderr)
        return 1
    return 0


def read_subscribers_csv(path: str) -> list[dict[str, str]]:
    """The CSV's rows as dicts by its header; an empty cell is left out (the default)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return [
            {k.strip(): v for k, v in row.items() if k is not None and v not in (None, "")}
            for row in csv.DictReader(f)
        ]


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    """Bulk import from a CSV (imsys.network.bulk): prints ``{"created", "ids"}``; exit 2
    with every bad row on stderr, nothing written."""
    from imsys.db import connect_pool
    from imsys.network import bulk
    from imsys.network.errors import Conflict, Invalid
    from imsys.sync.service import subscribers_created

    try:
        rows = read_subscribers_csv(args.file)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"imsys: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2

    async def go() -> list[int]:
        db = await connect_pool(settings.database.url.get_secret_value(), max_size=2)
        try:
            return await bulk.create_subscribers(
                db,
                rows,
                f"cli:import:{int(time.time())}",
                on_created=subscribers_created,
            )
        finally:
            await db.close()

    try:
        ids = _run(go())
    except bulk.BulkInvalid as exc:
        print(orjson.dumps(exc.as_dict(), option=orjson.OPT_INDENT_2).decode(), file=sys.stderr)
        return 2
    except Invalid as exc:
        print(f"imsys: {exc}", file=sys.stderr)
        return 2
    except Conflict as exc:
        print(f"imsys: {exc}", file=sys.stderr)
        return 1
    _print_json({"created": len(ids), "ids": ids})
    return 0


def cmd_tokens(settings: Settings, args: argparse.Namespace) -> int:
    """Tenant tokens (imsys.tokens), as ``/api/tokens`` makes them: JSON out, exit 1 when
    the tenant or token does not exist, 2 for a bad name."""
    import pydantic

    from imsys import tokens
    from imsys.db import connect_pool
    from imsys.network.errors import NotFound

    async def go() -> Any:
        db = await connect_pool(settings.database.url.get_secret_value(), max_size=2)
        try:
            if args.tokens_command == "create":
                data = tokens.TokenIn(tenant_id=args.tenant_id, name=args.name)
                return await tokens.create(db, data)
            if args.tokens_command == "list":
                return {"tokens": await tokens.list_tokens(db, args.tenant_id)}
            return await tokens.delete(db, args.id)
        finally:
            await db.close()

    try:
        result = _run(go())
    except pydantic.ValidationError as exc:
        print(f"imsys: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    except NotFound as exc:
        print(f"imsys: {exc} not found", file=sys.stderr)
        return 1
    print(orjson.dumps(result, default=str, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_chaos(_settings: Settings, args: argparse.Namespace) -> int:
    from imsys.chaos.runner import main as chaos_main

    return chaos_main(
        args.only,
        short=args.short,
        as_json=args.json,
        keep=args.keep,
        postgres_down_s=args.postgres_down,
    )


def cmd_schema(_settings: Settings, _args: argparse.Namespace) -> int:
    """The stream contract as JSON Schema (imsys.contract), from the code's declarations."""
    from imsys.contract import document

    _print_json(document())
    return 0


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": cmd_run,
    "import": cmd_import,
    "migrate": cmd_migrate,
    "check": cmd_check,
    "queues": cmd_queues,
    "dlq": cmd_dlq,
    "enqueue": cmd_enqueue,
    "bench": cmd_bench,
    "sim": cmd_sim,
    "chaos": cmd_chaos,
    "adopt": cmd_adopt,
    "schema": cmd_schema,
    "tokens": cmd_tokens,
}
