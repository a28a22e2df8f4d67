"""The admin HTTP server: health, metrics, queues and dead letters (domains add theirs)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

import asyncpg
import structlog
from aiohttp import web
from redis.asyncio import Redis

from imsys.errors import ConfigError
from imsys.http.json import ApiError, json_response, not_found
from imsys.settings import HttpSettings
from imsys.streams.backoff import REDIS_DOWN
from imsys.streams.deadletters import ENTRY_ID
from imsys.streams.engine import Engine

log = structlog.get_logger("imsys.http")

ENGINE = web.AppKey("engine", Engine)
REDIS = web.AppKey("redis", Redis)
DB = web.AppKey("db", asyncpg.Pool)
TOKEN = web.AppKey("token", str)

WEAK_TOKENS = {"", "change-me"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def check_listen_safety(http: HttpSettings) -> None:
    """Refuse to listen beyond loopback with an empty or example token."""
    token = http.token.get_secret_value()
    if token not in WEAK_TOKENS:
        return
    try:
        loopback = ipaddress.ip_address(http.host).is_loopback
    except ValueError:
        loopback = http.host == "localhost"
    if not loopback:
        raise ConfigError(
            f"http.host is {http.host!r} but http.token is empty or 'change-me': "
            "set a real token (IMSYS_HTTP__TOKEN) before listening beyond loopback"
        )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            raise ApiError(exc.status, exc.reason) from None
        raise
    except REDIS_DOWN:
        log.warning("api_redis_unavailable", path=request.path)
        raise ApiError(503, "Redis is not answering; try again shortly") from None
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
        log.warning("api_database_unavailable", path=request.path)
        raise ApiError(503, "PostgreSQL is not answering; try again shortly") from None
    except Exception:
        # Every answer is JSON, a bug's too; the traceback goes to the log only.
        log.exception("api_internal_error", path=request.path)
        raise ApiError(500, "internal error") from None


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        expected = request.app[TOKEN]
        # Constant-time compare; an empty configured token never matches.
        if (
            scheme.lower() != "bearer"
            or not expected
            or not hmac.compare_digest(token.encode(), expected.encode())
        ):
            raise ApiError(401, "missing or wrong bearer token")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    detail: dict[str, str] = {}
    ok = True
    try:
        await request.app[REDIS].ping()
        detail["redis"] = "ok"
    except Exception as exc:
        ok = False
        detail["redis"] = f"unavailable: {type(exc).__name__}"
    try:
        async with request.app[DB].acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
        detail["postgres"] = "ok"
    except Exception as exc:
        ok = False
        detail["postgres"] = f"unavailable: {type(exc).__name__}"
    engine = request.app[ENGINE]
    detail["engine"] = (
        "running" if engine.ready.is_set() and not engine.stopping.is_set() else "starting"
    )
    return json_response({"ok": ok, **detail}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    figures = await engine.figures()
    body = engine.metrics.render(figures, await engine.dead_letters.count())
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def queues(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return json_response(
        {
            "streams": [f.as_dict() for f in await engine.figures()],
            "dead_letters": await engine.dead_letters.count(),
            "progress": await engine.progress(),
            "processes": await engine.processes(),
        }
    )


def _valid_entry_id(text: str) -> bool:
    """Redis rejects an id part past 64 bits; the route's pattern cannot say so."""
    ms, _, seq = text.partition("-")
    if not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return False
    return int(ms) < 2**64 and int(seq) < 2**64


def _dead_id(request: web.Request) -> str:
    dead_id = request.match_info["id"]
    if not _valid_entry_id(dead_id):
        raise not_found("dead letter")
    return dead_id


async def list_dead_letters(request: web.Request) -> web.Response:
    q = request.query
    try:
        limit = min(int(q.get("limit", "100")), 1000)
    except ValueError:
        raise ApiError(400, "limit must be an integer") from None
    if limit < 1:
        raise ApiError(400, "limit must be at least 1")
    before = q.get("before")
    # Nothing comes before 0-0, and Redis rejects it as the end of a range.
    if before is not None and (not _valid_entry_id(before) or set(before) <= {"0", "-"}):
        raise ApiError(400, "before must be a dead-letter id such as 1700000000000-0")
    letters = await request.app[ENGINE].dead_letters.list(
        limit=limit, before=before, stream=q.get("stream")
    )
    return json_response({"dead_letters": [d.as_dict() for d in letters]})


async def replay_dead_letter(request: web.Request) -> web.Response:
    new_id = await request.app[ENGINE].dead_letters.replay(_dead_id(request))
    if new_id is None:
        raise not_found("dead letter")
    return json_response({"replayed": _dead_id(request), "entry_id": new_id})


async def drop_dead_letter(request: web.Request) -> web.Response:
    if not await request.app[ENGINE].dead_letters.drop(_dead_id(request)):
        raise not_found("dead letter")
    return json_response({"dropped": _dead_id(request)})


def build_app(engine: Engine, redis: Redis, db: asyncpg.Pool, token: str) -> web.Application:
    app = web.Application(
        middlewares=[errors_as_json, bearer_auth], client_max_size=64 * 1024 * 1024
    )
    app[ENGINE] = engine
    app[REDIS] = redis
    app[DB] = db
    app[TOKEN] = token
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/queues", queues)
    app.router.add_get("/api/dead-letters", list_dead_letters)
    app.router.add_post(f"/api/dead-letters/{{id:{ENTRY_ID}}}/replay", replay_dead_letter)
    app.router.add_delete(f"/api/dead-letters/{{id:{ENTRY_ID}}}", drop_dead_letter)
    return app
