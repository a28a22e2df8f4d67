"""Admin API for Bouncer e-mail verification: submit a user batch, follow its progress."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from imsys.bouncer import service
from imsys.deps import Deps
from imsys.http.access import scope_of
from imsys.http.common import DEPS, install, parse
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Query, Routes
from imsys.network.errors import NotFound

# A list of a million bad values would make a million-line error: name a few.
SHOWN_PROBLEMS: Final = 5


@creating
async def post_batch(request: web.Request) -> web.Response:
    data = await parse(request, service.UserBatchIn, limit=SHOWN_PROBLEMS)
    if data.tenant_id is None:
        data.tenant_id = scope_of(request).tenant()  # a tenant's token: its own batch
    deps = request.app[DEPS]
    row = await service.submit(deps.db, deps.settings.bouncer_batching, data)
    return json_response(row, status=201)


async def get_batch(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    # The route admits digits only; past 64 bits no batch can have that id.
    if len(raw) > 18:
        raise NotFound(f"user batch {raw}")
    return json_response(await service.get_user_batch(request.app[DEPS].db, int(raw)))


async def get_batches(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise ApiError(400, "limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit must be between 1 and 1000")
    rows = await service.list_user_batches(request.app[DEPS].db, limit, scope_of(request).tenant())
    return json_response({"batches": rows})


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    # A tenant's token submits and sees its own tenant's batches (imsys.http.access).
    r, own = Routes(app, "bouncer"), "tenant"
    r.post(
        "/api/bouncer/batches",
        post_batch,
        "submit a user batch of e-mails to verify",
        body=service.UserBatchIn,
        status=201,
        idempotent_key=True,
        access=own,
    )
    r.get(
        "/api/bouncer/batches",
        get_batches,
        "the newest user batches",
        query=(Query("limit", "integer", "1-1000, default 50"),),
        access=own,
    )
    r.get(
        r"/api/bouncer/batches/{id:\d+}",
        get_batch,
        "one user batch and its progress",
        access=own,
    )
