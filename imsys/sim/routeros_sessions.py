"""Subscribers coming and going: the /ppp/active and /ip/hotspot/active side of the router.

The API never creates sessions; subscribers do, by dialling in or logging in. Tests
and the demo play the subscribers through these functions.
"""

from __future__ import annotations

import ipaddress

from imsys.sim.routeros_menus import HOTSPOT_ACTIVE, HOTSPOT_USER, PPP_ACTIVE, PPP_SECRET, MenuSpec
from imsys.sim.routeros_state import RouterState


def _enabled(state: RouterState, spec: MenuSpec, name: str) -> dict[str, str] | None:
    fields = state.lookup(spec, name)
    return fields if fields is not None and fields.get("disabled") != "true" else None


def _address(host: int, net: str) -> str:
    return str(ipaddress.IPv4Address(net) + host)


def _mac(kind: int, host: int) -> str:
    return f"02:00:00:{kind:02X}:{host >> 8 & 0xFF:02X}:{host & 0xFF:02X}"


def connect_session(
    state: RouterState,
    name: str,
    *,
    address: str | None = None,
    caller_id: str | None = None,
    service: str | None = None,
    uptime: float = 0.0,
    check: bool = True,
) -> str:
    """A PPP subscriber dials in: a new /ppp/active entry; returns its `.id`.

    With `check` the login is refused (ValueError) as a router refuses it: no secret,
    or a disabled one. Without, a session can exist for a secret that does not.
    """
    secret = _enabled(state, PPP_SECRET, name)
    if check and secret is None:
        raise ValueError(f"ppp login refused for {name!r}: no enabled secret")
    secret = secret or state.lookup(PPP_SECRET, name) or {}
    host = state.next_host()
    if service is None:
        service = secret.get("service", "any")
        service = "pppoe" if service == "any" else service
    fields = {
        "name": name,
        "service": service,
        "caller-id": caller_id or _mac(0, host),
        "encoding": "",
        "address": address or secret.get("remote-address") or _address(host, "10.0.0.0"),
        "uptime": "",
        "session-id": f"0x{0x81A00000 + host:08X}",
        "limit-bytes-in": "0",
        "limit-bytes-out": "0",
        "radius": "false",
    }
    return state.start_session(PPP_ACTIVE.path, fields, uptime)


def login_hotspot(
    state: RouterState,
    user: str,
    *,
    address: str | None = None,
    mac_address: str | None = None,
    server: str = "hotspot1",
    uptime: float = 0.0,
    check: bool = True,
) -> str:
    """A hotspot user logs in: a new /ip/hotspot/active entry; returns its `.id`."""
    if check and _enabled(state, HOTSPOT_USER, user) is None:
        raise ValueError(f"hotspot login refused for {user!r}: no enabled user")
    host = state.next_host()
    fields = {
        "server": server,
        "user": user,
        "address": address or _address(host, "10.5.50.0"),
        "mac-address": mac_address or _mac(1, host),
        "login-by": "http-chap",
        "uptime": "",
        "idle-time": "0s",
        "bytes-in": "0",
        "bytes-out": "0",
        "radius": "false",
    }
    return state.start_session(HOTSPOT_ACTIVE.path, fields, uptime)


def redial(state: RouterState, path: str, kicked: list[dict[str, str]]) -> None:
    """Kicked subscribers' devices come back at once, as real ones do: a PPPoE CPE dials
    again, a hotspot client logs in again by its cookie or MAC. Each gets back in only if
    its secret or user still exists and is enabled, with a new session (a new `.id`)."""
    for row in kicked:
        if path == PPP_ACTIVE.path and _enabled(state, PPP_SECRET, row["name"]) is not None:
            connect_session(
                state,
                row["name"],
                address=row["address"],
                caller_id=row["caller-id"],
                service=row["service"],
            )
        elif path == HOTSPOT_ACTIVE.path and _enabled(state, HOTSPOT_USER, row["user"]) is not None:
            login_hotspot(
                state,
                row["user"],
                address=row["address"],
                mac_address=row["mac-address"],
                server=row["server"],
            )
