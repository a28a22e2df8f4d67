"""RouterOS API simulator: the binary API on TCP, a router's state in memory, and faults.

It speaks the real protocol so that `librouteros`, unmodified, is the client in tests
and in the demo. This module is the network side (listening, connections, faults);
the rest is split by concern: `routeros_wire` (framing), `routeros_api` (replies),
`routeros_state` and `routeros_query` (items and commands), `routeros_menus` (menus
and trap texts), `routeros_sessions` (subscribers logging in).

Faults are switched from Python by the test that owns the simulator:

    sim.drop_after_write()            # apply the next write, close before !done
    sim.stall()  /  sim.unstall()     # read commands, answer nothing
    sim.fatal("...")                  # answer the next command with !fatal and close
    await sim.refuse_connections()    # close the listening socket: connection refused
    await sim.go_down(5) / come_up()  # refuse and drop every open connection
    await sim.reboot()                # sessions end, every .id changes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from imsys.sim import routeros_sessions, routeros_wireless
from imsys.sim.routeros_api import (
    ApiResponder,
    CommandRecord,
    Connection,
    DropRule,
    close_connection,
    redact,
)
from imsys.sim.routeros_menus import DEFAULT_VERSION, Value, answers_empty, parse_version
from imsys.sim.routeros_state import RouterState, Write
from imsys.sim.routeros_wire import WireError, encode_sentences, read_sentence

__all__ = ["CommandRecord", "RouterOSSimulator", "Write", "main", "serve"]

log = logging.getLogger(__name__)


class RouterOSSimulator(ApiResponder):
    """One simulated router. Start it, point a client at `.port`, switch faults on and off."""

    def __init__(
        self,
        *,
        username: str = "admin",
        password: str = "",
        ssl_context: ssl.SSLContext | None = None,
        version: str = DEFAULT_VERSION,
        empty_reply: bool | None = None,
        reboot_downtime: float = 0.0,
        sensitive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        packages: Sequence[str] | None = None,
    ) -> None:
        super().__init__(RouterState(clock=clock), username, password)
        # Optional packages (`wireless`, `wifi-qcom`, `wifi-qcom-ac`): which wireless
        # menus exist. Left out: `wireless` on RouterOS 6, none on 7.
        installed = None if packages is None else frozenset(packages)
        self.state.packages = routeros_wireless.check_packages(
            version, routeros_wireless.default_packages(version) if installed is None else installed
        )
        # The RouterOS version: /system/resource prints it, and from 7.18 on an empty
        # print answers `!empty` (unless `empty_reply` says otherwise).
        self.version = version
        self.empty_reply = answers_empty(version) if empty_reply is None else empty_reply
        self.state.set_resource({"version": f"{version} (stable)"})
        # How long `/system/reboot` keeps the router away (refusing connections).
        self.reboot_downtime = reboot_downtime
        # False: the API user lacks the `sensitive` policy, so prints omit `password`.
        self.sensitive = sensitive
        self.connections = 0
        self._redial = False
        self._ssl = ssl_context
        self._host = "127.0.0.1"
        self._port = 0
        self._server: asyncio.Server | None = None
        self._listener_lock = asyncio.Lock()
        self._open: set[Connection] = set()
        self._started = False
        self._refusing = False
        self._down = False
        self._up = asyncio.Event()
        self._revival: asyncio.Task[None] | None = None
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._stall_timer: asyncio.TimerHandle | None = None

    # -- life cycle ----------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 picks a free port); returns the port."""
        self._host, self._port = host, port
        self._started = True
        self._refusing = self._down = False
        await self._sync_listener()
        return self._port

    async def stop(self) -> None:
        """Close the listener and every connection. Safe to call twice."""
        self._started = False
        if self._revival is not None:
            self._revival.cancel()
            self._revival = None
        self.unstall()
        await self._sync_listener()
        tasks = [conn.task for conn in self._open if conn.task is not None]
        self._drop_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def port(self) -> int:
        return self._port

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def boots(self) -> int:
        return self.state.boots

    async def wait_up(self) -> None:
        """Return once the router listens again (after go_down or a reboot with downtime)."""
        await self._up.wait()

    async def _sync_listener(self) -> None:
        async with self._listener_lock:
            wanted = self._started and not (self._refusing or self._down)
            if wanted and self._server is None:
                self._server = await asyncio.start_server(
                    self._serve_connection, self._host, self._port, ssl=self._ssl
                )
                self._port = self._server.sockets[0].getsockname()[1]
                self._up.set()
                log.info("routeros_sim_listening host=%s port=%s", self._host, self._port)
            elif not wanted:
                self._close_listener()

    def _close_listener(self) -> None:
        if self._server is not None:
            # close() shuts the listening socket at once: new connects are refused.
            # Not awaiting wait_closed(): from 3.12 it waits for open connections too.
            self._server.close()
            self._server = None
            self._up.clear()

    # -- faults --------------------------------------------------------------------

    def drop_after_write(
        self,
        n: int = 1,
        on_item: Callable[[Write], bool] | None = None,
        *,
        reset: bool = False,
    ) -> None:
        """Apply the n-th write from now (counting only writes `on_item` accepts), then
        close that connection instead of answering: the write happened, the reply is lost.
        `reset` sends a TCP RST (ConnectionResetError) instead of a clean close. One shot."""
        if n < 1:
            raise ValueError("n counts writes from 1")
        self._drop = DropRule(n, on_item, reset)

    def stall(self, seconds: float | None = None) -> None:
        """Keep reading commands but answer none, for `seconds` or until `unstall()`.
        Commands held meanwhile run when the stall ends, as on a router that was slow."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._unstalled.clear()
        if seconds is not None:
            self._stall_timer = asyncio.get_running_loop().call_later(seconds, self.unstall)

    def unstall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._unstalled.set()

    def fatal(self, message: str = "session terminated on request", *, now: bool = False) -> None:
        """Answer the next command (any connection) with `!fatal message` and close it.
        With `now`, send it unasked on every open connection at once, as a router does
        when it throws sessions out."""
        if not now:
            self._fatal = message
            return
        for conn in list(self._open):
            self.send_fatal(conn, message)

    def reset_faults(self) -> None:
        """Disarm drop_after_write and fatal, end a stall."""
        self._drop = None
        self._fatal = None
        self.unstall()

    async def refuse_connections(self, refuse: bool = True) -> None:
        """Close (or reopen, on the same port) the listening socket. Open connections stay."""
        self._refusing = refuse
        await self._sync_listener()

    async def go_down(self, duration: float | None = None) -> None:
        """Unreachable: every connection drops, new ones are refused; back after
        `duration` seconds, or at `come_up()`."""
        self._down = True
        self._drop_all()
        await self._sync_listener()
        self._schedule_revival(duration)

    async def come_up(self) -> None:
        if self._revival is not None and self._revival is not asyncio.current_task():
            self._revival.cancel()
        self._revival = None
        self._down = False
        await self._sync_listener()

    async def reboot(self, downtime: float | None = None) -> None:
        """Reboot: connections drop, sessions end, config stays, every `.id` changes.
        With a downtime the router refuses connections that long."""
        self._reboot_now(downtime)
        await self._sync_listener()

    def _reboot_now(self, downtime: float | None = None) -> None:
        downtime = self.reboot_downtime if downtime is None else downtime
        self.state.reboot()
        self._drop_all()
        log.info("routeros_sim_rebooted boots=%s", self.state.boots)
        if downtime > 0:
            self._down = True
            self._schedule_revival(downtime)
            # Closing is synchronous (this runs inside a command); reopening is the
            # revival task's.
            self._close_listener()

    def _schedule_revival(self, after: float | None) -> None:
        if self._revival is not None:
            self._revival.cancel()
            self._revival = None
        if after is not None:
            self._revival = asyncio.get_running_loop().create_task(self._revive(after))

    async def _revive(self, after: float) -> None:
        await asyncio.sleep(after)
        await self.come_up()

    # -- state, for tests and the demo ----------------------------------------------

    def items(self, menu: str) -> list[dict[str, str]]:
        """Rows of a menu as the router would print them (`.id` included, strings only)."""
        return self.state.rows(menu)

    def find(self, menu: str, **fields: str) -> list[dict[str, str]]:
        """Rows whose fields equal the given ones (`remote_address=` means remote-address)."""
        wanted = {name.replace("_", "-"): value for name, value in fields.items()}
        return [row for row in self.items(menu) if all(row.get(k) == v for k, v in wanted.items())]

    def add_item(
        self, menu: str, fields: Mapping[str, Value] | None = None, /, **kwargs: Value
    ) -> str:
        """Seed an item with the API's checks; returns its `.id`. Keyword names use `_`
        for `-`; pass a mapping for anything else."""
        merged = dict(fields or {})
        merged.update({name.replace("_", "-"): value for name, value in kwargs.items()})
        return self.state.add_item(menu, merged)

    def set_resource(self, **fields: Value) -> None:
        """Change /system/resource (e.g. cpu_load=90, uptime="1w2d3h4m5s", version=...)."""
        self.state.set_resource({name.replace("_", "-"): v for name, v in fields.items()})

    def connect_session(
        self,
        name: str,
        *,
        address: str | None = None,
        caller_id: str | None = None,
        service: str | None = None,
        uptime: float = 0.0,
        check: bool = True,
    ) -> str:
        """A PPP subscriber dials in (refused with ValueError if its secret is missing or
        disabled, unless `check=False`); returns the /ppp/active `.id`."""
        return routeros_sessions.connect_session(
            self.state,
            name,
            address=address,
            caller_id=caller_id,
            service=service,
            uptime=uptime,
            check=check,
        )

    def login_hotspot(
        self,
        user: str,
        *,
        address: str | None = None,
        mac_address: str | None = None,
        server: str = "hotspot1",
        uptime: float = 0.0,
        check: bool = True,
    ) -> str:
        """A hotspot user logs in; returns the /ip/hotspot/active `.id`."""
        return routeros_sessions.login_hotspot(
            self.state,
            user,
            address=address,
            mac_address=mac_address,
            server=server,
            uptime=uptime,
            check=check,
        )

    def associate_wireless(self, mac_address: str, **fields: Any) -> str:
        """A station (a subscriber's device, e.g. the CPE whose MAC is the PPPoE
        caller-id) associates with a radio: a registration-table entry; returns its `.id`.
        Keywords: see `routeros_wireless.associate` (menu, signal, tx_ccq, tx_rate...)."""
        return routeros_wireless.associate(self.state, mac_address, **fields)

    def disassociate_wireless(self, mac_address: str) -> int:
        """The station leaves the registration table; returns how many entries went."""
        return routeros_wireless.disassociate(self.state, mac_address)

    @property
    def packages(self) -> frozenset[str]:
        """Optional packages installed: `wireless` (/interface/wireless), `wifi-qcom` or
        `wifi-qcom-ac` (/interface/wifi, RouterOS 7.13+)."""
        return self.state.packages

    @packages.setter
    def packages(self, names: frozenset[str]) -> None:
        self.state.packages = routeros_wireless.check_packages(self.version, frozenset(names))

    def disconnect_session(self, name: str) -> int:
        """The PPP subscriber hangs up by themselves; returns how many sessions ended."""
        return self.state.end_sessions("/ppp/active", name)

    @property
    def sessions_survive_remove(self) -> bool:
        """When true, removing an active session answers !done but the session stays."""
        return self.state.sessions_survive_remove

    @sessions_survive_remove.setter
    def sessions_survive_remove(self, value: bool) -> None:
        self.state.sessions_survive_remove = value

    @property
    def redial(self) -> bool:
        """When true, a kicked subscriber whose secret (PPP) or user (hotspot) is still
        enabled comes back at once with a new session."""
        return self._redial

    @redial.setter
    def redial(self, value: bool) -> None:
        self._redial = value
        self.state.after_kick = self._after_kick if value else None

    def _after_kick(self, path: str, kicked: list[dict[str, str]]) -> None:
        routeros_sessions.redial(self.state, path, kicked)

    # -- connections ---------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        conn = Connection(self.connections, writer, asyncio.current_task())
        self._open.add(conn)
        try:
            while not conn.closed:
                words = await read_sentence(reader)
                if not words:
                    continue
                self.commands.append(CommandRecord(conn.number, redact(words)))
                self.command_counts[words[0]] += 1
                await self._unstalled.wait()
                if conn.closed:
                    return
                replies = self.respond(conn, words)
                if replies is None:
                    return
                writer.write(encode_sentences(replies))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, WireError, ssl.SSLError):
            pass  # the client left, or sent garbage: a router just closes
        finally:
            self._open.discard(conn)
            close_connection(conn)

    def _drop_all(self) -> None:
        for conn in list(self._open):
            close_connection(conn, abort=True)


async def serve(
    host: str = "127.0.0.1",
    port: int = 8728,
    username: str = "admin",
    password: str = "",
    *,
    ssl_context: ssl.SSLContext | None = None,
    profiles: Sequence[str] = (),
    version: str = DEFAULT_VERSION,
    sensitive: bool = True,
    packages: Sequence[str] | None = None,
) -> None:
    """Run a simulator until cancelled (the `sim routeros` command)."""
    sim = RouterOSSimulator(
        username=username,
        password=password,
        ssl_context=ssl_context,
        version=version,
        sensitive=sensitive,
        packages=packages,
    )
    for profile in profiles:
        sim.add_item("/ppp/profile", name=profile)
        sim.add_item("/ip/hotspot/user/profile", name=profile)
    await sim.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def version_arg(text: str) -> str:
    """argparse type for `--version`: a RouterOS version such as 6.49.17 or 7.19.4."""
    try:
        parse_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imsys.sim.routeros", description="RouterOS API simulator"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8728)
    parser.add_argument("--username", default="admin")
    parser.add_argument("--password", default="")
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        help="PPP and hotspot profile to create (repeatable)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate: serve API-SSL instead of API")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument(
        "--version",
        type=version_arg,
        default=DEFAULT_VERSION,
        help="RouterOS version to model (7.18 and later answer an empty print with !empty)",
    )
    parser.add_argument(
        "--no-sensitive",
        action="store_true",
        help="model an API user without the `sensitive` policy: prints omit passwords",
    )
    parser.add_argument(
        "--package",
        action="append",
        default=None,
        choices=sorted(routeros_wireless.KNOWN_PACKAGES),
        help="optional package installed (repeatable; default: wireless on 6.x, none on 7.x)",
    )
    options = parser.parse_args(argv)
    context: ssl.SSLContext | None = None
    if options.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(options.tls_cert, options.tls_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                options.host,
                options.port,
                options.username,
                options.password,
                ssl_context=context,
                profiles=options.profile,
                version=options.version,
                sensitive=not options.no_sensitive,
                packages=options.package,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
