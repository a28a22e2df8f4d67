"""Admin API for the network: tenants, routers, packages, subscribers."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pydantic
from aiohttp import web

from imsys.errors import Deferred
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response, read_json
from imsys.network import models, service
from imsys.network.errors import Conflict, Invalid, NotFound
from imsys.routeros import RouterError
from imsys.sync.context import circuit_open
from imsys.sync.reconcile import dry_run
from imsys.sync.repo import load_router
from imsys.sync.service import (
    queue_expiry,
    queue_reboot,
    queue_reconciliation,
    request_sync,
    subscriber_changed,
)

DEPS: web.AppKey[Any] = web.AppKey("deps", object)

M = TypeVar("M", bound=pydantic.BaseModel)


def correlation_id(request: web.Request) -> str:
    """The caller's X-Correlation-Id, or a new one; it links the audit log to this call."""
    given = request.headers.get("X-Correlation-Id", "")
    return given[:100] if given else f"api:{uuid.uuid4()}"


async def parse(request: web.Request, model: type[M]) -> M:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise ApiError(400, "; ".join(problems), fields=problems) from None


def int_param(request: web.Request, name: str = "id") -> int:
    raw = request.match_info.get(name) or request.query.get(name)
    try:
        return int(raw or "")
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


def optional_int(request: web.Request, name: str) -> int | None:
    return int_param(request, name) if name in request.query else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def domain_errors(fn: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
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

    return wrapped


@creating
@domain_errors
async def post_tenant(request: web.Request) -> web.Response:
    data = await parse(request, models.TenantIn)
    return json_response(await service.create_tenant(request.app[DEPS].db, data), status=201)


@domain_errors
async def get_tenants(request: web.Request) -> web.Response:
    return json_response({"tenants": await service.list_tenants(request.app[DEPS].db)})


@creating
@domain_errors
async def post_router(request: web.Request) -> web.Response:
    data = await parse(request, models.RouterIn)
    return json_response(await service.create_router(request.app[DEPS].db, data), status=201)


async def _with_circuit(request: web.Request, router: dict[str, Any]) -> dict[str, Any]:
    is_open = await circuit_open(request.app[DEPS], router["id"])
    return {**router, "circuit": "open" if is_open else "closed"}


@domain_errors
async def get_routers(request: web.Request) -> web.Response:
    rows = await service.list_routers(request.app[DEPS].db, optional_int(request, "tenant_id"))
    return json_response({"routers": [await _with_circuit(request, r) for r in rows]})


@domain_errors
async def get_router(request: web.Request) -> web.Response:
    row = await service.get_router(request.app[DEPS].db, int_param(request))
    return json_response(await _with_circuit(request, row))


@domain_errors
async def post_router_plan(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    router = await load_router(deps.db, int_param(request))
    if router is None:
        raise NotFound(f"router {int_param(request)}")
    try:
        result = await dry_run(deps, router)
    except Deferred as exc:
        raise ApiError(503, f"cannot read the router now: {exc}") from None
    except RouterError as exc:
        # Reached, but it refused us (bad login, a trap): the router's answer, not ours.
        raise ApiError(502, f"the router refused the read: {exc}") from None
    return json_response(result.as_dict())


class GuardConfirm(models.Strict):
    minutes: int = pydantic.Field(default=60, ge=1, le=24 * 60)


@domain_errors
async def post_guard_confirm(request: web.Request) -> web.Response:
    body = GuardConfirm()
    if request.can_read_body:
        body = await parse(request, GuardConfirm)
    deps = request.app[DEPS]
    row = await service.confirm_guard(deps.db, int_param(request), body.minutes)
    # Run the sweep and reconciliation again now that they may pass.
    await queue_expiry(deps.engine.producer, row["tenant_id"])
    await queue_reconciliation(deps.engine.producer, row["id"])
    return json_response(row)


@domain_errors
async def post_router_reboot(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    router_id = int_param(request)
    await service.get_router(deps.db, router_id)
    result = await queue_reboot(deps.engine.producer, router_id, correlation_id(request))
    return json_response({"queued": not result.duplicate}, status=202)


@creating
@domain_errors
async def post_package(request: web.Request) -> web.Response:
    data = await parse(request, models.PackageIn)
    return json_response(await service.create_package(request.app[DEPS].db, data), status=201)


@domain_errors
async def get_packages(request: web.Request) -> web.Response:
    rows = await service.list_packages(request.app[DEPS].db, optional_int(request, "tenant_id"))
    return json_response({"packages": rows})


@creating
@domain_errors
async def post_subscriber(request: web.Request) -> web.Response:
    data = await parse(request, models.SubscriberIn)
    row = await service.create_subscriber(
        request.app[DEPS].db, data, correlation_id(request), on_change=subscriber_changed
    )
    return json_response(row, status=201)


@domain_errors
async def get_subscriber(request: web.Request) -> web.Response:
    return json_response(await service.get_subscriber(request.app[DEPS].db, int_param(request)))


@domain_errors
async def get_subscribers(request: web.Request) -> web.Response:
    q = request.query
    try:
        limit = min(int(q.get("limit", "100")), 1000)
        offset = max(int(q.get("offset", "0")), 0)
    except ValueError:
        raise ApiError(400, "limit and offset must be integers") from None
    if limit < 1:
        raise ApiError(400, "limit must be at least 1")
    status = q.get("sync_status")
    if status is not None and status not in ("pending", "synced", "error"):
        raise ApiError(400, "sync_status must be pending, synced or error")
    rows = await service.search_subscribers(
        request.app[DEPS].db,
        search=q.get("q"),
        sync_status=status,
        router_id=optional_int(request, "router_id"),
        limit=limit,
        offset=offset,
    )
    return json_response(rows)


@domain_errors
async def patch_subscriber(request: web.Request) -> web.Response:
    patch = await parse(request, models.SubscriberPatch)
    row = await service.update_subscriber(
        request.app[DEPS].db,
        int_param(request),
        patch,
        correlation_id(request),
        on_change=subscriber_changed,
    )
    return json_response(row)


@domain_errors
async def delete_subscriber(request: web.Request) -> web.Response:
    row = await service.delete_subscriber(
        request.app[DEPS].db,
        int_param(request),
        correlation_id(request),
        on_change=subscriber_changed,
    )
    return json_response(row)


@domain_errors
async def post_subscriber_sync(request: web.Request) -> web.Response:
    cid = correlation_id(request)
    await request_sync(request.app[DEPS].db, int_param(request), cid)
    return json_response({"queued": True, "correlation_id": cid}, status=202)


def add_routes(app: web.Application, deps: Any) -> None:
    app[DEPS] = deps
    r = app.router
    r.add_post("/api/tenants", post_tenant)
    r.add_get("/api/tenants", get_tenants)
    r.add_post("/api/routers", post_router)
    r.add_get("/api/routers", get_routers)
    r.add_get(r"/api/routers/{id:\d+}", get_router)
    r.add_post(r"/api/routers/{id:\d+}/plan", post_router_plan)
    r.add_post(r"/api/routers/{id:\d+}/guard/confirm", post_guard_confirm)
    r.add_post(r"/api/routers/{id:\d+}/reboot", post_router_reboot)
    r.add_post("/api/packages", post_package)
    r.add_get("/api/packages", get_packages)
    r.add_post("/api/subscribers", post_subscriber)
    r.add_get("/api/subscribers", get_subscribers)
    r.add_get(r"/api/subscribers/{id:\d+}", get_subscriber)
    r.add_patch(r"/api/subscribers/{id:\d+}", patch_subscriber)
    r.add_delete(r"/api/subscribers/{id:\d+}", delete_subscriber)
    r.add_post(r"/api/subscribers/{id:\d+}/sync", post_subscriber_sync)
