"""Admin API for tenant tokens (`imsys.tokens`); whom a token speaks for is
``GET /api/me`` (`imsys.http.server`).

``POST /api/tokens`` is not ``@creating``: an Idempotency-Key would keep its answer, the
token itself, in ``idempotency_keys``; a lost answer is a token to delete and make again.
"""

from __future__ import annotations

from aiohttp import web

from imsys import tokens
from imsys.deps import Deps
from imsys.http.common import DEPS, install, int_param, optional_int, parse
from imsys.http.json import json_response
from imsys.http.openapi import Query, Routes


async def post_token(request: web.Request) -> web.Response:
    data = await parse(request, tokens.TokenIn)
    return json_response(await tokens.create(request.app[DEPS].db, data), status=201)


async def get_tokens(request: web.Request) -> web.Response:
    rows = await tokens.list_tokens(request.app[DEPS].db, optional_int(request, "tenant_id"))
    return json_response({"tokens": rows})


async def delete_token(request: web.Request) -> web.Response:
    return json_response(await tokens.delete(request.app[DEPS].db, int_param(request)))


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    r, admin = Routes(app, "tokens"), {"access": "admin"}
    r.post(
        "/api/tokens",
        post_token,
        "a token bound to one tenant; the answer is the only time it is shown",
        body=tokens.TokenIn,
        status=201,
        answer='{"id", "tenant_id", "name", "created_at", "token"}',
        **admin,
    )
    r.get(
        "/api/tokens",
        get_tokens,
        "tenant tokens (never a secret)",
        query=(Query("tenant_id", "integer", "only this tenant's"),),
        answer='{"tokens": [...]}',
        **admin,
    )
    r.delete(r"/api/tokens/{id:\d+}", delete_token, "revoke a tenant token", **admin)
