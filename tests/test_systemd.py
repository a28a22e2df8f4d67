"""systemd integration: the notify protocol of the real service process, and the unit file."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from imsys.settings import Settings
from imsys.systemd import Notifier
from tests.conftest import ROOT, subprocess_env

UNIT = ROOT / "deploy" / "imsys.service"
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mdwe_supported() -> bool:
    """Whether this kernel can refuse writable+executable memory (PR_SET_MDWE, Linux 6.3)."""
    code = "import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def deny_write_execute() -> None:
    """In the child before exec: what MemoryDenyWriteExecute=yes enforces, via prctl."""
    if ctypes.CDLL(None).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError("PR_SET_MDWE refused")


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, as systemd's '@...' NOTIFY_SOCKET."""
    name = f"imsys-test-notify-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    yield sock, "@" + name
    sock.close()


async def receive(sock: socket.socket, wanted: str, deadline: float, seen: list[str]) -> str:
    """Datagrams until one has the line ``wanted``; all of them are kept in ``seen``."""
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {wanted} in time; got {seen}")
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=left)
        except TimeoutError:
            continue
        message = data.decode()
        seen.append(message)
        if wanted in message.split("\n"):
            return message


# --- the real process ---------------------------------------------------------------------


async def test_service_notifies_ready_watchdog_and_stopping(
    settings: Settings, isolated_database: str, notify_socket: tuple[socket.socket, str]
) -> None:
    """`python -m imsys run` under NOTIFY_SOCKET/WATCHDOG_USEC sends READY=1 within 5 s,
    then WATCHDOG=1 pings, answers /healthz, and on SIGTERM sends STOPPING=1 and exits 0.
    Where the kernel allows, it runs with writable+executable memory refused, as
    MemoryDenyWriteExecute=yes does (uvloop, asyncpg, hiredis, orjson need none)."""
    sock, address = notify_socket
    port = free_port()
    env = subprocess_env(
        settings,
        IMSYS_DATABASE__URL=isolated_database,
        IMSYS_HTTP__PORT=str(port),
        IMSYS_ENGINE__READ_BLOCK_MS="100",
        NOTIFY_SOCKET=address,
        WATCHDOG_USEC="1000000",
    )
    env.pop("WATCHDOG_PID", None)
    mdwe = mdwe_supported()
    log = Path(tempfile.mkstemp(prefix="imsys-systemd-", suffix=".log")[1])
    seen: list[str] = []
    with log.open("w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "imsys", "run"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=deny_write_execute if mdwe else None,
        )
    try:
        ready = await receive(sock, "READY=1", started + 5, seen)
        assert any(line.startswith("STATUS=running") for line in ready.split("\n")), ready
        assert time.monotonic() - started < 5
        # WATCHDOG_USEC=1 s: a ping at least every half second.
        await receive(sock, "WATCHDOG=1", time.monotonic() + 1.5, seen)
        await receive(sock, "WATCHDOG=1", time.monotonic() + 1.5, seen)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200, await resp.text()
        proc.send_signal(signal.SIGTERM)
        stopping = await receive(sock, "STOPPING=1", time.monotonic() + 5, seen)
        assert "STATUS=stopping: draining running jobs" in stopping
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert seen[0].startswith("STATUS=starting"), seen
    text = log.read_text()
    assert "systemd_notify_failed" not in text
    log.unlink()


async def test_no_notify_socket_means_no_op() -> None:
    """Without NOTIFY_SOCKET nothing is sent and run() returns at once (Docker, terminal)."""
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    await asyncio.wait_for(notifier.run(asyncio.Event(), asyncio.Event(), "x"), 1)


def test_path_socket_and_watchdog_owner(tmp_path: Path) -> None:
    """A filesystem NOTIFY_SOCKET gets the datagram; WATCHDOG_PID of another process
    means the watchdog is not ours; a vanished socket is logged, not raised."""
    short = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    path = short / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier.from_environ(
            {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
        )
        assert n.watchdog_s is None
        mine = Notifier.from_environ(
            {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000",
             "WATCHDOG_PID": str(os.getpid())}
        )
        assert mine.watchdog_s == 30.0
        assert n.ready("up") is True
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    path.unlink()
    assert n.status("gone") is False  # nobody listens any more: False, no exception
    n.close()
    mine.close()
    shutil.rmtree(short)


def test_vsock_address_is_ignored() -> None:
    """A NOTIFY_SOCKET imsys cannot speak (vsock:, relative) turns notifications off."""
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}).enabled


# --- the unit file ----------------------------------------------------------------------------


def test_unit_has_the_required_settings() -> None:
    """deploy/imsys.service is Type=notify with the watchdog, restart and hardening set,
    and stops later than the engine's grace period."""
    text = UNIT.read_text()
    settings = dict(
        re.findall(r"^(\w+)=(.*)$", text, flags=re.MULTILINE)
    )
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "User": "imsys",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
        "EnvironmentFile": "-/etc/imsys/imsys.env",
    }
    assert {k: settings.get(k) for k in expected} == expected
    grace = Settings().engine.grace_period_s
    assert int(settings["TimeoutStopSec"]) > grace


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a warning (ExecStart pointed at
    this interpreter, since /opt/imsys does not exist here), and its security exposure
    is rated low."""
    unit = tmp_path / "imsys.service"
    unit.write_text(UNIT.read_text().replace("/opt/imsys/venv/bin/python", sys.executable))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    # verify exits 0 on unknown keys and bad values, but names them: none allowed.
    assert r.stderr.strip() == "", r.stderr
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0 and "offline" in r.stderr:
        pytest.skip("this systemd-analyze cannot rate a unit offline")
    level = re.search(r"Overall exposure level for imsys\.service: ([\d.]+)", r.stdout)
    assert level is not None, r.stdout + r.stderr
    assert float(level.group(1)) <= 2.5
