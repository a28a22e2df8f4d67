"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``) without a dependency.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and, with a
watchdog, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). The service sends newline-separated
``KEY=VALUE`` datagrams: ``READY=1`` once it does its job, ``WATCHDOG=1`` at least every
``WATCHDOG_USEC`` (we send at half that), ``STOPPING=1`` when it begins to shut down and
``STATUS=...`` lines for ``systemctl status``. Without ``NOTIFY_SOCKET`` every call is a
no-op, so the same code runs under Docker, a terminal or a test.

A notification that cannot be sent is logged, never raised: the service must not fall
over because its supervisor went away.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("imsys.systemd")


def _address(raw: str) -> str | None:
    """The socket address of ``NOTIFY_SOCKET``; None when it is unset or unsupported."""
    if raw.startswith("@"):
        # An abstract socket: a leading NUL instead of '@', no file behind it.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # e.g. systemd 254's "vsock:..." addresses, for VMs: not ours to handle


class Notifier:
    """Sends notifications to the service manager; every method is safe without one."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Read ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` / ``WATCHDOG_PID`` from ``environ``.

        The watchdog is ours only when ``WATCHDOG_PID`` is unset or names this process.
        """
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("systemd_notify_socket_unsupported", notify_socket=raw)
        watchdog_s: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1_000_000
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when it went out."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: a full queue drops one ping, the next follows.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("systemd_notify_failed", error=str(exc), message=lines[0])
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping at half the watchdog period for as long as the event loop runs it.

        A blocked or wedged event loop stops the pings, and systemd restarts the service:
        exactly the failure a process that is alive but stuck would otherwise hide.
        """
        if self.watchdog_s is None or self.address is None:
            return
        every = self.watchdog_s / 2
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            self.notify("WATCHDOG=1")
            await asyncio.sleep(every)
            late = loop.time() - started - every
            if late > every / 2:
                # The loop was blocked long enough to risk a restart: say so in the log.
                log.warning("event_loop_lagging", late_s=round(late, 3))

    async def run(
        self, ready: asyncio.Event, stopping: asyncio.Event, ready_status: str
    ) -> None:
        """READY=1 when ``ready`` is set, watchdog pings meanwhile, STOPPING=1 at
        ``stopping``; runs until cancelled (after shutdown)."""
        if not self.enabled:
            return
        pinger = asyncio.create_task(self.watchdog(), name="systemd-watchdog")
        try:
            self.status("starting: connecting to Redis and PostgreSQL")
            await _first(ready, stopping)
            if not stopping.is_set():
                self.ready(ready_status)
                log.info("systemd_ready", watchdog_s=self.watchdog_s)
            await stopping.wait()
            self.stopping("stopping: draining running jobs")
            # Pings go on while the jobs drain: the loop is still healthy.
            await pinger
        finally:
            pinger.cancel()
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
