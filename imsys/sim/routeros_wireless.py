"""Radios on the simulated router: which wireless menus it has, and stations associating.

RouterOS 6 bundles the `wireless` package (/interface/wireless); RouterOS 7 carries it,
or a `wifi-qcom` / `wifi-qcom-ac` driver (7.13 and later, /interface/wifi), only where a
radio needs it. A router without the package answers a print of the menu with RouterOS's
"no such command or directory (wifi)" and "no such command prefix", like any unknown path.

Stations are the subscribers' devices: tests and the demo associate one (a MAC with a
signal) the way `routeros_sessions` dials a subscriber in. A PPPoE CPE that dials over
its radio shows the same MAC as the session's caller-id.
"""

from __future__ import annotations

from typing import Final

from imsys.sim.routeros_menus import (
    WIFI_REGISTRATION,
    WIRELESS_REGISTRATION,
    MenuSpec,
    is_mac,
    parse_version,
)
from imsys.sim.routeros_state import RouterState

KNOWN_PACKAGES: Final = frozenset({"wireless", "wifi-qcom", "wifi-qcom-ac"})
WIFI_SINCE: Final = (7, 13)
# The registration tables by the name tests use for them.
TABLES: Final = {"wireless": WIRELESS_REGISTRATION, "wifi": WIFI_REGISTRATION}


def default_packages(version: str) -> frozenset[str]:
    """The optional packages a router of `version` has unless told otherwise: `wireless`
    on RouterOS 6, none on 7 (the modelled board, an RB5009, has no radio)."""
    return frozenset({"wireless"}) if parse_version(version)[0] < 7 else frozenset()


def check_packages(version: str, packages: frozenset[str]) -> frozenset[str]:
    """`packages`, or ValueError for a name unknown here or one `version` cannot run."""
    unknown = sorted(packages - KNOWN_PACKAGES)
    if unknown:
        raise ValueError(f"unknown RouterOS packages {unknown}; known: {sorted(KNOWN_PACKAGES)}")
    wifi = sorted(packages & WIFI_REGISTRATION.packages)
    if wifi and parse_version(version)[:2] < WIFI_SINCE:
        raise ValueError(f"{wifi} need RouterOS 7.13 or later (the /interface/wifi menu)")
    return packages


def _table(state: RouterState, menu: str | None) -> MenuSpec:
    present = [name for name, spec in TABLES.items() if state.has_menu(spec.path)]
    if menu is None:
        if len(present) != 1:
            raise ValueError(f"say which table (menu='wireless' or 'wifi'); router has {present}")
        menu = present[0]
    if menu not in TABLES:
        raise ValueError(f"menu must be 'wireless' or 'wifi', not {menu!r}")
    if menu not in present:
        raise ValueError(f"this router has no /interface/{menu}: install its package first")
    return TABLES[menu]


def associate(
    state: RouterState,
    mac_address: str,
    *,
    menu: str | None = None,
    interface: str | None = None,
    signal: int = -65,
    signal_strength: str | None = None,
    tx_ccq: int = 91,
    rx_ccq: int = 88,
    tx_rate: str = "144.4Mbps-20MHz/2S/SGI",
    rx_rate: str = "130Mbps-20MHz/2S",
    last_activity: str = "10ms",
    last_ip: str | None = None,
    uptime: float = 0.0,
) -> str:
    """A station associates: a new registration-table entry; returns its `.id`.

    `menu` is "wireless" (the legacy table) or "wifi"; left out, the one the router has.
    `signal` is in dBm; the legacy table prints it as `signal-strength=-65dBm@6Mbps`
    unless `signal_strength` gives the exact text. CCQ exists only in the legacy table.
    """
    if not is_mac(mac_address):
        raise ValueError(f"not a MAC address: {mac_address!r}")
    spec = _table(state, menu)
    mac = mac_address.upper()
    fields: dict[str, str]
    if spec is WIRELESS_REGISTRATION:
        fields = {
            "interface": interface or "wlan1",
            "mac-address": mac,
            "ap": "false",
            "wds": "false",
            "bridge": "false",
            "rx-rate": rx_rate,
            "tx-rate": tx_rate,
            "packets": "34591,20635",
            "bytes": "6689896,2094536",
            "frames": "34591,22078",
            "frame-bytes": "6853394,2125149",
            "hw-frames": "483633,22078",
            "hw-frame-bytes": "36949799,3008237",
            "tx-frames-timed-out": "0",
            "uptime": "",
            "last-activity": last_activity,
            "signal-strength": signal_strength or f"{signal}dBm@6Mbps",
            "signal-to-noise": str(signal + 108),
            "signal-strength-ch0": str(signal - 2),
            "signal-strength-ch1": str(signal - 1),
            "tx-ccq": str(tx_ccq),
            "rx-ccq": str(rx_ccq),
            "p-throughput": "27568",
            "802.1x-port-enabled": "true",
            "authentication-type": "wpa2-psk",
            "encryption": "aes-ccm",
            "group-encryption": "aes-ccm",
            "management-protection": "false",
            "wmm-enabled": "true",
        }
        if last_ip is not None:
            # Printed once the station has sent an IP packet.
            fields["last-ip"] = last_ip
    else:
        fields = {
            "interface": interface or "wifi1",
            "ssid": "MikroTik",
            "mac-address": mac,
            "uptime": "",
            "last-activity": last_activity,
            "signal": str(signal),
            "auth-type": "wpa2-psk",
            "band": "5ghz-ax",
            "tx-rate": tx_rate,
            "rx-rate": rx_rate,
            "packets": "34591,20635",
            "bytes": "6689896,2094536",
            "tx-bits-per-second": "0",
            "rx-bits-per-second": "0",
            "authorized": "true",
        }
    return state.start_session(spec.path, fields, uptime)


def disassociate(state: RouterState, mac_address: str) -> int:
    """The station leaves (out of range, switched off); returns how many entries went."""
    mac = mac_address.upper()
    return sum(
        state.end_sessions(spec.path, mac) for spec in TABLES.values() if state.has_menu(spec.path)
    )
