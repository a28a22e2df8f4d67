"""What the dashboard's views read beyond the live figures: a subscriber's invoices,
payments and audit trail, the history of finished jobs, and throughput over the last hour.

Plain admin API routes (the bearer token, JSON answers, declared for the OpenAPI
document): another client may read them as the dashboard does. The notification ledger
the page shows is ``GET /api/notifications`` (`imsys.http.api_billing`).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from imsys.billing import account
from imsys.http.common import int_param, page_limit
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Query, Routes
from imsys.http.server import DB, ENGINE
from imsys.network import service
from imsys.streams import activity
from imsys.sync.audit_trail import subscriber_audit

OUTCOMES: Final = ("done", "retried", "deferred", "dead")
SUBSCRIBER: Final = r"/api/subscribers/{id:\d+}"


async def _subscriber_id(request: web.Request) -> int:
    """The path's subscriber, or a 404 when there is none (not an empty list)."""
    subscriber_id = int_param(request)
    await service.get_subscriber(request.app[DB], subscriber_id)  # NotFound → 404
    return subscriber_id


async def get_invoices(request: web.Request) -> web.Response:
    sid = await _subscriber_id(request)
    rows = await account.invoices(request.app[DB], sid, page_limit(request, 100, 500))
    return json_response({"invoices": rows})


async def get_payments(request: web.Request) -> web.Response:
    sid = await _subscriber_id(request)
    rows = await account.payments(request.app[DB], sid, page_limit(request, 100, 500))
    return json_response({"payments": rows})


async def get_audit(request: web.Request) -> web.Response:
    sid = await _subscriber_id(request)
    rows = await subscriber_audit(request.app[DB], sid, page_limit(request, 200, 1000))
    return json_response({"audit": rows})


async def get_history(request: web.Request) -> web.Response:
    q = request.query
    engine = request.app[ENGINE]
    stream = q.get("stream") or None
    if stream is not None and stream not in engine.consumers:
        raise ApiError(400, f"stream must be one of {', '.join(engine.consumers)}")
    outcome = q.get("outcome") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise ApiError(400, f"outcome must be one of {', '.join(OUTCOMES)}")
    before = q.get("before") or None
    if before is not None and not _is_entry_id(before):
        raise ApiError(400, "before must be a history id such as 1700000000000-0")
    rows = await activity.recent_history(
        engine.redis,
        engine.keys,
        limit=page_limit(request, 100, 1000),
        stream=stream,
        outcome=outcome,
        before=before,
    )
    return json_response({"history": rows})


def _is_entry_id(text: str) -> bool:
    """A stream entry id Redis accepts (each part below 2**64)."""
    ms, _, seq = text.partition("-")
    if not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return False
    return int(ms) < 2**64 and int(seq) < 2**64


async def get_throughput(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        minutes = int(request.query.get("minutes", "60"))
    except ValueError:
        raise ApiError(400, "minutes must be an integer") from None
    if not 1 <= minutes <= 120:
        raise ApiError(400, "minutes must be from 1 to 120")
    data = await activity.throughput(
        engine.redis, engine.keys, list(engine.consumers), minutes=minutes
    )
    return json_response(data)


LIMIT_Q: Final = Query("limit", "integer", "how many, newest first")


def add_routes(app: web.Application) -> None:
    """Needs `imsys.http.server.build_app`'s app (its PostgreSQL pool and engine)."""
    r = Routes(app, "activity")
    # A subscriber's own views are its tenant's (the path's id is checked by
    # imsys.http.access); the engine's history and throughput are the service's.
    own, admin = "tenant", "admin"
    r.get(
        f"{SUBSCRIBER}/invoices",
        get_invoices,
        "a subscriber's invoices",
        query=(LIMIT_Q,),
        access=own,
    )
    r.get(
        f"{SUBSCRIBER}/payments",
        get_payments,
        "a subscriber's payments",
        query=(LIMIT_Q,),
        access=own,
    )
    r.get(
        f"{SUBSCRIBER}/audit",
        get_audit,
        "a subscriber's audit trail: cause, router command, outcome",
        query=(LIMIT_Q,),
        access=own,
    )
    r.get(
        "/api/history",
        get_history,
        "finished jobs, newest first (the engine keeps the last engine.history_max)",
        query=(
            LIMIT_Q,
            Query("stream", description="only this stream's"),
            Query("outcome", description="done, retried, deferred or dead"),
            Query("before", description="a history id to page back from"),
        ),
        access=admin,
    )
    r.get(
        "/api/throughput",
        get_throughput,
        "jobs processed per minute and per second of each stream, oldest minute first",
        query=(Query("minutes", "integer", "1-120, default 60"),),
        access=admin,
    )
