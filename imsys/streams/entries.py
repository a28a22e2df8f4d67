"""Stream entries as Redis holds them: bytes, decoded here one field at a time.

Any producer may XADD anything. A client that decodes every reply would raise inside
XREADGROUP on the first non-UTF-8 byte, and the whole read (with its valid batch-mates)
would fail again on every retry. So the engine reads entries as bytes and decodes them
here: an entry that cannot be decoded becomes a ``Malformed`` record, dead-lettered with
its reason and its raw bytes (base64), and the stream flows on.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

# How many bytes of an undecodable entry a dead letter keeps (raw, before base64).
RAW_KEEP = 65_536

Entry = tuple[str, dict[str, str]]


@dataclass(frozen=True, slots=True)
class Malformed:
    """An entry whose bytes are not text: kept readable (with U+FFFD) and raw (base64)."""

    entry_id: str
    fields: dict[str, str]
    reason: str

    @classmethod
    def of(cls, entry_id: str, raw: list[tuple[bytes, bytes]], reason: str) -> Malformed:
        readable = {_text(k): _text(v) for k, v in raw}
        kept: list[list[str]] = []
        budget = RAW_KEEP
        for k, v in raw:
            k, v = k[:budget], v[: max(budget - len(k), 0)]
            budget -= len(k) + len(v)
            kept.append([base64.b64encode(k).decode(), base64.b64encode(v).decode()])
            if budget <= 0:
                break
        readable["raw_fields_b64"] = orjson.dumps(kept).decode()
        return cls(entry_id, readable, reason)


def decode_entry(entry_id: Any, raw: Any) -> Entry | Malformed:
    """One entry read as bytes: its text fields, or why it has none."""
    eid = entry_id.decode("ascii") if isinstance(entry_id, bytes) else str(entry_id)
    try:
        # The path every valid entry takes: no copies before decoding.
        if isinstance(raw, dict):
            return eid, {k.decode(): v.decode() for k, v in raw.items()}
        return eid, {k.decode(): v.decode() for k, v in zip(raw[::2], raw[1::2], strict=False)}
    except (UnicodeDecodeError, AttributeError, TypeError):
        pass
    pairs = _pairs(raw)
    try:
        return eid, {k.decode(): v.decode() for k, v in pairs}
    except UnicodeDecodeError:
        pass
    bad = next(
        (k, which) for k, v in pairs for which, b in (("name", k), ("value", v)) if not _is_utf8(b)
    )
    name = _text(bad[0])[:60]
    return Malformed.of(eid, pairs, f"field {bad[1]} of {name!r} is not UTF-8 text")


def decode_entries(raw: Any) -> tuple[list[Entry], list[Malformed]]:
    good: list[Entry] = []
    bad: list[Malformed] = []
    for eid, fields in raw:
        if fields is None:
            continue  # deleted while pending: nothing to run
        decoded = decode_entry(eid, fields)
        (bad if isinstance(decoded, Malformed) else good).append(decoded)  # type: ignore[arg-type]
    return good, bad


async def xreadgroup_raw(
    redis: Redis, group: str, consumer: str, key: str, count: int, block_ms: int | None
) -> list[Any]:
    """XREADGROUP with the reply left as bytes: [(id, {field: value}), ...]."""
    args: list[Any] = ["GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    resp = await redis.execute_command(  # type: ignore[no-untyped-call]
        "XREADGROUP", *args, "STREAMS", key, ">", **{NEVER_DECODE: True}
    )
    if not resp:
        return []
    if isinstance(resp, dict):  # RESP3
        return list(next(iter(resp.values()))[0]) if resp else []
    return list(resp[0][1])


async def eval_raw(redis: Redis, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
    """Run a registered script with its reply left as bytes (reloading it after NOSCRIPT)."""
    try:
        return await redis.execute_command(  # type: ignore[no-untyped-call]
            "EVALSHA", script.sha, len(keys), *keys, *args, **{NEVER_DECODE: True}
        )
    except NoScriptError:
        script.sha = await redis.script_load(script.script)
        return await redis.execute_command(  # type: ignore[no-untyped-call]
            "EVALSHA", script.sha, len(keys), *keys, *args, **{NEVER_DECODE: True}
        )


def as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _pairs(raw: Any) -> list[tuple[bytes, bytes]]:
    if isinstance(raw, dict):
        return [(_bytes(k), _bytes(v)) for k, v in raw.items()]
    flat = list(raw)
    return [(_bytes(k), _bytes(v)) for k, v in zip(flat[::2], flat[1::2], strict=False)]


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")
