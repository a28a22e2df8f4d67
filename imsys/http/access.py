"""Who a request speaks for, and what it may reach: the admin token every tenant, a
tenant's token (`imsys.tokens`) that tenant alone.

Each ``/api`` route declares its access where it is added (`imsys.http.openapi.Routes`,
``access=``):

- ``"admin"``: the admin token only. A tenant's token gets 403: the queues, dead
  letters, tokens, service-wide settings.
- ``"tenant"``: a tenant's token too. Every reference the request carries is checked
  here, in one place, before the handler runs: the ids in its path
  (``/api/routers/{id}/plan``: a router), in its query (``?tenant_id=``,
  ``?router_id=``...) and in its validated body (`check_body`, from
  `imsys.http.common.parse`: ``tenant_id``, ``router_id``, ``package_id``,
  ``subscriber_id``). One of another tenant's is a 404, as if it did not exist, so a
  token cannot even learn which ids are taken. A list's handler filters by
  ``scope_of(request).tenant``.

A route that declares nothing is admin-only: nothing leaks by omission (and
``tests/test_tenant_access.py`` fails until it is declared).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import asyncpg
import pydantic
from aiohttp import web

from imsys.http.json import ApiError

Access = Literal["admin", "tenant"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What the id after each path segment names, and the ids a query or body may carry.
PATH_KINDS: Final = {
    "tenants": "tenant",
    "routers": "router",
    "packages": "package",
    "subscribers": "subscriber",
    "batches": "user batch",  # /api/bouncer/batches/{id}
}
FIELD_KINDS: Final = {
    "tenant_id": "tenant",
    "router_id": "router",
    "package_id": "package",
    "subscriber_id": "subscriber",
}
# The ids of ``kind`` among $1 that belong to tenant $2.
OWNED_SQL: Final = {
    "router": "SELECT id FROM routers WHERE id = ANY($1::bigint[]) AND tenant_id = $2",
    "package": "SELECT id FROM packages WHERE id = ANY($1::bigint[]) AND tenant_id = $2",
    "subscriber": "SELECT id FROM subscribers WHERE id = ANY($1::bigint[]) AND tenant_id = $2",
    "user batch": "SELECT id FROM user_batches WHERE id = ANY($1::bigint[]) AND tenant_id = $2",
}
MAX_ID: Final = 2**63 - 1
_PARAM: Final = re.compile(r"^\{(\w+)(?::.*)?\}$")
_INT: Final = pydantic.TypeAdapter(int)


@dataclass(frozen=True, slots=True)
class Scope:
    """The admin token (``tenant_id`` None) or one tenant's token."""

    tenant_id: int | None = None
    token_id: int | None = None

    @property
    def admin(self) -> bool:
        return self.tenant_id is None

    def tenant(self, asked: int | None = None) -> int | None:
        """The tenant a list is filtered to: the asked one (or every one) for the admin,
        the token's own for a tenant (another's was refused before the handler ran)."""
        return asked if self.tenant_id is None else self.tenant_id

    def as_dict(self) -> dict[str, Any]:
        if self.admin:
            return {"admin": True, "tenant_id": None, "token_id": None}
        return {"admin": False, "tenant_id": self.tenant_id, "token_id": self.token_id}


ADMIN: Final = Scope()
SCOPE = web.RequestKey("scope", Scope)


@dataclass(slots=True)
class AccessState:
    """The pool ownership is checked against, and each route's declared access."""

    db: asyncpg.Pool
    routes: dict[tuple[str, str], Access] = field(default_factory=dict)


ACCESS = web.AppKey("access", AccessState)


def install(app: web.Application, db: asyncpg.Pool) -> None:
    app[ACCESS] = AccessState(db)


def declare(app: web.Application, method: str, path: str, access: Access | None) -> None:
    """Record a route's access (from `imsys.http.openapi.Routes`) by its canonical path
    (``/api/routers/{id}``, as aiohttp's resource names it); None is admin-only."""
    if access is not None and ACCESS in app:
        app[ACCESS].routes[(method.upper(), path)] = access


