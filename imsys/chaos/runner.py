"""Run the scenarios one after another on one private test bed and print their rows."""

from __future__ import annotations

import asyncio
import atexit
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from imsys import logging as imsys_logging
from imsys.chaos import (
    scenarios_engine,
    scenarios_http,
    scenarios_kill,
    scenarios_sentinel,
    scenarios_sync,
)
from imsys.chaos.bed import Bed
from imsys.chaos.report import Row, json_lines, table
from imsys.chaos.servers import ChaosSetupError

Scenario = Callable[[Bed], Awaitable[Row]]

SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "malformed": (scenarios_engine.malformed, scenarios_engine.MALFORMED_TARGET),
    "sigstop": (scenarios_sync.sigstop, scenarios_sync.SIGSTOP_TARGET),
    "router_empty": (scenarios_sync.router_empty, scenarios_sync.ROUTER_EMPTY_TARGET),
    "redis_empty": (scenarios_sync.redis_empty, scenarios_sync.REDIS_EMPTY_TARGET),
    "postgres_restart": (scenarios_engine.postgres_restart, scenarios_engine.POSTGRES_TARGET),
    "http": (scenarios_http.http, scenarios_http.HTTP_TARGET),
    "audit_kill": (scenarios_kill.audit_kill, scenarios_kill.AUDIT_TARGET),
    "sentinel": (scenarios_sentinel.sentinel, scenarios_sentinel.SENTINEL_TARGET),
}


async def _run_one(bed: Bed, name: str, limit: float) -> Row:
    fn, target = SCENARIOS[name]
    started = time.monotonic()
    try:
        await bed.begin_scenario(name)
        row = await asyncio.wait_for(fn(bed), limit)
    except TimeoutError:
        row = Row(name, target, measured=f"did not finish within {limit:.0f} s")
    except ChaosSetupError as exc:
        row = Row(name, target, ok=None, skipped=str(exc))
    except Exception as exc:  # a scenario that breaks is a failed row, with the reason
        row = Row(name, target, measured=f"scenario error: {type(exc).__name__}: {exc}"[:300])
        row.notes.append(traceback.format_exc(limit=3).strip().splitlines()[-1])
    finally:
        await bed.end_scenario()
    row.notes.append(f"took {time.monotonic() - started:.1f} s")
    return row


def _quiet_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A simulator stopped mid-read cancels its connection tasks; Python 3.11's stream
    callback then reports the cancellation as an error. It is not one."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def run(
    names: list[str],
    *,
    short: bool,
    emit: Callable[[Row], None],
    keep: bool = False,
    postgres_down_s: float | None = None,
) -> list[Row]:
    root = Path(tempfile.mkdtemp(prefix="imsys-chaos-"))
    bed = Bed(root, short=short, postgres_down_s=postgres_down_s)
    atexit.register(bed.reaper.reap)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_cancelled)
    for sig in (signal.SIGINT, signal.SIGTERM):
        if main is not None:
            loop.add_signal_handler(sig, main.cancel)
    rows: list[Row] = []
    try:
        try:
            await bed.start()
        except ChaosSetupError as exc:
            return [Row(n, SCENARIOS[n][1], ok=None, skipped=str(exc)) for n in names]
        for name in names:
            limit = (75.0 if short else 360.0) + (postgres_down_s or 0.0)
            row = await _run_one(bed, name, limit)
            rows.append(row)
            emit(row)
        return rows
    finally:
        try:
            await asyncio.shield(bed.close())
        finally:
            bed.reaper.reap()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if keep:
                print(f"imsys chaos: logs kept in {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)


def main(
    only: list[str] | None,
    *,
    short: bool,
    as_json: bool,
    keep: bool = False,
    postgres_down_s: float | None = None,
) -> int:
    """The `chaos` command: 0 when no row failed (skipped rows say why), 1 otherwise."""
    # The suite's own log lines (migrations) would drown the table; warnings still show.
    imsys_logging.configure("warning", json=True)
    names = only or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"imsys chaos: unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
        return 2

    def emit(row: Row) -> None:
        if as_json:
            print(json_lines([row]), flush=True)
        else:
            print(f"{row.scenario}: {row.ok_text} ({row.measured})", flush=True)

    try:
        rows = asyncio.run(
            run(names, short=short, emit=emit, keep=keep, postgres_down_s=postgres_down_s)
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("imsys chaos: interrupted; every process it started was stopped")
        return 130
    if not as_json:
        print()
        print(table(rows))
    return 0 if all(r.ok is not False for r in rows) else 1
