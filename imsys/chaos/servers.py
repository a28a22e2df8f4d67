"""Private Redis and PostgreSQL servers the chaos suite owns, killed and restarted at will.

They live in a temporary folder on free loopback ports; the machine's shared instances
(6379, 5432) are never touched. Every process started here is registered with a
`Reaper`, which ends it on exit, also after Ctrl-C or a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import asyncpg
from redis.asyncio import Redis


class ChaosSetupError(RuntimeError):
    """The suite cannot build its private test bed here (the message says why)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Reaper:
    """Remembers every child process; `reap()` kills whatever is still running."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.finalizers: list[list[str]] = []

    def add(self, pid: int) -> None:
        self.pids.add(pid)

    def forget(self, pid: int) -> None:
        self.pids.discard(pid)

    def reap(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        for argv in self.finalizers:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(argv, capture_output=True, timeout=20, check=False)  # noqa: S603
        self.finalizers.clear()


async def wait_port(port: int, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


class PrivateRedis:
    """`redis-server` without persistence: a restart comes back empty."""

    def __init__(self, root: Path, reaper: Reaper) -> None:
        self.dir = root / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.reaper = reaper
        self.proc: asyncio.subprocess.Process | None = None
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise ChaosSetupError("redis-server is not installed (apt-get install redis-server)")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, *, decode: bool = True) -> Redis:
        return Redis.from_url(self.url, decode_responses=decode)

    async def start(self) -> None:
        assert self.binary is not None
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--maxmemory-policy",
            "noeviction",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.reaper.add(self.proc.pid)
        if not await wait_port(self.port, 10):
            raise ChaosSetupError(f"private redis-server did not listen on {self.port}")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
            self.reaper.forget(self.proc.pid)
        self.proc = None

    async def restart_empty(self) -> None:
        await self.kill()
        await self.start()


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        if shutil.which("pg_ctl"):
            return Path(shutil.which("pg_ctl") or "").parent
        raise ChaosSetupError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


class PrivatePostgres:
    """A PostgreSQL cluster made by initdb in the temp folder, run by pg_ctl.

    As root, initdb refuses to run: the cluster then belongs to the `postgres` user
    (run through runuser)."""

    def __init__(self, root: Path, reaper: Reaper) -> None:
        self.bin = _pg_bin()
        self.root = root / "pg"
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.port = free_port()
        self.reaper = reaper
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise ChaosSetupError(
                    "running as root and there is no 'postgres' user to own the private "
                    "PostgreSQL cluster (initdb refuses root); create one or run as a normal user"
                ) from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise ChaosSetupError("running as root but runuser is missing")
            self.prefix = [runuser, "-u", "postgres", "--"]
            self.uid, self.gid = user.pw_uid, user.pw_gid
        else:
            self.uid, self.gid = os.geteuid(), os.getegid()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def _run(self, *argv: str, limit: float = 60) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.prefix,
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.reaper.add(proc.pid)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit)
        finally:
            self.reaper.forget(proc.pid)
        if proc.returncode != 0:
            raise ChaosSetupError(f"{Path(argv[0]).name} failed: {out.decode(errors='replace')}")

    async def init(self) -> None:
        for d in (self.root, self.sock):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, self.uid, self.gid)
        # The temp folder must be traversable by the cluster's owner.
        os.chmod(self.root.parent, 0o755)  # noqa: S103
        await self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self.reaper.finalizers.append(
            [
                *self.prefix,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "stop",
                "-m",
                "immediate",
            ]
        )

    async def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.sock} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        await self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        if not await wait_port(self.port, 20):
            raise ChaosSetupError("private PostgreSQL did not listen")

    async def stop(self, mode: str = "fast") -> None:
        await self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "stop", "-m", mode)

    async def ready(self) -> bool:
        try:
            conn = await asyncpg.connect(self.url("postgres"), timeout=2)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    async def fresh_database(self, name: str) -> str:
        """Drop and recreate `name` with the schema applied; returns its URL."""
        from imsys.db import migrate

        conn = await asyncpg.connect(self.url("postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        await migrate(self.url(name))
        return self.url(name)
