"""Typed RouterOS operations over one pooled connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

import structlog

from imsys.routeros.connection import Connection
from imsys.routeros.errors import NoSuchItem, RouterInputError
from imsys.routeros.menus import (
    HOTSPOT_ACTIVE,
    HOTSPOT_USER,
    PPP_ACTIVE,
    PPP_SECRET,
    SYSTEM_RESOURCE,
)
from imsys.routeros.target import RouterTarget
from imsys.routeros.wire import Command, Reply
from imsys.routeros.words import (
    attribute_words,
    check_ascii,
    id_list,
    menu_path,
    proplist_words,
    query_words,
    query_words_any,
)

log = structlog.get_logger("imsys.routeros")

# Tests ORed into one print by ``print_any``; more go in further prints, sent together.
# RouterOS documents no limit on a query's length; this keeps each sentence modest.
OR_TESTS_PER_PRINT: Final = 200


@dataclass(frozen=True)
class Write:
    """One change for ``RouterSession.write_many``: add ``fields``, set ``fields`` on
    ``item_id``, or remove ``item_id``; ``guard`` may refuse it as it would be sent."""

    action: Literal["add", "set", "remove"]
    menu: str
    fields: Mapping[str, str] = field(default_factory=dict)
    item_id: str | None = None
    guard: Callable[[], None] | None = None

    def command(self) -> Command:
        """The API command; RouterInputError when an argument cannot be sent."""
        path = menu_path(self.menu)
        words = []
        if self.action != "add":
            if self.item_id is None:
                raise RouterInputError(f"{self.menu}: {self.action} needs an item id")
            words.append(f"=.id={id_list([self.item_id])}")
        if self.action != "remove":
            words.extend(attribute_words(self.fields))
        return Command(f"{path}/{self.action}", words, write=True, guard=self.guard)


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

    async def _run_many(self, commands: Sequence[Command]) -> list[Reply | Exception]:
        async with self._lock:
            if self._ended:
                raise RuntimeError("this RouterSession has ended; open another from the pool")
            connection = await self._lease.connection()
            return await connection.run_many(commands)

    async def write_many(self, writes: Sequence[Write]) -> list[str | Exception]:
        """Send ``writes`` together, tagged (they must not depend on each other: RouterOS
        runs them concurrently). One result per write, in order: the new `.id` of an add
        ("" for a set or remove, or a menu that answers none), or the exception that
        failed that write alone (a trap, a refused guard, a lost connection)."""
        results: list[str | Exception] = [""] * len(writes)
        commands: list[Command] = []
        positions: list[int] = []
        for i, w in enumerate(writes):
            try:
                commands.append(w.command())
            except RouterInputError as exc:
                results[i] = exc
                continue
            positions.append(i)
        if commands:
            for i, reply in zip(positions, await self._run_many(commands), strict=True):
                results[i] = reply if isinstance(reply, Exception) else reply.done.get("ret", "")
        return results

    async def print_any(
        self, menu: str, tests: Sequence[tuple[str, str]], *, proplist: list[str] | None = None
    ) -> list[dict[str, str]]:
        """Rows of ``menu`` with any of ``tests`` (field, value) equal: ORed with the
        query stack (`?a=1 ?b=2 ?#|`), OR_TESTS_PER_PRINT at a time in prints sent
        together. A row matching tests of two prints comes once."""
        path = menu_path(menu)
        step = OR_TESTS_PER_PRINT
        chunks = [tests[i : i + step] for i in range(0, len(tests), step)]
        commands = []
        for chunk in chunks:
            words = [*proplist_words(proplist), *query_words_any(chunk)]
            commands.append(Command(f"{path}/print", words))
        rows: dict[str, dict[str, str]] = {}
        for reply in await self._run_many(commands) if commands else []:
            if isinstance(reply, Exception):
                raise reply
            for row in reply.rows:
                rows.setdefault(row.get(".id", str(len(rows))), row)
        return list(rows.values())

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
