"""What the engine has done lately, read back for the operator: finished jobs and throughput.

Both live in Redis, so every process reads the same figures whichever process did the
work. The history stream (``Keys.history``) holds the last ``engine.history_max`` job
outcomes, written by the same scripts that acknowledge, retry or dead-letter the job.
The throughput counters (``Keys.throughput``) are one key per stream and minute, raised
by the acknowledging script itself (an ``INCRBY`` per acknowledged batch, so no timer has
to sample anything and a restart loses nothing); they expire after two hours.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, cast

from redis.asyncio import Redis

from imsys.streams.keys import Keys

MINUTE_MS: Final = 60_000
# Entries read from the history stream per call while filtering by stream.
_PAGE: Final = 500


def _entry(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    ms = fields.get("ms")
    return {
        "id": entry_id,
        "at_ms": int(entry_id.partition("-")[0]),
        "stream": fields.get("stream", ""),
        "type": fields.get("type", ""),
        "job_id": fields.get("job_id") or None,
        # done, retried, deferred or dead (the moves in ``scripts.py`` write these).
        "outcome": fields.get("outcome", ""),
        "duration_ms": float(ms) if ms else None,
    }


async def recent_history(
    redis: Redis,
    keys: Keys,
    *,
    limit: int,
    stream: str | None = None,
    outcome: str | None = None,
    before: str | None = None,
) -> list[dict[str, Any]]:
    """Finished jobs, newest first: at most ``limit``, of ``stream`` / with ``outcome``
    when given, older than the entry id ``before`` when given."""
    out: list[dict[str, Any]] = []
    top = f"({before}" if before else "+"
    while len(out) < limit:
        rows = cast(
            "list[tuple[str, dict[str, str]]]",
            await redis.xrevrange(keys.history, max=top, min="-", count=_PAGE),
        )
        for entry_id, fields in rows:
            if (stream is None or fields.get("stream") == stream) and (
                outcome is None or fields.get("outcome") == outcome
            ):
                out.append(_entry(entry_id, fields))
                if len(out) == limit:
                    break
        if len(rows) < _PAGE:
            break
        top = f"({rows[-1][0]}"
    return out


async def throughput(
    redis: Redis,
    keys: Keys,
    streams: Sequence[str],
    *,
    minutes: int = 60,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """Jobs processed per minute of each stream over the last ``minutes`` (the current,
    partial minute last), and the same as jobs per second: a whole minute's count over
    60 s, the current minute's over the seconds it has run."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    last = now // MINUTE_MS
    span = list(range(last - minutes + 1, last + 1))
    names = [keys.throughput(s, m) for s in streams for m in span]
    raw = await redis.mget(names) if names else []
    elapsed_s = max((now - last * MINUTE_MS) / 1000, 1.0)
    out = []
    for i, s in enumerate(streams):
        counts = [int(v or 0) for v in raw[i * minutes : (i + 1) * minutes]]
        per_s = [round(c / 60, 3) for c in counts[:-1]]
        per_s.append(round(counts[-1] / elapsed_s, 3))
        out.append({"stream": s, "counts": counts, "per_s": per_s})
    return {
        "step_s": 60,
        "start_ms": span[0] * MINUTE_MS,
        "now_ms": now,
        "streams": out,
    }
