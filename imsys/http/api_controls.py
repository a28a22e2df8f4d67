"""Operators' controls: pause and resume a stream, put a router in maintenance.

A paused stream accepts jobs and runs none, in every process (``streams/pause.py``); a
router in maintenance has its jobs wait without spending attempts and is not reconciled
by the timer (``sync/maintenance.py``).
"""

from __future__ import annotations

import pydantic
from aiohttp import web

from imsys.deps import Deps
from imsys.http.common import DEPS, install, int_param, parse
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Routes
from imsys.network import models
from imsys.streams.pause import UnknownStream
from imsys.sync.maintenance import set_maintenance


async def _pause_or_resume(request: web.Request, *, pause: bool) -> web.Response:
    engine = request.app[DEPS].engine
    stream = request.match_info["stream"]
    try:
        changed = await (engine.pause(stream) if pause else engine.resume(stream))
    except UnknownStream as exc:
        raise ApiError(404, str(exc)) from None
    return json_response({"stream": stream, "paused": pause, "changed": changed})


async def post_pause(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, pause=True)


async def post_resume(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, pause=False)


class MaintenanceIn(models.Strict):
    """``until``: an ISO 8601 instant with its offset, in the future; null ends it now."""

    until: pydantic.AwareDatetime | None


async def post_maintenance(request: web.Request) -> web.Response:
    body = await parse(request, MaintenanceIn)
    row = await set_maintenance(request.app[DEPS].db, int_param(request), body.until)
    return json_response(row)


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    r = Routes(app, "controls")
    done = "the stream, its state and whether this call changed it"
    r.post(
        "/api/queues/{stream}/pause",
        post_pause,
        "pause a stream: it accepts jobs and runs none, in every process; running jobs finish",
        answer=done,
        access="admin",  # the service's streams, every tenant's work
    )
    r.post(
        "/api/queues/{stream}/resume",
        post_resume,
        "resume a paused stream: its waiting jobs run",
        answer=done,
        access="admin",
    )
    r.post(
        r"/api/routers/{id:\d+}/maintenance",
        post_maintenance,
        "put the router in maintenance until an instant (null ends it): its jobs wait "
        "without spending attempts and reconciliation passes it by",
        body=MaintenanceIn,
        answer="the router id and its maintenance_until",
        access="tenant",  # the tenant's own router (imsys.http.access checks the id)
    )
