"""Admin API for billing: payments and a tenant's message templates."""

from __future__ import annotations

from aiohttp import web

from imsys.billing import payments, repo, templates
from imsys.deps import Deps
from imsys.http.common import DEPS, install, int_param, optional_int, parse
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response
from imsys.network.errors import NotFound


@creating
async def post_payment(request: web.Request) -> web.Response:
    data = await parse(request, payments.PaymentIn)
    row, created = await payments.record_payment(request.app[DEPS].db, data)
    return json_response({**row, "duplicate": not created}, status=201 if created else 200)


async def put_template(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in templates.NAMES:
        raise ApiError(404, f"no template named {name!r}; templates: {', '.join(templates.NAMES)}")
    data = await parse(request, templates.TemplateIn)
    tenant_id = int_param(request)
    row = await repo.save_template(request.app[DEPS].db, tenant_id, name, data.body)
    if row is None:
        raise NotFound(f"tenant {tenant_id}")
    return json_response(row)


async def get_notifications(request: web.Request) -> web.Response:
    sub = optional_int(request, "subscriber_id")
    rows = await repo.recent_notifications(request.app[DEPS].db, sub)
    return json_response({"notifications": rows})


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    app.router.add_post("/api/payments", post_payment)
    app.router.add_put(r"/api/tenants/{id:\d+}/templates/{name}", put_template)
    app.router.add_get("/api/notifications", get_notifications)
