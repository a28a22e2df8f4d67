"""Admin API for router sync: routers' live status, dry-run plans, the guard, reboots and
a subscriber's forced sync."""

from __future__ import annotations

from typing import Any

import pydantic
from aiohttp import web

from imsys.deps import Deps
from imsys.errors import Deferred
from imsys.http.access import scope_of
from imsys.http.common import DEPS, correlation_id, install, int_param, optional_int, parse
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Query, Routes
from imsys.network import models, service
from imsys.network.errors import NotFound
from imsys.routeros import RouterError
from imsys.sync.adopt import adopt
from imsys.sync.context import circuit_open
from imsys.sync.reconcile import dry_run
from imsys.sync.repo import load_router
from imsys.sync.service import (
    queue_expiry,
    queue_reboot,
    queue_reconciliation,
    request_sync,
)


async def _with_circuit(request: web.Request, router: dict[str, Any]) -> dict[str, Any]:
    is_open = await circuit_open(request.app[DEPS], router["id"])
    return {**router, "circuit": "open" if is_open else "closed"}


async def get_routers(request: web.Request) -> web.Response:
    tenant = scope_of(request).tenant(optional_int(request, "tenant_id"))
    rows = await service.list_routers(request.app[DEPS].db, tenant)
    return json_response({"routers": [await _with_circuit(request, r) for r in rows]})


async def get_router(request: web.Request) -> web.Response:
    row = await service.get_router(request.app[DEPS].db, int_param(request))
    return json_response(await _with_circuit(request, row))


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


class AdoptIn(models.Strict):
    apply: bool = False
    import_unknown: bool = False
    # A router profile name -> the package its imported logins get.
    package_by_profile: dict[str, int] = pydantic.Field(default_factory=dict)


async def post_router_adopt(request: web.Request) -> web.Response:
    body = AdoptIn()
    if request.can_read_body:
        body = await parse(request, AdoptIn)
    try:
        result = await adopt(
            request.app[DEPS],
            int_param(request),
            apply=body.apply,
            import_unknown=body.import_unknown,
            package_by_profile=body.package_by_profile,
            correlation=correlation_id(request),
        )
    except Deferred as exc:
        raise ApiError(503, f"cannot reach the router now: {exc}") from None
    except RouterError as exc:
        raise ApiError(502, f"the router refused: {exc}") from None
    return json_response(result.as_dict())


class GuardConfirm(models.Strict):
    minutes: int = pydantic.Field(default=60, ge=1, le=24 * 60)


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


async def post_router_reboot(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    router_id = int_param(request)
    await service.get_router(deps.db, router_id)
    result = await queue_reboot(deps.engine.producer, router_id, correlation_id(request))
    return json_response({"queued": not result.duplicate}, status=202)


async def post_subscriber_sync(request: web.Request) -> web.Response:
    cid = correlation_id(request)
    await request_sync(request.app[DEPS].db, int_param(request), cid)
    return json_response({"queued": True, "correlation_id": cid}, status=202)


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    # A tenant's token reaches its own routers and subscribers (imsys.http.access).
    own: dict[str, Any] = {"access": "tenant"}
    r, optional = Routes(app, "sync"), {"body_required": False, **own}
    r.get(
        "/api/routers",
        get_routers,
        "routers with their live status",
        query=(Query("tenant_id", "integer", "only this tenant's"),),
        **own,
    )
    r.get(r"/api/routers/{id:\d+}", get_router, "one router with its live status", **own)
    r.post(
        r"/api/routers/{id:\d+}/plan",
        post_router_plan,
        "dry run: what reconciliation would change on the router",
        **own,
    )
    r.post(
        r"/api/routers/{id:\d+}/adopt",
        post_router_adopt,
        "take over the router's untagged logins (a plan unless apply)",
        body=AdoptIn,
        **optional,
    )
    r.post(
        r"/api/routers/{id:\d+}/guard/confirm",
        post_guard_confirm,
        "let the disconnections the mass-disconnect guard holds go through",
        body=GuardConfirm,
        **optional,
    )
    r.post(
        r"/api/routers/{id:\d+}/reboot", post_router_reboot, "queue a reboot", status=202, **own
    )
    r.post(
        r"/api/subscribers/{id:\d+}/sync", post_subscriber_sync, "force a sync", status=202, **own
    )
