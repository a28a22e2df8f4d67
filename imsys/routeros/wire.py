"""The API's sentences over one socket: replies kept as the router's strings, read from
a buffer, several tagged commands in one write.

librouteros connects, logs in and frames the words; what it reads is handed to
``SentenceReader``, and commands are written here so that a guard can refuse one in the
very step it would be sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from librouteros.api import AsyncApi
from librouteros.exceptions import FatalError
from librouteros.protocol import encode_sentence

from imsys.routeros.reader import SentenceReader

# latin-1 maps each byte to one character, so a reply reads back exactly as the router
# sent it; librouteros's default (ASCII, errors ignored) silently drops other bytes.
# Sending is unaffected: every word is checked to be ASCII before it is written.
WIRE_ENCODING: Final = "latin-1"


@dataclass(frozen=True)
class Reply:
    """What one command got back, every value the router's own string."""

    rows: list[dict[str, str]]
    # Attributes of `!done`: `ret` (the new `.id`) after an add.
    done: dict[str, str]
    traps: list[dict[str, str]]


@dataclass(frozen=True)
class Command:
    """One API command for ``Connection.run_many``: its words, whether it changes the
    router, and the guard that may refuse it in the step it would be sent."""

    command: str
    words: Sequence[str]
    write: bool = False
    guard: Callable[[], None] | None = None


class Refused(Exception):
    """A send's guard refused the command; carries the guard's own exception."""

    def __init__(self, reason: Exception) -> None:
        super().__init__(str(reason))
        self.reason = reason


class LoginRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _split_word(word: str) -> tuple[str, str]:
    # `=name=value`, where the value may itself hold `=`; `.tag=7` has no leading `=`.
    key, _, value = word.removeprefix("=").partition("=")
    return key, value


class RawApi(AsyncApi):  # type: ignore[misc]  # librouteros ships no type information
    """AsyncApi whose replies keep the router's strings.

    librouteros's own readSentence turns `yes`/`true` into True and `1234` into 1234;
    imsys compares what it sent with what the router holds, as strings, so this one
    leaves every value alone.
    """

    _sentences: SentenceReader | None = None

    @property
    def sentences(self) -> SentenceReader:
        if self._sentences is None:
            transport = self.protocol.transport
            self._sentences = SentenceReader(transport.reader, self.protocol.encoding)
        return self._sentences

    async def readSentence(self) -> tuple[str, dict[str, str]]:  # librouteros calls it by this name
        words = await self.sentences.sentence()
        reply_word = words[0]
        if reply_word == "!fatal":
            # As librouteros does: the router ends the session after it.
            self.protocol.transport.writer.transport.abort()
            raise FatalError(words[1] if len(words) > 1 else "")
        return reply_word, dict(_split_word(word) for word in words[1:])

    async def send(
        self, command: str, words: Sequence[str], guard: Callable[[], None] | None = None
    ) -> None:
        """Write one sentence; ``guard`` runs just before the bytes reach the socket.

        librouteros's own writeSentence hands the write to a task of its own
        (``asyncio.wait_for``), a loop turn later; this writes in the caller's step, so
        nothing runs between the guard and the write.
        """
        encoded = encode_sentence(command, *words, encoding=self.protocol.encoding)
        writer = self.protocol.transport.writer
        if guard is not None:
            try:
                guard()
            except Exception as exc:
                raise Refused(exc) from exc
        writer.write(encoded)
        await writer.drain()

    async def read_reply(self) -> Reply:
        rows: list[dict[str, str]] = []
        traps: list[dict[str, str]] = []
        while True:
            reply_word, attributes = await self.readSentence()
            if reply_word == "!re":
                rows.append(attributes)
            elif reply_word == "!trap":
                traps.append(attributes)
            elif reply_word == "!done":
                return Reply(rows, attributes, traps)
            # `!empty` (RouterOS 7.18+ on an empty print) carries nothing.


async def login(api: Any, username: str, password: str) -> None:
    """Plain login (RouterOS >= 6.43), with our string-keeping reply reader."""
    await api.send("/login", [f"=name={username}", f"=password={password}"])
    reply: Reply = await api.read_reply()
    if reply.traps:
        raise LoginRefused(reply.traps[0].get("message", "login refused"))
