"""RouterOS API wire format: length-prefixed words; a sentence ends with an empty word.

A word's length takes 1 to 5 bytes, network order:

    < 0x80          1 byte   len
    < 0x4000        2 bytes  len | 0x8000
    < 0x200000      3 bytes  len | 0xC00000
    < 0x10000000    4 bytes  len | 0xE0000000
    otherwise       5 bytes  0xF0, then len in 4 bytes

A first byte of 0xF8 or above is a reserved control byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Final

# A peer feeding garbage must not make us wait for (or buffer) a gigabyte "word".
MAX_WORD_BYTES: Final = 1 << 20

# Words are bytes on the router; surrogateescape gives back exactly the bytes we got.
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"


class WireError(Exception):
    """The peer sent bytes that are not a RouterOS API sentence."""


def encode_length(length: int) -> bytes:
    """Encode a word length in the 1 to 5 byte RouterOS form."""
    if length < 0:
        raise ValueError(f"negative length {length}")
    if length < 0x80:
        return length.to_bytes(1, "big")
    if length < 0x4000:
        return (length | 0x8000).to_bytes(2, "big")
    if length < 0x200000:
        return (length | 0xC00000).to_bytes(3, "big")
    if length < 0x10000000:
        return (length | 0xE0000000).to_bytes(4, "big")
    if length < 0x100000000:
        return b"\xf0" + length.to_bytes(4, "big")
    raise ValueError(f"length {length} does not fit in the API encoding")


def prefix_size(first: int) -> int:
    """How many bytes the length prefix takes, given its first byte."""
    if first < 0x80:
        return 1
    if first < 0xC0:
        return 2
    if first < 0xE0:
        return 3
    if first < 0xF0:
        return 4
    if first == 0xF0:
        return 5
    raise WireError(f"reserved control byte 0x{first:02X}")


def decode_length(prefix: bytes) -> int:
    """Decode a complete length prefix (as sized by `prefix_size`)."""
    size = prefix_size(prefix[0])
    if len(prefix) != size:
        raise WireError(f"length prefix of {len(prefix)} bytes, expected {size}")
    if size == 5:
        return int.from_bytes(prefix[1:], "big")
    masks = {1: 0x7F, 2: 0x3FFF, 3: 0x1FFFFF, 4: 0x0FFFFFFF}
    return int.from_bytes(prefix, "big") & masks[size]


# The one-byte prefixes, made once: nearly every word a router sends is under 128 bytes.
_SHORT: Final = tuple(bytes((length,)) for length in range(0x80))


def encode_word(word: str) -> bytes:
    data = word.encode(_ENCODING, _ERRORS)
    return encode_length(len(data)) + data


def encode_sentence(words: Iterable[str]) -> bytes:
    return encode_sentences((words,))


def encode_sentences(sentences: Iterable[Iterable[str]]) -> bytes:
    """Sentences back to back, as one reply is written (a print of 10,000 rows is 10,000
    `!re` sentences and a `!done`): one buffer, no call per word."""
    out = bytearray()
    for words in sentences:
        for word in words:
            data = word.encode(_ENCODING, _ERRORS)
            length = len(data)
            out += _SHORT[length] if length < 0x80 else encode_length(length)
            out += data
        out += b"\x00"
    return bytes(out)


async def read_word(reader: asyncio.StreamReader) -> str:
    """Read one word; raises `asyncio.IncompleteReadError` when the peer goes away."""
    prefix = await reader.readexactly(1)
    size = prefix_size(prefix[0])
    if size > 1:
        prefix += await reader.readexactly(size - 1)
    length = decode_length(prefix)
    if length > MAX_WORD_BYTES:
        raise WireError(f"word of {length} bytes is over the limit")
    data = await reader.readexactly(length) if length else b""
    return data.decode(_ENCODING, _ERRORS)


async def read_sentence(reader: asyncio.StreamReader) -> list[str]:
    """Read words up to the empty word. An empty list is an empty sentence (ignored by RouterOS)."""
    words: list[str] = []
    while word := await read_word(reader):
        words.append(word)
    return words
