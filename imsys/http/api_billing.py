"""Admin API for billing: payments and a tenant's message templates."""

from __future__ import annotations

from aiohttp import web

from imsys.billing import payments, repo, templates
from imsys.deps import Deps
from imsys.http.access import scope_of
from imsys.http.common import DEPS, install, int_param, optional_int, parse
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Query, Routes
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


async def put_messaging(request: web.Request) -> web.Response:
    """Which account a tenant sends through (a name under [messaging.accounts], never a
    credential), and whether a failed WhatsApp message goes again by SMS."""
    data = await parse(request, templates.MessagingIn)
    deps = request.app[DEPS]
    if data.account is not None and data.account not in deps.settings.messaging.accounts:
        raise ApiError(400, f"no messaging account named {data.account!r} in the configuration")
    row = await repo.save_messaging(deps.db, int_param(request), data.account, data.sms_fallback)
    if row is None:
        raise NotFound(f"tenant {int_param(request)}")
    return json_response(row)


async def put_whatsapp_template(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if kind not in templates.KINDS:
        raise ApiError(404, f"no notification kind {kind!r}; kinds: {', '.join(templates.KINDS)}")
    data = await parse(request, templates.WhatsAppTemplateIn)
    tenant_id = int_param(request)
    row = await repo.save_whatsapp_template(request.app[DEPS].db, tenant_id, kind, data)
    if row is None:
        raise NotFound(f"tenant {tenant_id}")
    return json_response(row)


async def get_notifications(request: web.Request) -> web.Response:
    sub = optional_int(request, "subscriber_id")
    rows = await repo.recent_notifications(
        request.app[DEPS].db, sub, tenant_id=scope_of(request).tenant()
    )
    return json_response({"notifications": rows})


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    r = Routes(app, "billing")
    # A tenant's token: its own payments, templates and ledger (imsys.http.access). Which
    # of the operator's provider accounts a tenant sends through is the admin's choice.
    own = "tenant"
    r.post(
        "/api/payments",
        post_payment,
        "record a payment (unique provider reference)",
        body=payments.PaymentIn,
        status=201,
        idempotent_key=True,
        answer="the payment; 200 with duplicate true when the reference is known",
        access=own,
    )
    r.put(
        r"/api/tenants/{id:\d+}/templates/{name}",
        put_template,
        "set a tenant's message template",
        body=templates.TemplateIn,
        access=own,
    )
    r.get(
        "/api/notifications",
        get_notifications,
        "the newest notifications (the ledger)",
        query=(Query("subscriber_id", "integer", "only this subscriber's"),),
        access=own,
    )
    r.put(
        r"/api/tenants/{id:\d+}/messaging",
        put_messaging,
        "a tenant's messaging: its account's name (never a credential), SMS fallback",
        body=templates.MessagingIn,
        access="admin",
    )
    r.put(
        r"/api/tenants/{id:\d+}/whatsapp-templates/{kind}",
        put_whatsapp_template,
        "a tenant's approved WhatsApp template for a notification kind",
        body=templates.WhatsAppTemplateIn,
        access=own,
    )
