"""The one place a Redis client is built: one node from ``redis.url``, or through Sentinel.

With ``redis.sentinels`` set, the client asks the sentinels for the current primary of
``redis.sentinel_master`` whenever it opens a connection, so the reconnect that follows a
failover reaches the new primary. A connection that finds its node demoted to a replica
(``READONLY``) is dropped and surfaces as a ``ConnectionError``: the engine's loops treat
it as Redis being away and reconnect with backoff. From ``redis.url`` only the database
number, username, password and TLS (``rediss://`` and its query options) apply then; its
host and port are ignored.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel

from imsys.settings import RedisSettings, Settings

# The sentinels answer one short question each; a dead one must not hold up the others.
SENTINEL_TIMEOUT_S = 2.0


def _options(*, decode: bool) -> dict[str, Any]:
    return {
        "decode_responses": decode,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        # Each blocking reader holds a connection of its own; jobs borrow the rest.
        "max_connections": 1000,
    }


class SentinelRedis(Redis):
    """A client of the primary named by the sentinels; closing it closes their clients too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                await self.sentinel_manager.aclose()


def make_redis(settings: Settings | RedisSettings, *, decode: bool = True) -> Redis:
    """A client for imsys's Redis; ``decode=False`` gives replies as bytes."""
    cfg = settings.redis if isinstance(settings, Settings) else settings
    url = cfg.url.get_secret_value()
    if not cfg.sentinels:
        return Redis.from_url(url, **_options(decode=decode))

    node: dict[str, Any] = dict(parse_url(url))
    for where in ("host", "port", "path"):
        node.pop(where, None)
    connection_class = node.pop("connection_class", None)
    if isinstance(connection_class, type) and issubclass(connection_class, SSLConnection):
        node["ssl"] = True
    sentinel_password = cfg.sentinel_password.get_secret_value() or None
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        cfg.sentinel_addresses(),
        sentinel_kwargs={
            "password": sentinel_password,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_keepalive": True,
        },
    )
    client = cast(
        SentinelRedis,
        sentinel.master_for(
            cfg.sentinel_master, redis_class=SentinelRedis, **{**_options(decode=decode), **node}
        ),
    )
    client.sentinel_manager = sentinel
    return client
