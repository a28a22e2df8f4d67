"""Admin API for the network model: tenants, routers, packages, subscribers."""

from __future__ import annotations

from aiohttp import web

from imsys.deps import Deps
from imsys.http.common import (
    DEPS,
    correlation_id,
    install,
    int_param,
    optional_int,
    page_limit,
    parse,
)
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response
from imsys.network import models, service
from imsys.sync.service import package_changed, subscriber_changed


@creating
async def post_tenant(request: web.Request) -> web.Response:
    data = await parse(request, models.TenantIn)
    return json_response(await service.create_tenant(request.app[DEPS].db, data), status=201)


async def get_tenants(request: web.Request) -> web.Response:
    return json_response({"tenants": await service.list_tenants(request.app[DEPS].db)})


async def patch_tenant(request: web.Request) -> web.Response:
    patch = await parse(request, models.TenantPatch)
    return json_response(
        await service.update_tenant(request.app[DEPS].db, int_param(request), patch)
    )


async def patch_router(request: web.Request) -> web.Response:
    patch = await parse(request, models.RouterPatch)
    return json_response(
        await service.update_router(request.app[DEPS].db, int_param(request), patch)
    )


async def delete_router(request: web.Request) -> web.Response:
    return json_response(await service.delete_router(request.app[DEPS].db, int_param(request)))


@creating
async def post_router(request: web.Request) -> web.Response:
    data = await parse(request, models.RouterIn)
    return json_response(await service.create_router(request.app[DEPS].db, data), status=201)


@creating
async def post_package(request: web.Request) -> web.Response:
    data = await parse(request, models.PackageIn)
    row = await service.create_package(
        request.app[DEPS].db, data, correlation_id(request), on_package=package_changed
    )
    return json_response(row, status=201)


async def patch_package(request: web.Request) -> web.Response:
    patch = await parse(request, models.PackagePatch)
    row = await service.update_package(
        request.app[DEPS].db,
        int_param(request),
        patch,
        correlation_id(request),
        on_package=package_changed,
        on_change=subscriber_changed,
    )
    return json_response(row)


async def delete_package(request: web.Request) -> web.Response:
    row = await service.delete_package(
        request.app[DEPS].db,
        int_param(request),
        correlation_id(request),
        on_package=package_changed,
    )
    return json_response(row)


async def get_packages(request: web.Request) -> web.Response:
    rows = await service.list_packages(request.app[DEPS].db, optional_int(request, "tenant_id"))
    return json_response({"packages": rows})


@creating
async def post_subscriber(request: web.Request) -> web.Response:
    data = await parse(request, models.SubscriberIn)
    row = await service.create_subscriber(
        request.app[DEPS].db, data, correlation_id(request), on_change=subscriber_changed
    )
    return json_response(row, status=201)


async def get_subscriber(request: web.Request) -> web.Response:
    return json_response(await service.get_subscriber(request.app[DEPS].db, int_param(request)))


async def get_subscribers(request: web.Request) -> web.Response:
    q = request.query
    limit = page_limit(request)
    try:
        offset = max(int(q.get("offset", "0")), 0)
    except ValueError:
        raise ApiError(400, "offset must be an integer") from None
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


async def delete_subscriber(request: web.Request) -> web.Response:
    row = await service.delete_subscriber(
        request.app[DEPS].db,
        int_param(request),
        correlation_id(request),
        on_change=subscriber_changed,
    )
    return json_response(row)


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    r = app.router
    r.add_post("/api/tenants", post_tenant)
    r.add_get("/api/tenants", get_tenants)
    r.add_patch(r"/api/tenants/{id:\d+}", patch_tenant)
    r.add_post("/api/routers", post_router)
    r.add_patch(r"/api/routers/{id:\d+}", patch_router)
    r.add_delete(r"/api/routers/{id:\d+}", delete_router)
    r.add_post("/api/packages", post_package)
    r.add_get("/api/packages", get_packages)
    r.add_patch(r"/api/packages/{id:\d+}", patch_package)
    r.add_delete(r"/api/packages/{id:\d+}", delete_package)
    r.add_post("/api/subscribers", post_subscriber)
    r.add_get("/api/subscribers", get_subscribers)
    r.add_get(r"/api/subscribers/{id:\d+}", get_subscriber)
    r.add_patch(r"/api/subscribers/{id:\d+}", patch_subscriber)
    r.add_delete(r"/api/subscribers/{id:\d+}", delete_subscriber)
