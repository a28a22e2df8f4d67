"""What every admin API module shares: the one app key, body parsing, domain errors.

Each ``api_*.py`` only declares its routes: its handlers read the request (`parse`,
`int_param`), call a domain or network function with ``request.app[DEPS]`` and answer
JSON. Its ``add_routes(app, deps)`` calls `install`, so the modules may be added in any
order, or alone. A domain error raised by any handler becomes its status in
`domain_errors`, the innermost middleware (`imsys.http.server.build_app`), so an
``Idempotency-Key`` keeps the 4xx answer as it keeps a success.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import pydantic
from aiohttp import web

from imsys.deps import Deps
from imsys.http.access import check_body
from imsys.http.json import ApiError, read_json
from imsys.network.errors import Conflict, Invalid, NotFound
from imsys.validation import problems

# The shared dependencies, the one thing the API's handlers need from the application.
DEPS = web.AppKey("deps", Deps)

M = TypeVar("M", bound=pydantic.BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


def install(app: web.Application, deps: Deps) -> None:
    """Put ``deps`` under `DEPS` (once; every ``add_routes`` must be given the same)."""
    if DEPS in app and app[DEPS] is not deps:
        raise RuntimeError("the admin API was given two different Deps")
    app[DEPS] = deps


def correlation_id(request: web.Request) -> str:
    """The caller's X-Correlation-Id, or a new one; it links the audit log to this call."""
    given = request.headers.get("X-Correlation-Id", "")
    return given[:100] if given else f"api:{uuid.uuid4()}"


async def parse(request: web.Request, model: type[M], *, limit: int | None = None) -> M:
    """The body as ``model``, or a 400 naming each problem (the first ``limit`` of them);
    a 404 when a tenant's token names another tenant's object in it (`check_body`)."""
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except pydantic.ValidationError as exc:
        found = problems(exc, whole="body", limit=limit)
        raise ApiError(400, "; ".join(found), fields=found) from None
    # A tenant's token: its tenant_id, router_id... are its own, or this is a 404.
    await check_body(request, body)
    return body


_OWN_BODY_LIMIT = "_imsys_own_body_limit"


def own_body_limit(handler: H) -> H:
    """Mark a handler that reads its body itself under a limit of its own (a bulk import):
    the global ``http.max_body_bytes`` check (`imsys.http.server.body_limit`) passes it by."""
    setattr(handler, _OWN_BODY_LIMIT, True)
    return handler


def has_own_body_limit(handler: object) -> bool:
    return getattr(handler, _OWN_BODY_LIMIT, False) is True


async def read_limited(request: web.Request, limit: int, setting: str) -> bytes:
    """The body, read streamed, or a 413 naming ``setting`` once it passes ``limit`` bytes."""

    def too_large() -> ApiError:
        return ApiError(
            413, f"request body is larger than the limit of {limit} bytes ({setting})", limit=limit
        )

    if request.content_length is not None and request.content_length > limit:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def int_param(request: web.Request, name: str = "id") -> int:
    raw = request.match_info.get(name) or request.query.get(name)
    try:
        return int(raw or "")
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


def optional_int(request: web.Request, name: str) -> int | None:
    return int_param(request, name) if name in request.query else None


def page_limit(request: web.Request, default: int = 100, most: int = 1000) -> int:
    """The ``limit`` query parameter: an integer from 1, capped at ``most``."""
    try:
        limit = min(int(request.query.get("limit", str(default))), most)
    except ValueError:
        raise ApiError(400, "limit must be an integer") from None
    if limit < 1:
        raise ApiError(400, "limit must be at least 1")
    return limit


@web.middleware
async def domain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A domain's refusal as the client's error: 404, 409 or 400 with its message."""
    try:
        return await handler(request)
    except NotFound as exc:
        raise ApiError(404, f"{exc} not found") from None
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    except Invalid as exc:
        raise ApiError(400, str(exc)) from None
    except asyncpg.DataError as exc:
        # PostgreSQL cannot hold the value (an id past 64 bits, a NUL in text): the
        # client's mistake, not ours. Passwords are ASCII-only, so none is echoed here.
        raise ApiError(400, f"a value cannot be stored: {exc}") from None
