"""The dashboard: ``GET /`` and ``/static/...``, plus the demo panel's ``/api/demo`` calls.

The page itself is public and holds no data; its script reads everything from ``/api``
with the bearer token the operator types in (kept in the tab's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import pydantic
from aiohttp import web

from imsys.http import api_activity
from imsys.http.common import parse
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Routes

STATIC = Path(__file__).resolve().parent / "static"

# The page loads only its own script and stylesheet and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class DemoControl(Protocol):
    """What the demo panel needs from the running demo (see `imsys.demo.Demo`)."""

    def status(self) -> dict[str, Any]: ...

    async def set_outage(self, index: int, down: bool | None) -> dict[str, Any]: ...


DEMO: web.AppKey[DemoControl | None] = web.AppKey("demo")


class DemoOutage(pydantic.BaseModel):
    """``{"down": true}`` takes a simulated router offline, ``false`` brings it back."""

    down: pydantic.StrictBool | None = None


async def index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def demo_status(request: web.Request) -> web.Response:
    demo = request.app[DEMO]
    return json_response(demo.status() if demo is not None else {"enabled": False})


async def demo_outage(request: web.Request) -> web.Response:
    """Take simulated router ``i`` offline (``{"down": true}``), bring it back
    (``{"down": false}``), or toggle it (no body)."""
    demo = request.app[DEMO]
    if demo is None:
        raise ApiError(404, "demo mode is off")
    down: bool | None = None
    if request.can_read_body:
        down = (await parse(request, DemoOutage)).down
    index_ = int(request.match_info["index"])
    try:
        return json_response(await demo.set_outage(index_, down))
    except IndexError:
        raise ApiError(404, f"demo router {index_} not found") from None


def add_routes(app: web.Application, demo: DemoControl | None = None) -> None:
    app[DEMO] = demo
    app.router.add_static("/static/", STATIC, name="static")
    r = Routes(app, "dashboard")
    r.get("/", index, "the dashboard page (no token)", auth=False, answer_type="text/html")
    r.get("/api/demo", demo_status, "demo mode and its simulated routers", access="admin")
    r.post(
        r"/api/demo/routers/{index:\d{1,3}}/outage",
        demo_outage,
        "demo mode: take a simulated router offline or bring it back (no body toggles)",
        body=DemoOutage,
        body_required=False,
        access="admin",
    )
    # The JSON the page's subscriber, history and throughput views read.
    api_activity.add_routes(app)
