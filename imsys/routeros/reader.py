"""Reply sentences read from a buffer, not byte by byte.

librouteros reads each word with three awaited reads (the length's first byte, the rest
of the length, the word): a 10,000-row print is some 200,000 awaits and most of a
second of CPU on the client. This reader takes what the socket has (up to 64 KiB at a
time) and cuts every complete word out of it at once, using librouteros's own length
decoding, so both sides of the connection still agree on the framing by the same code.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

from librouteros.exceptions import ConnectionClosed, ProtocolError
from librouteros.protocol import decode_length, determine_length

_CHUNK: Final = 65536


class SentenceReader:
    """Sentences (lists of words) from one stream, in the order the router sent them."""

    def __init__(self, reader: asyncio.StreamReader, encoding: str) -> None:
        self._reader = reader
        self._encoding = encoding
        self._buffer = b""
        self._words: list[str] = []  # the words of the sentence being read
        self._ready: deque[list[str]] = deque()

    @property
    def pending(self) -> bool:
        """Whether bytes or sentences were received and not yet handed out."""
        return bool(self._buffer or self._words or self._ready)

    async def sentence(self) -> list[str]:
        """The next whole sentence; ConnectionClosed when the stream ends first."""
        while not self._ready:
            chunk = await self._reader.read(_CHUNK)
            if not chunk:
                raise ConnectionClosed("Connection unexpectedly closed.")
            self._feed(self._buffer + chunk if self._buffer else chunk)
        return self._ready.popleft()

    def _feed(self, data: bytes) -> None:
        """Cut the complete words out of ``data``; keep the incomplete tail."""
        pos, end = 0, len(data)
        words, encoding = self._words, self._encoding
        while pos < end:
            first = data[pos]
            if first < 0x80:
                head, length = 1, first
            else:
                head = 1 + determine_length(data[pos : pos + 1])
                if pos + head > end:
                    break
                length = decode_length(data[pos : pos + head])
            if length == 0:
                if head != 1:
                    raise ProtocolError("a zero length encoded in more than one byte")
                pos += 1
                if words:
                    self._ready.append(words)
                    words = []
                continue
            stop = pos + head + length
            if stop > end:
                break
            words.append(data[pos + head : stop].decode(encoding))
            pos = stop
        self._words = words
        self._buffer = data[pos:]
