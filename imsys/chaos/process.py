"""A service process under test (`python -m imsys run`), and bounded waiting."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from imsys.chaos.servers import Reaper

ROOT = Path(__file__).resolve().parent.parent.parent


async def until(
    check: Callable[[], Awaitable[bool]], limit: float, every: float = 0.2
) -> float | None:
    """Seconds until `check()` held, or None when `limit` seconds passed first."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            return None
        await asyncio.sleep(every)


async def must(check: Callable[[], Awaitable[bool]], limit: float, what: str) -> float:
    """Like `until`, but a timeout is the scenario's failure to set up: raise `what`."""
    took = await until(check, limit)
    if took is None:
        raise RuntimeError(what)
    return took


class Host(Protocol):
    """What a `Service` needs of whoever runs it (the chaos `Bed`, the sync benchmark):
    a folder for its log, a name to put in it, the reaper, and a way to call its API."""

    root: Path
    scenario_name: str
    reaper: Reaper

    async def call(self, svc: Service, method: str, path: str) -> tuple[int, Any]: ...


class Service:
    """One `python -m imsys run` child with its own HTTP port and log file."""

    def __init__(self, bed: Host, name: str, env: dict[str, str]) -> None:
        self.bed, self.name, self.env = bed, name, env
        self.port = int(env["IMSYS_HTTP__PORT"])
        self.log = bed.root / f"{bed.scenario_name}-{name}-{secrets.token_hex(2)}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, *, wait: bool = True, limit: float = 30) -> Service:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "imsys",
                "run",
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        self.bed.reaper.add(self.proc.pid)
        if wait and await until(self.healthy, limit, 0.1) is None:
            raise RuntimeError(f"service {self.name} not healthy: {self.tail()}")
        return self

    async def healthy(self) -> bool:
        if not self.alive:
            raise RuntimeError(f"service {self.name} exited: {self.tail()}")
        status, _ = await self.bed.call(self, "GET", "/healthz")
        return status == 200

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    async def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        await self.proc.wait()
        self.bed.reaper.forget(self.proc.pid)

    async def stop(self, grace: float = 20) -> int | None:
        """SIGTERM, then SIGKILL after `grace`; the exit status (None if killed)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                await self.kill()
                return None
        self.bed.reaper.forget(self.proc.pid)
        return self.proc.returncode

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def errors(self) -> int:
        """Log lines at level error or worse."""
        return len(self.events(levels=("error", "critical")))

    def events(self, *names: str, levels: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """JSON log lines whose event is one of `names` (or whose level is in `levels`)."""
        out = []
        try:
            lines = self.log.read_bytes().splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(ev, dict) and (ev.get("event") in names or ev.get("level") in levels):
                out.append(ev)
        return out
