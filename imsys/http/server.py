"""The admin HTTP server: health, metrics, queues and dead letters (domains add theirs)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final

import asyncpg
import structlog
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from imsys import tokens
from imsys.errors import ConfigError, Unavailable
from imsys.http import access
from imsys.http.access import SCOPE, Scope, scope_of, tenant_access
from imsys.http.common import domain_errors, has_own_body_limit, page_limit
from imsys.http.idempotency import IDEMPOTENCY, IdempotencyStore, idempotency
from imsys.http.json import ApiError, json_response, not_found
from imsys.http.openapi import Query, Routes, add_openapi, is_public
from imsys.http.scrape import channel_states, declare_series, router_states
from imsys.settings import HttpSettings
from imsys.streams.deadletters import ENTRY_ID
from imsys.streams.engine import Engine
from imsys.streams.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from imsys.streams.metrics import RouterState

log = structlog.get_logger("imsys.http")

ENGINE = web.AppKey("engine", Engine)
REDIS = web.AppKey("redis", Redis)
DB = web.AppKey("db", asyncpg.Pool)
TOKEN = web.AppKey("token", str)
MAX_BODY = web.AppKey("max_body_bytes", int)

EXAMPLE_TOKEN: Final = "change-me"  # noqa: S105 -- the example token, refused
MIN_TOKEN_LENGTH: Final = 32
DEFAULT_MAX_BODY: Final = 1024 * 1024
# Seconds a client should wait before retrying while PostgreSQL or Redis is away.
RETRY_AFTER_S: Final = 5

# PostgreSQL not answering, as asyncpg says it: the connection failed or went away, the
# server is starting, shutting down or full (anything else is a real error).
PG_DOWN: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)
PG_GONE_MESSAGES: Final = ("pool is closed", "pool is closing", "connection is closed")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.strip().lower() == "localhost"


def check_listen_safety(http: HttpSettings) -> None:
    """Refuse to listen beyond loopback with a short token or the example's."""
    if _is_loopback(http.host):
        return
    # The token itself never appears in the message: it is a secret, weak or not.
    token = http.token.get_secret_value().strip()
    if token.lower() == EXAMPLE_TOKEN:
        problem = "is the example's 'change-me'"
    elif len(token) < MIN_TOKEN_LENGTH:
        problem = f"is shorter than {MIN_TOKEN_LENGTH} characters"
    else:
        return
    raise ConfigError(
        f"http.host is {http.host!r} but http.token {problem}: set a random token of at "
        f"least {MIN_TOKEN_LENGTH} characters (IMSYS_HTTP__TOKEN, e.g. `openssl rand -hex "
        "24`) before listening beyond loopback"
    )


def _raised_in(tb: TracebackType | None) -> str | None:
    """The backing service whose client code an exception came out of, if any."""
    service = None
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith("asyncpg"):
            service = "PostgreSQL"
        elif module.startswith("redis"):
            service = "Redis"
        tb = tb.tb_next
    return service


