"""Admin API for billing: payments and a tenant's message templates."""

from __future__ import annotations

from typing import Any

import pydantic
from aiohttp import web

from imsys.billing import payments, templates
from imsys.http.api_sync import DEPS, domain_errors, int_param, parse
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response
from imsys.network.errors import NotFound


@creating
@domain_errors
async def post_payment(request: web.Request) -> web.Response:
    data = await parse(request, payments.PaymentIn)
    row, created = await payments.record_payment(request.app[DEPS].db, data)
    return json_response({**row, "duplicate": not created}, status=201 if created else 200)


class TemplateIn(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    body: str = pydantic.Field(min_length=1, max_length=1000)

    @pydantic.field_validator("body")
    @classmethod
    def _known_variables(cls, v: str) -> str:
        return templates.check(v)


@domain_errors
async def put_template(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ("invoice", "reminder", "payment_ack"):
        raise ApiError(
            404, f"no template named {name!r}; templates: invoice, reminder, payment_ack"
        )
    data = await parse(request, TemplateIn)
    tenant_id = int_param(request)
    db = request.app[DEPS].db
    if not await db.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id):
        raise NotFound(f"tenant {tenant_id}")
    row: Any = await db.fetchrow(
        """
        INSERT INTO message_templates (tenant_id, template, body) VALUES ($1, $2, $3)
        ON CONFLICT (tenant_id, template) DO UPDATE SET body = EXCLUDED.body, updated_at = now()
        RETURNING tenant_id, template, body, updated_at
        """,
        tenant_id,
        name,
        data.body,
    )
    return json_response(dict(row))


@domain_errors
async def get_notifications(request: web.Request) -> web.Response:
    sub = int_param(request, "subscriber_id") if "subscriber_id" in request.query else None
    rows = await request.app[DEPS].db.fetch(
        """
        SELECT id, subscriber_id, channel, recipient, template, status, attempts,
               provider_message_id, error, created_at, sent_at
        FROM notifications WHERE $1::bigint IS NULL OR subscriber_id = $1
        ORDER BY id DESC LIMIT 200
        """,
        sub,
    )
    return json_response({"notifications": [dict(r) for r in rows]})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/payments", post_payment)
    app.router.add_put(r"/api/tenants/{id:\d+}/templates/{name}", put_template)
    app.router.add_get("/api/notifications", get_notifications)