def declared(app: web.Application, method: str, path: str) -> Access | None:
    return app[ACCESS].routes.get((method.upper(), path)) if ACCESS in app else None


def scope_of(request: web.Request) -> Scope:
    """The request's scope, set by the bearer check (`imsys.http.server.bearer_auth`)."""
    return request[SCOPE]


def _as_id(value: object) -> int | None:
    """A path or query value as `imsys.http.common.int_param` reads it (None: it refuses
    it)."""
    try:
        return int(str(value))
    except ValueError:
        return None


def _as_field(value: object) -> int | None:
    """A body value as a model's ``int`` field reads it (None: validation refuses it)."""
    try:
        return _INT.validate_python(value)
    except pydantic.ValidationError:
        return None


def path_refs(path: str, match: Mapping[str, str]) -> list[tuple[str, int | None]] | None:
    """The (kind, id) of each reference in a route's path; None when the path holds an id
    this module cannot check (the route then stays admin-only)."""
    refs: list[tuple[str, int | None]] = []
    previous = ""
    for part in path.split("/"):
        param = _PARAM.match(part)
        if param is None:
            previous = part
            continue
        name = param.group(1)
        kind = PATH_KINDS.get(previous)
        if kind is not None:
            refs.append((kind, _as_id(match.get(name, ""))))
        elif name == "id" or name.endswith("_id"):
            return None
        previous = part
    return refs


def field_refs(
    items: Iterable[tuple[str, object]], read: Callable[[object], int | None] = _as_field
) -> list[tuple[str, int | None]]:
    return [(FIELD_KINDS[k], read(v)) for k, v in items if k in FIELD_KINDS and v is not None]


async def require_owned(
    request: web.Request, scope: Scope, refs: Iterable[tuple[str, int | None]]
) -> None:
    """404 naming the first reference that is not ``scope``'s tenant's (an id the
    handler would refuse as malformed is left to it)."""
    if scope.admin:
        return
    wanted: dict[str, list[int]] = {}
    for kind, id_ in refs:
        if id_ is None:
            continue
        if kind == "tenant":
            if id_ != scope.tenant_id:
                raise ApiError(404, f"tenant {id_} not found")
        elif not 0 <= id_ <= MAX_ID:
            raise ApiError(404, f"{kind} {id_} not found")
        else:
            wanted.setdefault(kind, []).append(id_)
    db = request.app[ACCESS].db
    for kind, ids in wanted.items():
        owned = {r["id"] for r in await db.fetch(OWNED_SQL[kind], ids, scope.tenant_id)}
        for id_ in ids:
            if id_ not in owned:
                raise ApiError(404, f"{kind} {id_} not found")


async def check_body(request: web.Request, body: pydantic.BaseModel) -> None:
    """A validated body's references (``tenant_id``, ``router_id``...) are the tenant's."""
    scope = request.get(SCOPE)
    if scope is not None and not scope.admin:
        await require_owned(request, scope, field_refs(body))


async def check_rows(request: web.Request, rows: Iterable[object]) -> None:
    """Each row's references are the tenant's (a bulk body, before its own validation:
    read as its model's ``int`` fields read them)."""
    scope = request.get(SCOPE)
    if scope is not None and not scope.admin:
        refs = [ref for row in rows if isinstance(row, dict) for ref in field_refs(row.items())]
        await require_owned(request, scope, refs)


def refused() -> ApiError:
    return ApiError(403, "this call needs the admin token: a tenant's token cannot make it")


@web.middleware
async def tenant_access(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A tenant's token: admin-only routes refused (403), another tenant's ids 404."""
    scope = request.get(SCOPE)
    if scope is None or scope.admin or request.match_info.http_exception is not None:
        return await handler(request)  # (no such route: the handler answers 404 / 405)
    route = request.match_info.route
    path = route.resource.canonical if route.resource is not None else ""
    if declared(request.app, request.method, path) != "tenant":
        raise refused()
    refs = path_refs(path, request.match_info)
    if refs is None:
        raise refused()
    refs += field_refs(request.query.items(), _as_id)
    await require_owned(request, scope, refs)
    return await handler(request)
