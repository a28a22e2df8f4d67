"""RouterOS API adapter on librouteros's async client.

    pool = RouterPool()
    async with pool.session(target) as ros:
        rows = await ros.print(menus.PPP_SECRET, where={"name": "alice"})
    await pool.close()

Values go both ways as the router's own strings. Failures arrive as the errors below
(never as librouteros's): RouterUnavailable is retryable, the rest are permanent.
"""

from __future__ import annotations

from imsys.routeros import menus
from imsys.routeros.errors import (
    AlreadyExists,
    InvalidValue,
    NoSuchItem,
    RouterAuthError,
    RouterError,
    RouterInputError,
    RouterTLSError,
    RouterTrap,
    RouterUnavailable,
)
from imsys.routeros.pool import RouterPool
from imsys.routeros.session import RouterSession
from imsys.routeros.target import RouterTarget
from imsys.routeros.words import is_true, parse_uptime

__all__ = [
    "AlreadyExists",
    "InvalidValue",
    "NoSuchItem",
    "RouterAuthError",
    "RouterError",
    "RouterInputError",
    "RouterPool",
    "RouterSession",
    "RouterTLSError",
    "RouterTarget",
    "RouterTrap",
    "RouterUnavailable",
    "is_true",
    "menus",
    "parse_uptime",
]
