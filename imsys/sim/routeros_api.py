"""What the simulated router answers on an API connection, command by command.

`ApiResponder` turns one received sentence into reply sentences (or closes the
connection instead, when a fault or the command says so). The network around it —
listening, refusing, going down — is `RouterOSSimulator`'s, in `routeros.py`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import re
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imsys.sim.routeros_menus import (
    BAD_LOGIN,
    MENUS,
    MISSING_ITEM_OR_COMMAND,
    NO_SUCH_PREFIX,
    NOT_LOGGED_IN,
    Trap,
    unknown_segment,
)
from imsys.sim.routeros_state import RouterState, Write
from imsys.sim.routeros_wire import encode_sentence

# `=password=x`, `?=password=x`, `=response=...` (legacy login): the value becomes ***.
_SECRET_WORD = re.compile(r"^([=?][=<>]?[^=]*(?:password|response)[^=]*=).*", re.I | re.S)
_PRINT_VERBS = frozenset({"print", "getall"})

Sentence = list[str]


def redact(words: Sequence[str]) -> tuple[str, ...]:
    return tuple(_SECRET_WORD.sub(r"\1***", word) for word in words)


@dataclass(frozen=True)
class CommandRecord:
    """One sentence as received, secrets masked."""

    connection: int
    words: tuple[str, ...]

    @property
    def command(self) -> str:
        return self.words[0]


@dataclass
class DropRule:
    remaining: int
    predicate: Callable[[Write], bool] | None
    reset: bool


@dataclass(eq=False)
class Connection:
    number: int
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None
    user: str | None = None
    closed: bool = False


class ApiResponder(abc.ABC):
    def __init__(self, state: RouterState, username: str, password: str) -> None:
        self.state = state
        self.username = username
        self.password = password
        # RouterOS 7.18+ answers an empty print with `!empty` before `!done`.
        self.empty_reply = False
        # The API user's group has the `sensitive` policy; without it a router leaves
        # `password` out of every print.
        self.sensitive = True
        # Applied writes (add/set/remove/enable/disable/unset) per menu path.
        self.writes: Counter[str] = Counter()
        # Sentences received per command word (`/ppp/secret/print`, `/login`, ...): the
        # API load a router carries, read without walking `commands` (which a long run
        # may clear).
        self.command_counts: Counter[str] = Counter()
        self.commands: list[CommandRecord] = []
        self._drop: DropRule | None = None
        self._fatal: str | None = None

    @abc.abstractmethod
    def _reboot_now(self, downtime: float | None = None) -> None:
        """Restart the router (the simulator drops its connections and renumbers ids)."""

    def respond(self, conn: Connection, words: list[str]) -> list[Sentence] | None:
        """The reply sentences, or None when the connection was closed instead."""
        if self._fatal is not None:
            message, self._fatal = self._fatal, None
            self.send_fatal(conn, message)
            return None
        args: dict[str, str] = {}
        queries: list[str] = []
        tag: str | None = None
        for word in words[1:]:
            if word.startswith("="):
                name, _, value = word[1:].partition("=")
                args[name] = value
            elif word.startswith("?"):
                queries.append(word)
            elif word.startswith(".tag="):
                tag = word.removeprefix(".tag=")
        try:
            replies = self._dispatch(conn, words[0], args, queries)
        except Trap as trap:
            replies = [trap.words(), ["!done"]]
        if replies is None or tag is None:
            return replies
        # The tag is the bare API word `.tag=N`, not an attribute word.
        return [[*sentence, f".tag={tag}"] for sentence in replies]

    def _dispatch(
        self, conn: Connection, command: str, args: dict[str, str], queries: list[str]
    ) -> list[Sentence] | None:
        if command == "/login":
            if args.get("name") == self.username and args.get("password") == self.password:
                conn.user = self.username
                return [["!done"]]
            # The socket stays open after a failed login, as on RouterOS.
            raise Trap(BAD_LOGIN)
        if conn.user is None:
            raise Trap(NOT_LOGGED_IN)
        if command == "/quit":
            self.send_fatal(conn, "session terminated on request")
            return None
        if command == "/cancel":
            return [["!done"]]
        if command == "/system/reboot":
            # A router answers nothing: the connection just drops as it goes down.
            self._reboot_now()
            return None
        path, _, verb = command.rpartition("/")
        if path not in MENUS or not self.state.has_menu(path):
            # RouterOS sends two traps here, so librouteros raises MultiTrapError.
            missing = Trap(
                f"no such command or directory ({unknown_segment(command)})",
                MISSING_ITEM_OR_COMMAND,
            )
            return [missing.words(), Trap(NO_SUCH_PREFIX).words(), ["!done"]]
        outcome = self.state.execute(path, verb, args, queries)
        if outcome.write is not None:
            self.writes[path] += 1
            rule = self._take_drop(outcome.write)
            if rule is not None:
                close_connection(conn, reset=rule.reset)
                return None
        rows = outcome.rows
        if not self.sensitive:
            rows = [{k: v for k, v in row.items() if k != "password"} for row in rows]
        replies = [["!re", *(f"={k}={v}" for k, v in row.items())] for row in rows]
        if not replies and verb in _PRINT_VERBS and outcome.ret is None and self.empty_reply:
            replies.append(["!empty"])
        done = ["!done"] if outcome.ret is None else ["!done", f"=ret={outcome.ret}"]
        return [*replies, done]

    def _take_drop(self, write: Write) -> DropRule | None:
        rule = self._drop
        if rule is None or (rule.predicate is not None and not rule.predicate(write)):
            return None
        rule.remaining -= 1
        if rule.remaining > 0:
            return None
        self._drop = None
        return rule

    @staticmethod
    def send_fatal(conn: Connection, message: str) -> None:
        if not conn.closed:
            # librouteros takes the word after !fatal as the message: there must be one.
            conn.writer.write(encode_sentence(["!fatal", message]))
        close_connection(conn)


def close_connection(conn: Connection, *, reset: bool = False, abort: bool = False) -> None:
    """Close after flushing what was written; `abort` drops unsent data; `reset` sends RST."""
    if conn.closed:
        return
    conn.closed = True
    if reset:
        # SO_LINGER 0 makes the close an RST: the client gets ConnectionResetError.
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()
    elif abort:
        conn.writer.transport.abort()
    else:
        conn.writer.close()
