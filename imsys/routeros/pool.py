"""A small pool of API connections per router.

Each router gets at most `max_concurrency` connections from this process: a session
holds one of that many slots for its whole `async with` block and owns at most one
connection at a time. Connections that ended their last command cleanly go back to
an idle stack and are reused; any other is closed on the spot.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog

from imsys.routeros.connection import Connection
from imsys.routeros.session import RouterSession
from imsys.routeros.target import RouterTarget
from imsys.routeros.tls import client_context

log = structlog.get_logger("imsys.routeros")


@dataclass(eq=False)
class _Router:
    target: RouterTarget
    slots: asyncio.Semaphore
    # Built once per target: loading CAs is not free.
    ssl_context: ssl.SSLContext | None = None
    idle: list[Connection] = field(default_factory=list)
    # Every open connection, idle or in use, so that close() reaches them all.
    open: set[Connection] = field(default_factory=set)
    # Superseded by a changed target (new address or password): reuse nothing.
    retired: bool = False


class _Lease:
    def __init__(self, pool: RouterPool, router: _Router) -> None:
        self._pool = pool
        self._router = router
        self._connection: Connection | None = None

    async def connection(self) -> Connection:
        current = self._connection
        if current is not None:
            if current.healthy():
                return current
            self._connection = None
            self._pool._drop(self._router, current, "broken in session")
        self._connection = await self._pool._checkout(self._router)
        return self._connection

    def release(self) -> None:
        current, self._connection = self._connection, None
        if current is not None:
            self._pool._checkin(self._router, current)


class RouterPool:
    """Connections to many routers, shared by all tasks of the process.

    A target with `use_tls` gets the context its TLS settings ask for (a pinned
    fingerprint, a CA, or no verification: see routeros/tls.py); `ssl_context` serves
    the ones with no setting of their own (the system's CAs without it).
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._routers: dict[int, _Router] = {}
        self._closed = False

    @asynccontextmanager
    async def session(self, target: RouterTarget) -> AsyncIterator[RouterSession]:
        """A RouterSession on one of the router's slots; waits while all are taken.

        The connection is opened (or taken from the idle ones) at the first command.
        """
        if self._closed:
            raise RuntimeError("RouterPool is closed")
        router = self._router(target)
        async with router.slots:
            lease = _Lease(self, router)
            session = RouterSession(target, lease)
            try:
                yield session
            finally:
                session.end()
                # Synchronous on purpose: it must complete even when we are cancelled.
                lease.release()

    def open_connections(self, router_id: int) -> int:
        """Connections this pool holds open to the router (idle and in use)."""
        router = self._routers.get(router_id)
        # A discarded connection is closed already; its session forgets it at next use.
        return 0 if router is None else sum(1 for c in router.open if not c.broken)

    async def close(self) -> None:
        """Close every connection, idle or in use. Safe to call twice."""
        self._closed = True
        routers = list(self._routers.values())
        self._routers.clear()
        connections: list[Connection] = []
        for router in routers:
            router.retired = True
            connections.extend(router.open)
            router.open.clear()
            router.idle.clear()
        await asyncio.gather(*(connection.close() for connection in connections))
        log.debug("router_pool_closed", connections=len(connections))

    # -- for _Lease -----------------------------------------------------------------

    def _router(self, target: RouterTarget) -> _Router:
        router = self._routers.get(target.router_id)
        if router is not None and router.target == target:
            return router
        if router is not None:
            # Sessions still running on the old target finish on their connections,
            # which are closed when they end; for that while the router may see more
            # than max_concurrency connections from us.
            router.retired = True
            for connection in router.idle:
                self._drop(router, connection, "router settings changed")
            router.idle.clear()
            log.info("router_target_changed", router_id=target.router_id)
        router = _Router(
            target,
            asyncio.Semaphore(target.max_concurrency),
            client_context(target, self._ssl_context),
        )
        self._routers[target.router_id] = router
        return router

    async def _checkout(self, router: _Router) -> Connection:
        if self._closed:
            raise RuntimeError("RouterPool is closed")
        while router.idle:
            connection = router.idle.pop()
            if connection.healthy():
                return connection
            self._drop(router, connection, "closed while idle")
        connection = await Connection.open(router.target, router.ssl_context)
        if self._closed:
            connection.discard("pool closed")
            raise RuntimeError("RouterPool is closed")
        router.open.add(connection)
        return connection

    def _checkin(self, router: _Router, connection: Connection) -> None:
        if connection.healthy() and not router.retired and not self._closed:
            router.idle.append(connection)
        else:
            self._drop(router, connection, "not reusable")

    def _drop(self, router: _Router, connection: Connection, reason: str) -> None:
        router.open.discard(connection)
        connection.discard(reason)
