"""The admin API's OpenAPI 3.1 document: served without a token, valid, and complete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from imsys.app import build_http
from imsys.http.openapi import OPENAPI_PATH, OPERATIONS, Routes, build_document, openapi_path
from imsys.network import models
from tests.sync_support import Stack

TOKEN = "test-token"  # the `settings` fixture's
DOCUMENTED = ("/api", "/webhooks")


@pytest.fixture
async def served(stack: Stack) -> AsyncIterator[tuple[web.Application, TestClient[Any, Any]]]:
    """The admin app exactly as the service builds it (`imsys.app.build_http`)."""
    app = build_http(stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield app, client


async def test_document_is_public_and_valid_openapi_31(
    served: tuple[web.Application, TestClient[Any, Any]],
) -> None:
    """GET /api/openapi.json answers without a token, and openapi-spec-validator accepts
    the document as OpenAPI 3.1; every other /api call still wants the token."""
    _app, client = served
    resp = await client.get(OPENAPI_PATH)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises OpenAPIValidationError on any problem
    assert (await client.get("/api/queues")).status == 401


async def test_every_api_and_webhook_route_is_in_the_document(
    served: tuple[web.Application, TestClient[Any, Any]],
) -> None:
    """Walking the app's route table: each /api and /webhooks method and path the server
    answers is described (so a route added without its declaration fails here)."""
    app, client = served
    doc = await (await client.get(OPENAPI_PATH)).json()
    seen = 0
    missing = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in ("HEAD", "*") or not path.startswith(DOCUMENTED):
            continue
        seen += 1
        if route.method.lower() not in doc["paths"].get(path, {}):
            missing.append(f"{route.method} {path}")
    assert missing == [], "routes missing from the OpenAPI document"
    assert seen >= 30  # the walk saw the real table, not an empty one


async def test_request_bodies_are_the_models_the_handlers_validate_with(
    served: tuple[web.Application, TestClient[Any, Any]],
) -> None:
    """The document's body schemas are the pydantic models `parse` uses: a field added to
    the model shows up; the bulk import takes an array of the same subscriber model."""
    _app, client = served
    doc = await (await client.get(OPENAPI_PATH)).json()
    schemas = doc["components"]["schemas"]
    assert schemas["RouterIn"]["properties"].keys() == models.RouterIn.model_fields.keys()
    assert set(schemas["RouterIn"]["required"]) == {
        name for name, f in models.RouterIn.model_fields.items() if f.is_required()
    }
    post_router = doc["paths"]["/api/routers"]["post"]
    body = post_router["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RouterIn"}
    assert "201" in post_router["responses"]
    bulk = doc["paths"]["/api/subscribers/bulk"]["post"]["requestBody"]["content"]
    assert bulk["application/x-ndjson"]["schema"]["items"] == {
        "$ref": "#/components/schemas/SubscriberIn"
    }
    get_sub = doc["paths"]["/api/subscribers/{id}"]["get"]
    assert get_sub["parameters"][0] == {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
    assert get_sub["security"] == [{"bearer": []}]
    assert doc["paths"]["/api/openapi.json"]["get"]["security"] == []


async def test_body_the_document_refuses_is_refused_by_the_server(
    served: tuple[web.Application, TestClient[Any, Any]],
) -> None:
    """What the schema forbids (an unknown field, a missing required one), the server
    refuses with 400: both come from the same model."""
    _app, client = served
    doc = await (await client.get(OPENAPI_PATH)).json()
    tenant = doc["components"]["schemas"]["TenantIn"]
    assert tenant["additionalProperties"] is False
    assert "name" in tenant["required"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.post("/api/tenants", json={"name": "x", "colour": "red"}, headers=auth)
    assert resp.status == 400
    assert "colour" in (await resp.json())["error"]
    resp = await client.post("/api/tenants", json={}, headers=auth)
    assert resp.status == 400
    assert "name" in (await resp.json())["error"]


def test_path_patterns_become_typed_parameters() -> None:
    """aiohttp's ``{id:\\d+}`` is an integer path parameter; another pattern is kept."""
    assert openapi_path(r"/api/routers/{id:\d+}/plan")[0] == "/api/routers/{id}/plan"
    _, params = openapi_path(r"/api/demo/routers/{index:\d{1,3}}/outage")
    assert params[0]["schema"] == {"type": "integer", "minimum": 0}
    path, params = openapi_path(r"/api/dead-letters/{id:\d{1,20}-\d{1,20}}")
    assert path == "/api/dead-letters/{id}"
    assert params[0]["schema"] == {"type": "string", "pattern": r"^\d{1,20}-\d{1,20}$"}
    _, params = openapi_path("/api/tenants/{id}/templates/{name}")
    assert [p["name"] for p in params] == ["id", "name"]


def test_a_route_declared_on_a_fresh_app_is_documented() -> None:
    """One `Routes` call adds the route and its declaration; the document is valid."""
    app = web.Application()

    async def handler(_request: web.Request) -> web.Response:
        return web.json_response({})

    class Receipt(pydantic.BaseModel):
        message_id: str

    Routes(app, "webhooks").post(
        "/webhooks/example", handler, "a provider's receipt", body=Receipt, auth=False
    )
    doc = build_document(app[OPERATIONS], version="test")
    validate(doc)
    op = doc["paths"]["/webhooks/example"]["post"]
    assert op["security"] == []
    assert "401" not in op["responses"]
    assert [r.method for r in app.router.routes()] == ["POST"]