def unavailable_service(exc: BaseException) -> str | None:
    """The service (PostgreSQL or Redis) that ``exc`` says does not answer, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RedisConnectionError | RedisTimeoutError):
            return "Redis"
        if isinstance(current, PG_DOWN):
            return "PostgreSQL"
        if isinstance(current, asyncpg.InterfaceError) and str(current) in PG_GONE_MESSAGES:
            return "PostgreSQL"
        if isinstance(current, OSError) and (service := _raised_in(current.__traceback__)):
            return service
        current = current.__cause__ or current.__context__
    if isinstance(exc, Unavailable):
        text = str(exc).lower()
        return "Redis" if "redis" in text else "PostgreSQL" if "postgres" in text else None
    return None


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than the limit of {limit} bytes (http.max_body_bytes)",
        limit=limit,
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON; PostgreSQL or Redis not answering is a 503, never a 500."""
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPRequestEntityTooLarge:
        # aiohttp's own (a chunked body past client_max_size) is plain text.
        raise too_large(request.app[MAX_BODY]) from None
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            raise ApiError(exc.status, exc.reason) from None
        raise
    except Exception as exc:
        service = unavailable_service(exc)
        if service is not None:
            # The class only: a connection error's text may name a host or a URL.
            log.warning(
                "api_backing_service_unavailable",
                service=service,
                path=request.path,
                error=type(exc).__name__,
            )
            raise ApiError(
                503,
                f"{service} unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        # Every answer is JSON, a bug's too; the traceback goes to the log only.
        log.exception("api_internal_error", path=request.path)
        raise ApiError(500, "internal error") from None


@web.middleware
async def body_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a body announced larger than the limit before reading any of it.

    A chunked body has no length up front: ``client_max_size`` (the same limit) stops
    reading it there, and ``errors_as_json`` turns that into the same 413.
    """
    limit = request.app[MAX_BODY]
    if has_own_body_limit(request.match_info.handler):
        return await handler(request)  # it reads its body under its own limit (bulk import)
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, errors and the dashboard's files included."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.path == "/api" or request.path.startswith("/api/"):
        # Answers carry subscribers' data and tokens: no cache keeps a copy.
        response.headers["Cache-Control"] = "no-store"


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The admin token (`http.token`) or a tenant's (`imsys.tokens`): the request's
    `Scope`, which `imsys.http.access.tenant_access` then applies."""
    if request.path.startswith("/api/") and not is_public(request.match_info.handler):
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        expected = request.app[TOKEN]
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing or wrong bearer token")
        # Constant-time compare; an empty configured token never matches.
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            request[SCOPE] = access.ADMIN
        else:
            found = await tokens.resolve(request.app[DB], token)
            if found is None:
                raise ApiError(401, "missing or wrong bearer token")
            request[SCOPE] = Scope(tenant_id=found.tenant_id, token_id=found.id)
    return await handler(request)


async def me(request: web.Request) -> web.Response:
    """Whom the token speaks for (the dashboard names the tenant and shows its cards)."""
    scope = scope_of(request)
    answer = scope.as_dict()
    if not scope.admin:
        answer["tenant_name"] = await request.app[DB].fetchval(
            "SELECT name FROM tenants WHERE id = $1", scope.tenant_id
        )
    return json_response(answer)


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
    # Both may answer while the engine cannot work (a loop that keeps crashing).
    problems = engine.health()
    status = "unavailable" if not ok else "degraded" if problems else "ok"
    return json_response(
        {"ok": status == "ok", "status": status, **detail, "problems": problems},
        status=200 if status == "ok" else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    declare_series(engine)
    figures = await engine.figures()
    routers: list[RouterState] | None = None
    try:
        routers = await router_states(request.app[DB])
    except (*PG_DOWN, asyncpg.InterfaceError, OSError):
        pass  # the streams' figures still answer while PostgreSQL is away
    channels = await channel_states(request.app[REDIS], engine.keys)
    dead = await engine.dead_letters.count()
    body = engine.metrics.render(figures, dead, routers, channels)
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


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
    limit = page_limit(request)
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


DEAD_Q: Final = (
    Query("limit", "integer", "1-1000, default 100"),
    Query("before", description="a dead-letter id to page back from"),
    Query("stream", description="only this stream's"),
)


def build_app(
    engine: Engine,
    redis: Redis,
    db: asyncpg.Pool,
    token: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> web.Application:
    # Outermost first: errors become JSON, then the body limit and the token are checked
    # before an Idempotency-Key can replay anything; a domain's error becomes its 4xx
    # inside, so an Idempotency-Key keeps that answer too.
    app = web.Application(
        middlewares=[
            errors_as_json,
            body_limit,
            bearer_auth,
            tenant_access,
            idempotency,
            domain_errors,
        ],
        client_max_size=max_body_bytes,
    )
    app.on_response_prepare.append(security_headers)
    app[ENGINE] = engine
    app[REDIS] = redis
    app[DB] = db
    app[TOKEN] = token
    app[MAX_BODY] = max_body_bytes
    app[IDEMPOTENCY] = IdempotencyStore(db)
    access.install(app, db)
    add_openapi(app)
    r, dead = Routes(app, "engine"), f"/api/dead-letters/{{id:{ENTRY_ID}}}"
    r.get("/healthz", healthz, "health (no token)", auth=False, answer="ok, or 503 and why")
    r.get("/metrics", metrics, "Prometheus text (no token)", auth=False, answer_type="text/plain")
    admin = {"access": "admin"}  # the service's own, not a tenant's
    r.get("/api/queues", queues, "per-stream figures, job progress, live processes", **admin)
    r.get(
        "/api/dead-letters",
        list_dead_letters,
        "dead letters, newest first",
        query=DEAD_Q,
        **admin,
    )
    r.post(f"{dead}/replay", replay_dead_letter, "put a dead letter back on its stream", **admin)
    r.delete(dead, drop_dead_letter, "drop a dead letter", **admin)
    r.get(
        "/api/me",
        me,
        "whom the token speaks for: the admin, or one tenant",
        answer='{"admin", "tenant_id", "token_id", "tenant_name"}',
        access="tenant",
    )
    return app
