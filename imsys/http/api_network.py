"""Admin API for the network model: tenants, routers, packages, subscribers."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from imsys.deps import Deps
from imsys.http.access import check_rows, scope_of
from imsys.http.common import (
    DEPS,
    correlation_id,
    install,
    int_param,
    optional_int,
    own_body_limit,
    page_limit,
    parse,
    read_limited,
)
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Query, Routes
from imsys.network import bulk, models, service
from imsys.network.creator import SubscriberCreator
from imsys.network.models import SYNC_STATES
from imsys.sync import wireless
from imsys.sync.service import (
    package_changed,
    subscriber_changed,
    subscribers_changed,
    subscribers_created,
)

# Single creates that arrive together, written together (imsys.network.creator).
CREATOR = web.AppKey("subscriber_creator", SubscriberCreator)


@creating
async def post_tenant(request: web.Request) -> web.Response:
    data = await parse(request, models.TenantIn)
    return json_response(await service.create_tenant(request.app[DEPS].db, data), status=201)


async def get_tenants(request: web.Request) -> web.Response:
    rows = await service.list_tenants(request.app[DEPS].db)
    own = scope_of(request).tenant()
    return json_response({"tenants": [t for t in rows if own is None or t["id"] == own]})


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
    tenant = scope_of(request).tenant(optional_int(request, "tenant_id"))
    rows = await service.list_packages(request.app[DEPS].db, tenant)
    return json_response({"packages": rows})


@creating
async def post_subscriber(request: web.Request) -> web.Response:
    data = await parse(request, models.SubscriberIn)
    row = await request.app[CREATOR].create(data, correlation_id(request))
    return json_response(row, status=201)


def bulk_rows(raw: bytes, content_type: str) -> list[Any]:
    """A bulk body's rows: a JSON array, or JSON lines (``application/x-ndjson``, or a
    body that does not start with ``[``); a line that is not JSON is a 400 naming it."""
    if not raw.strip():
        raise ApiError(400, "request body is empty; a JSON array or JSON lines are expected")
    if content_type != "application/x-ndjson" and raw.lstrip()[:1] == b"[":
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise ApiError(400, "request body must be a JSON array of subscribers")
        return data
    rows: list[Any] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"line {number} is not valid JSON: {exc}") from None
        if len(rows) > bulk.MAX_ROWS:
            break  # past the most a call may hold: bulk.check refuses it
    return rows


@own_body_limit
async def post_subscribers_bulk(request: web.Request) -> web.Response:
    """Many subscribers in one call, all or nothing (bulk.create_subscribers). Not marked
    ``@creating``: a resent import that was written is refused whole (usernames taken)."""
    deps = request.app[DEPS]
    raw = await read_limited(request, deps.settings.http.max_bulk_bytes, "http.max_bulk_bytes")
    rows = bulk_rows(raw, request.content_type)
    await check_rows(request, rows)  # a tenant's token: its own tenant, routers, packages
    del raw  # the rows are all that is needed now (and bulk.check consumes them)
    try:
        ids = await bulk.create_subscribers(
            deps.db, rows, correlation_id(request), on_created=subscribers_created
        )
    except bulk.BulkInvalid as exc:
        detail = exc.as_dict()
        raise ApiError(400, detail.pop("error"), **detail) from None
    return json_response({"created": len(ids), "ids": ids}, status=201)


async def get_subscriber(request: web.Request) -> web.Response:
    row = await service.get_subscriber(request.app[DEPS].db, int_param(request))
    await wireless.attach(request.app[DEPS].db, [row])
    return json_response(row)


async def get_subscribers(request: web.Request) -> web.Response:
    q = request.query
    limit = page_limit(request)
    try:
        offset = max(int(q.get("offset", "0")), 0)
    except ValueError:
        raise ApiError(400, "offset must be an integer") from None
    status = q.get("sync_status")
    if status is not None and status not in SYNC_STATES:
        raise ApiError(400, f"sync_status must be one of {', '.join(SYNC_STATES)}")
    rows = await service.search_subscribers(
        request.app[DEPS].db,
        search=q.get("q"),
        sync_status=status,
        router_id=optional_int(request, "router_id"),
        limit=limit,
        offset=offset,
        tenant_id=scope_of(request).tenant(),
    )
    await wireless.attach(request.app[DEPS].db, rows["subscribers"])
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


TENANT_Q = Query("tenant_id", "integer", "only this tenant's")
SEARCH_Q = (
    Query("q", description="a fragment of username, phone or e-mail, matched literally"),
    Query("sync_status", description=", ".join(SYNC_STATES)),
    Query("router_id", "integer", "only this router's"),
    Query("limit", "integer", "1-1000, default 100"),
    Query("offset", "integer", "rows to skip"),
)


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    app[CREATOR] = SubscriberCreator(
        deps.db, on_change=subscriber_changed, on_created=subscribers_changed
    )
    # A tenant's token reaches its own tenant's network (imsys.http.access); creating a
    # tenant is the admin's.
    r = Routes(app, "network")
    made: dict[str, Any] = {"status": 201, "idempotent_key": True, "access": "tenant"}
    own: dict[str, Any] = {"access": "tenant"}
    admin_made = {**made, "access": "admin"}
    r.post("/api/tenants", post_tenant, "create a tenant", body=models.TenantIn, **admin_made)
    r.get("/api/tenants", get_tenants, "every tenant", answer='{"tenants": [...]}', **own)
    r.patch(
        r"/api/tenants/{id:\d+}", patch_tenant, "change a tenant", body=models.TenantPatch, **own
    )
    r.post("/api/routers", post_router, "add a router", body=models.RouterIn, **made)
    r.patch(
        r"/api/routers/{id:\d+}", patch_router, "change a router", body=models.RouterPatch, **own
    )
    r.delete(r"/api/routers/{id:\d+}", delete_router, "delete a router (409 while in use)", **own)
    r.post("/api/packages", post_package, "create a package", body=models.PackageIn, **made)
    r.get("/api/packages", get_packages, "packages", query=(TENANT_Q,), **own)
    r.patch(
        r"/api/packages/{id:\d+}",
        patch_package,
        "change a package",
        body=models.PackagePatch,
        **own,
    )
    r.delete(
        r"/api/packages/{id:\d+}", delete_package, "delete a package (409 while in use)", **own
    )
    r.post(
        "/api/subscribers", post_subscriber, "create a subscriber", body=models.SubscriberIn, **made
    )
    r.post(
        "/api/subscribers/bulk",
        post_subscribers_bulk,
        "create many subscribers, all or nothing",
        body=list[models.SubscriberIn],
        body_types=("application/json", "application/x-ndjson"),
        status=201,
        answer='{"created": N, "ids": [...]}',
        **own,
    )
    r.get("/api/subscribers", get_subscribers, "search subscribers", query=SEARCH_Q, **own)
    r.get(
        r"/api/subscribers/{id:\d+}",
        get_subscriber,
        "one subscriber, sync state and wireless link (or null) included",
        **own,
    )
    r.patch(
        r"/api/subscribers/{id:\d+}",
        patch_subscriber,
        "change a subscriber",
        body=models.SubscriberPatch,
        **own,
    )
    r.delete(
        r"/api/subscribers/{id:\d+}",
        delete_subscriber,
        "delete a subscriber (removed from its router)",
        **own,
    )
