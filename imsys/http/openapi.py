"""The admin API's OpenAPI 3.1 document, built from the routes as they are added.

A route is added and declared in the same line (`Routes`): its aiohttp handler, a
summary, the pydantic model its handler validates the body with (the very one given to
`imsys.http.common.parse`), its query parameters and what a success answers. The path
parameters come from the route's own pattern (``{id:\\d+}`` is an integer). So the
document (``GET /api/openapi.json``, no token) describes what the server does: a route
added without its declaration is missing from it, and ``tests/test_openapi.py`` fails.

Schemas are pydantic's JSON Schema (draft 2020-12, the dialect of OpenAPI 3.1), with
every model under ``components/schemas``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import pydantic
from aiohttp import web

from imsys.http.access import Access, declare

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPENAPI_PATH: Final = "/api/openapi.json"
_PUBLIC: Final = "_imsys_public"
_PARAM = re.compile(r"\{(?P<name>\w+)(?::(?P<pattern>[^{}]*(?:\{[^{}]*\}[^{}]*)*))?\}")
_INTEGER_PATTERN = re.compile(r"\\d(\+|\{\d+(,\d*)?\})")


def public(handler: Handler) -> Handler:
    """Mark a handler under ``/api`` that needs no bearer token (this document)."""
    setattr(handler, _PUBLIC, True)
    return handler


def is_public(handler: object) -> bool:
    return getattr(handler, _PUBLIC, False) is True


@dataclass(frozen=True, slots=True)
class Query:
    """One query parameter: its name, JSON Schema type and meaning."""

    name: str
    type: str = "string"
    description: str = ""


@dataclass(frozen=True, slots=True)
class Operation:
    """One method on one path, as the document describes it."""

    method: str
    path: str  # aiohttp's, patterns included: /api/routers/{id:\d+}
    summary: str
    tag: str
    body: Any = None  # what `parse` validates the body with (a model, or list[Model])
    body_required: bool = True
    body_types: tuple[str, ...] = ("application/json",)
    query: tuple[Query, ...] = ()
    status: int = 200
    answer: str = "the result, as JSON"
    answer_type: str = "application/json"
    auth: bool = True  # the bearer token (webhooks carry a provider's signature instead)
    idempotent_key: bool = False  # honours Idempotency-Key (a creating POST)
    # Who may call it (`imsys.http.access`): "admin" only, or a "tenant"'s token too
    # (its references checked). None: not declared, so admin-only.
    access: Access | None = None


OPERATIONS: Final = web.AppKey("openapi_operations", list[Operation])


@dataclass(slots=True)
class Routes:
    """Adds routes to ``app`` and declares them for the document, one line each::

    api = Routes(app, "network")
    api.post("/api/tenants", post_tenant, "create a tenant", body=models.TenantIn,
             status=201)
    """

    app: web.Application
    tag: str
    _ops: list[Operation] = field(init=False)

    def __post_init__(self) -> None:
        if OPERATIONS not in self.app:
            self.app[OPERATIONS] = []
        self._ops = self.app[OPERATIONS]

    def add(self, method: str, path: str, handler: Handler, summary: str, **kw: Any) -> None:
        self.app.router.add_route(method, path, handler)
        op = Operation(method.upper(), path, summary, self.tag, **kw)
        self._ops.append(op)
        declare(self.app, op.method, openapi_path(path)[0], op.access)  # aiohttp's canonical

    def get(self, path: str, handler: Handler, summary: str, **kw: Any) -> None:
        self.add("GET", path, handler, summary, **kw)

    def post(self, path: str, handler: Handler, summary: str, **kw: Any) -> None:
        self.add("POST", path, handler, summary, **kw)

    def put(self, path: str, handler: Handler, summary: str, **kw: Any) -> None:
        self.add("PUT", path, handler, summary, **kw)

    def patch(self, path: str, handler: Handler, summary: str, **kw: Any) -> None:
        self.add("PATCH", path, handler, summary, **kw)

    def delete(self, path: str, handler: Handler, summary: str, **kw: Any) -> None:
        self.add("DELETE", path, handler, summary, **kw)


def openapi_path(path: str) -> tuple[str, list[dict[str, Any]]]:
    """aiohttp's path as OpenAPI's (``{id:\\d+}`` → ``{id}``) and its path parameters."""
    params: list[dict[str, Any]] = []

    def plain(match: re.Match[str]) -> str:
        name, pattern = match["name"], match["pattern"]
        schema: dict[str, Any] = {"type": "string"}
        if pattern and _INTEGER_PATTERN.fullmatch(pattern):
            schema = {"type": "integer", "minimum": 0}
        elif pattern:
            schema["pattern"] = f"^{pattern}$"
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
        return "{" + name + "}"

    return _PARAM.sub(plain, path), params


ERROR_SCHEMA: Final = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "what is wrong"}},
    "required": ["error"],
    "additionalProperties": True,
}
_ERRORS: Final = {
    "400": "invalid request: the body, a parameter or a value (`error` names each problem)",
    "404": "no such object",
    "409": "conflicts with the current state",
    "413": "request body over the limit",
    "503": "PostgreSQL or Redis does not answer (with Retry-After)",
}


def _schemas(ops: list[Operation]) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Each operation's body schema (by index) and the shared components."""
    with_body = [(i, op) for i, op in enumerate(ops) if op.body is not None]
    if not with_body:
        return {}, {}
    by_key, defs = pydantic.TypeAdapter.json_schemas(
        [(i, "validation", pydantic.TypeAdapter(op.body)) for i, op in with_body],
        ref_template="#/components/schemas/{model}",
    )
    return {key: schema for (key, _mode), schema in by_key.items()}, defs.get("$defs", {})


