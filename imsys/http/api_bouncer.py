"""Admin API for Bouncer e-mail verification: submit a user batch, follow its progress."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import pydantic
from aiohttp import web

from imsys.bouncer import service
from imsys.deps import Deps
from imsys.http.idempotency import creating
from imsys.http.json import ApiError, json_response, read_json

DEPS = web.AppKey("bouncer_deps", Deps)
# A list of a million bad values would make a million-line error: name a few.
SHOWN_PROBLEMS: Final = 5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def parse_batch(request: web.Request) -> service.UserBatchIn:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return service.UserBatchIn.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in errors[:SHOWN_PROBLEMS]
        ]
        if len(errors) > SHOWN_PROBLEMS:
            problems.append(f"... and {len(errors) - SHOWN_PROBLEMS} more")
        raise ApiError(400, "; ".join(problems), fields=problems) from None


def domain_errors(fn: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except service.NotFound as exc:
            raise ApiError(404, f"{exc} not found") from None
        except service.Invalid as exc:
            raise ApiError(400, str(exc)) from None

    return wrapped


@creating
@domain_errors
async def post_batch(request: web.Request) -> web.Response:
    data = await parse_batch(request)
    deps = request.app[DEPS]
    row = await service.submit(deps.db, deps.settings.bouncer_batching, data)
    return json_response(row, status=201)


@domain_errors
async def get_batch(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    # The route admits digits only; past 64 bits no batch can have that id.
    if len(raw) > 18:
        raise service.NotFound(f"user batch {raw}")
    return json_response(await service.get_user_batch(request.app[DEPS].db, int(raw)))


@domain_errors
async def get_batches(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise ApiError(400, "limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit must be between 1 and 1000")
    rows = await service.list_user_batches(request.app[DEPS].db, limit)
    return json_response({"batches": rows})


def add_routes(app: web.Application, deps: Deps) -> None:
    app[DEPS] = deps
    r = app.router
    r.add_post("/api/bouncer/batches", post_batch)
    r.add_get("/api/bouncer/batches", get_batches)
    r.add_get(r"/api/bouncer/batches/{id:\d+}", get_batch)
