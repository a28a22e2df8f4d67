"""Incremental parsing of a JSON array read from an HTTP body, one element at a time.

A Bouncer download holds up to 100,000 records, tens of MB of JSON. Parsing it as it
arrives keeps one chunk of text in memory instead of the whole body as bytes and as str,
and lets the caller store records while the rest is still on the wire.

Arrays of objects (Bouncer's shape) take a fast path: each chunk is cut after the last
``}`` that a ``, {`` follows and the complete records before it go to orjson in one call
(about twice the speed and two thirds the memory of per-value parsing, since orjson
shares key strings). Anything else, or a cut that turns out to fall inside a record,
continues on the json module's C scanner, one value at a time.
"""

from __future__ import annotations

import codecs
import json
import json.scanner
import re
from collections.abc import AsyncIterator
from enum import Enum, auto
from typing import Any, Protocol

import orjson

__all__ = ["JsonStreamError", "iter_json_array"]

_BLANK = re.compile(r"[ \t\n\r]*")
_BLANK_BYTES = re.compile(rb"[ \t\n\r]*")
_NEXT_OBJECT = re.compile(rb"[ \t\n\r]*,[ \t\n\r]*\{")
_NUMBER_TAIL = re.compile(r"[0-9eE.+-]*")
DEFAULT_CHUNK = 256 * 1024


class JsonStreamError(ValueError):
    """The body is not one well-formed JSON array."""


class ByteStream(Protocol):
    """What is needed of `aiohttp.StreamReader`."""

    async def read(self, n: int = -1) -> bytes: ...


class _State(Enum):
    BEFORE = auto()  # expecting "["
    FIRST = auto()  # after "[": a value or "]"
    VALUE = auto()  # after ",": a value
    SEPARATOR = auto()  # after a value: "," or "]"
    AFTER = auto()  # after "]": blanks only


class _ScanParser:
    """Parses any array, one value at a time with the json module's C scanner."""

    def __init__(self, state: _State = _State.BEFORE, dropped: int = 0) -> None:
        # Incremental, so a UTF-8 sequence split between two chunks decodes whole.
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
        self._text = ""
        self._pos = 0
        self._dropped = dropped  # characters already cut from the front, for messages
        self.state = state

    def feed(self, chunk: bytes, *, final: bool) -> list[Any]:
        """Add ``chunk`` and return the elements now complete."""
        try:
            more = self._utf8.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            raise JsonStreamError(f"body is not UTF-8: {exc.reason}") from None
        self._dropped += self._pos
        self._text = self._text[self._pos:] + more
        self._pos = 0
        return self._parse(final)

    def _parse(self, final: bool) -> list[Any]:
        text, pos, state = self._text, self._pos, self.state
        end_of_text = len(text)
        blank, scan = _BLANK.match, self._scan
        found: list[Any] = []
        while True:
            match = blank(text, pos)
            assert match is not None  # the pattern matches the empty string
            pos = match.end()
            if pos >= end_of_text:
                break
            char = text[pos]
            if state is _State.SEPARATOR:
                if char not in ",]":
                    raise self._error(f"expected ',' or ']' but found {char!r}", pos)
                state = _State.VALUE if char == "," else _State.AFTER
                pos += 1
                continue
            if state is _State.BEFORE:
                if char != "[":
                    raise self._error("body is not a JSON array", pos)
                state, pos = _State.FIRST, pos + 1
                continue
            if state is _State.AFTER:
                raise self._error("data after the array", pos)
            if state is _State.FIRST and char == "]":
                state, pos = _State.AFTER, pos + 1
                continue
            try:
                value, end = scan(text, pos)
            except (StopIteration, json.JSONDecodeError) as exc:
                if not final:
                    break  # most often the value just goes on in the next chunk
                detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "expected a value"
                raise self._error(detail, pos) from None
            if (not final and isinstance(value, int | float)
                    and _NUMBER_TAIL.fullmatch(text, end) is not None):
                break  # a number cut by the chunk's end ("2." "5") parses, wrongly, as "2"
            found.append(value)
            pos, state = end, _State.SEPARATOR
        self._pos, self.state = pos, state
        return found

    def _error(self, what: str, pos: int) -> JsonStreamError:
        return JsonStreamError(f"{what} at character {self._dropped + pos}")


class _ObjectsParser:
    """The fast path for arrays of objects; hands over to `_ScanParser` for anything else."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._dropped = 0
        self._state = _State.BEFORE
        self._slow: _ScanParser | None = None

    @property
    def state(self) -> _State:
        return self._state if self._slow is None else self._slow.state

    def feed(self, chunk: bytes, *, final: bool) -> list[Any]:
        """Add ``chunk`` and return the elements now complete."""
        if self._slow is not None:
            return self._slow.feed(chunk, final=final)
        self._dropped += self._pos
        buf = self._buf = self._buf[self._pos:] + chunk
        pos, state = 0, self._state
        found: list[Any] = []
        while True:
            match = _BLANK_BYTES.match(buf, pos)
            assert match is not None  # the pattern matches the empty string
            pos = match.end()
            if pos >= len(buf):
                break
            char = buf[pos:pos + 1]
            if state is _State.SEPARATOR and char in (b",", b"]"):
                state = _State.VALUE if char == b"," else _State.AFTER
                pos += 1
                continue
            if state is _State.BEFORE and char == b"[":
                state, pos = _State.FIRST, pos + 1
                continue
            if state is _State.FIRST and char == b"]":
                state, pos = _State.AFTER, pos + 1
                continue
            if state in (_State.FIRST, _State.VALUE) and char == b"{":
                end = len(buf) if final else self._last_cut(buf, pos)
                if end < 0:
                    break  # no complete record yet
                try:
                    values = orjson.loads(b"[" + buf[pos:end] + (b"" if final else b"]"))
                except orjson.JSONDecodeError:
                    pass  # not a real cut, or not orjson's JSON: the scanner decides
                else:
                    found.extend(values)
                    pos, state = end, _State.AFTER if final else _State.SEPARATOR
                    continue
            # Errors, and all that is not an array of objects, are the scanner's to handle.
            self._slow = _ScanParser(state, self._dropped + pos)
            return found + self._slow.feed(buf[pos:], final=final)
        self._pos, self._state = pos, state
        return found

    @staticmethod
    def _last_cut(buf: bytes, start: int) -> int:
        """Just after the last ``}`` in ``buf[start:]`` that ``, {`` follows; -1 if none."""
        brace = buf.rfind(b"}", start)
        while brace >= 0 and _NEXT_OBJECT.match(buf, brace + 1) is None:
            brace = buf.rfind(b"}", start, brace)
        return brace + 1 if brace >= 0 else -1


async def iter_json_array(
    stream: ByteStream, *, chunk_size: int = DEFAULT_CHUNK
) -> AsyncIterator[Any]:
    """Yield the elements of the JSON array that ``stream`` holds, as they arrive.

    Raises `JsonStreamError` when the body is anything but one array (blanks around it
    allowed).
    """
    parser = _ObjectsParser()
    while True:
        chunk = await stream.read(chunk_size)
        final = not chunk
        for value in parser.feed(chunk, final=final):
            yield value
        if final:
            break
    if parser.state is not _State.AFTER:
        raise JsonStreamError("body is empty" if parser.state is _State.BEFORE
                              else "body ends inside the array")
