"""Typed RouterOS operations over one pooled connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from imsys.routeros.connection import Connection, Reply
from imsys.routeros.errors import NoSuchItem, RouterInputError
from imsys.routeros.menus import (
    HOTSPOT_ACTIVE,
    HOTSPOT_USER,
    PPP_ACTIVE,
    PPP_SECRET,
    SYSTEM_RESOURCE,
)
from imsys.routeros.target import RouterTarget
from imsys.routeros.words import (
    attribute_words,
    check_ascii,
    id_list,
    menu_path,
    proplist_words,
    query_words,
)

log = structlog.get_logger("imsys.routeros")


class ConnectionLease(Protocol):
    """Where a session gets its (one) connection; a broken one is replaced on demand."""

    async def connection(self) -> Connection: ...


class RouterSession:
    """Commands to one router, over a connection held for the `async with` block.

    Every value given and returned is a string exactly as on the router; rows are plain
    dicts with `.id`. Commands on one session run one after another.
    """

    def __init__(self, target: RouterTarget, lease: ConnectionLease) -> None:
        self.target = target
        self._lease = lease
        # One connection carries one command at a time; tasks sharing a session queue.
        self._lock = asyncio.Lock()
        # Runs in the same step as each write is sent, and may refuse it by raising
        # (a job's fence: ``Job.check_claim``).
        self.guard: Callable[[], None] | None = None
        self._ended = False

    def end(self) -> None:
        self._ended = True

    async def _run(self, command: str, words: list[str], *, write: bool = False) -> Reply:
        async with self._lock:
            if self._ended:
                raise RuntimeError("this RouterSession has ended; open another from the pool")
            connection = await self._lease.connection()
            guard = self.guard if write else None
            return await connection.run(command, words, write=write, guard=guard)

    # -- generic --------------------------------------------------------------------

    async def print(
        self,
        menu: str,
        *,
        where: Mapping[str, str] | None = None,
        proplist: list[str] | None = None,
    ) -> list[dict[str, str]]:
        """Rows of `menu` (e.g. `menus.PPP_SECRET`) whose fields equal all of `where`,
        limited to the `proplist` fields when given."""
        path = menu_path(menu)
        words = [*proplist_words(proplist), *query_words(where)]
        return (await self._run(f"{path}/print", words)).rows

    async def add(self, menu: str, fields: Mapping[str, str]) -> str:
        """Add an item; returns its new `.id` ("" if the menu answers none)."""
        path = menu_path(menu)
        reply = await self._run(f"{path}/add", attribute_words(fields), write=True)
        return reply.done.get("ret", "")

    async def set(self, menu: str, item_id: str, fields: Mapping[str, str]) -> None:
        """Change fields of the item `item_id` (a `.id`, or a name in config menus)."""
        path = menu_path(menu)
        words = [f"=.id={id_list([item_id])}", *attribute_words(fields)]
        await self._run(f"{path}/set", words, write=True)

    async def remove(self, menu: str, *ids: str) -> None:
        """Remove the items; one unknown id fails the whole command (NoSuchItem)."""
        if not ids:
            return
        path = menu_path(menu)
        await self._run(f"{path}/remove", [f"=.id={id_list(ids)}"], write=True)

    # -- conveniences ---------------------------------------------------------------

    async def secrets(self, comment_tag: str | None = None) -> list[dict[str, str]]:
        """PPP secrets; with `comment_tag`, only those whose comment starts with it."""
        return _tagged(await self.print(PPP_SECRET), comment_tag)

    async def hotspot_users(self, comment_tag: str | None = None) -> list[dict[str, str]]:
        """Hotspot users; with `comment_tag`, only those whose comment starts with it."""
        return _tagged(await self.print(HOTSPOT_USER), comment_tag)

    async def active_ppp(self, name: str | None = None) -> list[dict[str, str]]:
        """Live PPP sessions, all or those of `name`."""
        return await self.print(PPP_ACTIVE, where=None if name is None else {"name": name})

    async def active_hotspot(self, user: str | None = None) -> list[dict[str, str]]:
        """Live hotspot sessions, all or those of `user`."""
        return await self.print(HOTSPOT_ACTIVE, where=None if user is None else {"user": user})

    async def kick_ppp(self, name: str) -> list[str]:
        """End `name`'s PPP sessions; returns the `.id`s of the sessions this call removed."""
        return await self._kick(PPP_ACTIVE, "name", name)

    async def kick_hotspot(self, user: str) -> list[str]:
        """End `user`'s hotspot sessions; returns the `.id`s of the sessions this call
        removed."""
        return await self._kick(HOTSPOT_ACTIVE, "user", user)

    async def _kick(self, menu: str, key: str, who: str) -> list[str]:
        if not check_ascii(who, key):
            raise RouterInputError(f"{menu}: the {key} whose sessions to end is empty")
        found = await self.print(menu, where={key: who}, proplist=[".id"])
        removed: list[str] = []
        # One by one: a list with one id that already left would fail as a whole.
        for row in found:
            try:
                await self.remove(menu, row[".id"])
            except NoSuchItem:
                continue  # the subscriber left between the print and the remove
            removed.append(row[".id"])
        log.info(
            "router_sessions_kicked",
            router_id=self.target.router_id,
            command=f"{menu}/remove",
            found=len(found),
            removed=len(removed),
        )
        return removed

    async def resource(self) -> dict[str, str]:
        """The system resource: version, uptime, cpu-load, board-name and the rest."""
        rows = await self.print(SYSTEM_RESOURCE)
        return rows[0] if rows else {}

    async def reboot(self) -> None:
        """Reboot the router. Returns once the router dropped the connection (success);
        a later command on this session connects again."""
        async with self._lock:
            if self._ended:
                raise RuntimeError("this RouterSession has ended; open another from the pool")
            connection = await self._lease.connection()
            await connection.reboot()


def _tagged(rows: list[dict[str, str]], comment_tag: str | None) -> list[dict[str, str]]:
    # RouterOS queries match whole values only, so a prefix is filtered here.
    if comment_tag is None:
        return rows
    return [row for row in rows if row.get("comment", "").startswith(comment_tag)]
