"""JSON responses and errors for the admin API: every answer is JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "__str__"):
        return str(value)
    raise TypeError


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


class ApiError(web.HTTPException):
    """An error the client can act on: ``{"error": message}`` with a 4xx status (503
    when a backing service is down)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **detail: Any,
    ) -> None:
        self.status_code = status
        super().__init__(
            headers=headers,
            text=orjson.dumps({"error": message, **detail}).decode(),
            content_type="application/json",
        )


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 saying why it is not."""
    raw = await request.read()
    if not raw:
        raise ApiError(400, "request body is empty; a JSON object is expected")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