def _operation(op: Operation, body: dict[str, Any] | None, params: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', op.path.lower())}".rstrip(
            "_"
        ),
        "tags": [op.tag],
    }
    query = [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "description": q.description,
            "schema": {"type": q.type},
        }
        for q in op.query
    ]
    if op.idempotent_key:
        query.append({"$ref": "#/components/parameters/IdempotencyKey"})
    if params or query:
        out["parameters"] = [*params, *query]
    if body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {t: {"schema": body} for t in op.body_types},
        }
    answer: dict[str, Any] = {"description": op.answer}
    if op.answer_type:
        answer["content"] = {op.answer_type: {"schema": {}}}
    responses: dict[str, Any] = {str(op.status): answer}
    for code in _ERRORS:
        responses[code] = {"$ref": f"#/components/responses/E{code}"}
    if op.auth:
        responses["401"] = {"$ref": "#/components/responses/E401"}
        if op.access != "tenant":
            responses["403"] = {"$ref": "#/components/responses/E403"}
    out["responses"] = responses
    out["security"] = [{"bearer": []}] if op.auth else []
    return out


def build_document(ops: list[Operation], *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``ops``."""
    bodies, components = _schemas(ops)
    paths: dict[str, dict[str, Any]] = {}
    for i, op in enumerate(ops):
        path, params = openapi_path(op.path)
        paths.setdefault(path, {})[op.method.lower()] = _operation(op, bodies.get(i), params)
    responses = {
        f"E{code}": {
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code, what in {
            **_ERRORS,
            "401": "missing or wrong bearer token",
            "403": "the admin token is needed: a tenant's token cannot make this call",
        }.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imsys admin API",
            "version": version,
            "description": "Every /api call but this document needs "
            "`Authorization: Bearer <http.token>` (the admin token) or a tenant's token "
            "(`POST /api/tokens`), which sees that tenant's data only: another tenant's "
            "ids are 404, and the calls answering 403 need the admin token. Every answer "
            'is JSON; an error is `{"error": "<what is wrong>"}`.',
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {**components, "Error": ERROR_SCHEMA},
            "responses": responses,
            "parameters": {
                "IdempotencyKey": {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "the same key, path and body within 24 h returns the "
                    "first answer (Idempotent-Replayed: true)",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def iter_operations(app: web.Application) -> Iterator[Operation]:
    yield from app.get(OPERATIONS, [])


def add_openapi(app: web.Application, *, version: str = "0.1.0") -> None:
    """Serve the document at ``/api/openapi.json``, built once from the declared routes."""
    cache: list[bytes] = []

    @public
    async def openapi(request: web.Request) -> web.Response:
        if not cache:
            doc = build_document(list(iter_operations(request.app)), version=version)
            cache.append(orjson.dumps(doc))
        return web.Response(body=cache[0], content_type="application/json")

    Routes(app, "meta").get(OPENAPI_PATH, openapi, "this document (no token needed)", auth=False)
