"""What the simulated router knows about its menus: fields, defaults, checks, trap texts."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final


class Trap(Exception):
    """A command failed the way RouterOS reports it: `!trap =message=...` then `!done`."""

    def __init__(self, message: str, category: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.category = category

    def words(self) -> list[str]:
        words = ["!trap"]
        if self.category is not None:
            words.append(f"=category={self.category}")
        words.append(f"=message={self.message}")
        return words


# Trap texts. Those in NOTES.md ("RouterOS API and librouteros") and the API manual are
# RouterOS's own; NOT_LOGGED_IN and the text for a missing name are stand-ins that no
# router was asked for. INVALID_VALUE is RouterOS 7's wording for a value its parser
# rejects (a bad address, boolean or rate-limit), category 1.
NO_SUCH_ITEM: Final = "no such item"
NO_SUCH_COMMAND: Final = "no such command"
NO_SUCH_PREFIX: Final = "no such command prefix"
BAD_LOGIN: Final = "invalid user name or password (6)"
NOT_LOGGED_IN: Final = "not logged in"
UNKNOWN_PARAMETER: Final = "unknown parameter"
INVALID_VALUE: Final = "invalid value for argument {name}"
# Category 1 is "argument value failure" in the API manual.
ARGUMENT_FAILURE: Final = 1
MISSING_ITEM_OR_COMMAND: Final = 0

CONFIG_COMMANDS: Final = frozenset(
    {"print", "getall", "add", "set", "remove", "enable", "disable", "unset"}
)
SESSION_COMMANDS: Final = frozenset({"print", "getall", "remove"})
READ_ONLY_COMMANDS: Final = frozenset({"print", "getall"})


def _names(text: str) -> frozenset[str]:
    names = frozenset(text.split())
    # A name cut by line wrapping ("limit-" + "uptime") would accept two wrong fields.
    broken = sorted(name for name in names if name.startswith("-") or name.endswith("-"))
    if broken:
        raise ValueError(f"field names broken by wrapping: {broken}")
    return names


# -- value formats, as RouterOS parses them -------------------------------------------

# A rate: bits per second, optional k/M/G suffix (e.g. 512k, 10M, 1G, 64000).
_RATE = r"\d+(?:\.\d+)?[kKMG]?"
# A burst time: seconds, optionally with a unit (8, 8s, 1m).
_TIME = r"\d+(?:ms|[smhdw])?"
_PAIR = r"{0}(?:/{0})?"
# rx[/tx] [rx-burst[/tx-burst] [rx-threshold[/tx-threshold] [rx-time[/tx-time]
# [priority [rx-min[/tx-min]]]]]] (NOTES.md; the tx part defaults to the rx part).
_RATE_LIMIT = re.compile(
    rf"{_PAIR.format(_RATE)}"
    rf"(?: {_PAIR.format(_RATE)}"
    rf"(?: {_PAIR.format(_RATE)}"
    rf"(?: {_PAIR.format(_TIME)}"
    rf"(?: [1-8]"
    rf"(?: {_PAIR.format(_RATE)})?)?)?)?)?"
)
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


def is_rate_limit(value: str) -> bool:
    return _RATE_LIMIT.fullmatch(value) is not None


def is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def is_mac(value: str) -> bool:
    return _MAC.fullmatch(value) is not None


_YES_NO_DEFAULT = frozenset({"yes", "no", "default"})


@dataclass(frozen=True)
class MenuSpec:
    path: str
    commands: frozenset[str]
    # Fields a client may write; everything else is "unknown parameter".
    fields: frozenset[str] = frozenset()
    # Printed even when never set, in this order, right after the key.
    defaults: Mapping[str, str] = field(default_factory=dict)
    booleans: frozenset[str] = frozenset({"disabled"})
    choices: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # field -> check of a non-empty value's format (an address, a rate-limit)
    formats: Mapping[str, Callable[[str], bool]] = field(default_factory=dict)
    # field -> menu whose `key` values it must name (a secret's profile must exist)
    references: Mapping[str, str] = field(default_factory=dict)
    # The unique, name-like field; it may stand for `.id` in set/remove.
    key: str | None = None
    # Uniqueness of `key` is per value of this field (hotspot users are unique per server).
    key_scope: str | None = None
    duplicate: str = ""
    # Trap for removing a built-in item (the `default` profiles); empty: no built-ins.
    permanent: str = ""
    # Queues get "queue1", "queue2"... when added without a name.
    auto_name: str | None = None
    # Live entries: uptime runs from when they appeared; a reboot clears them.
    session: bool = False
    # One item, no .id (/system/resource).
    single: bool = False
    # First .id number. Dynamic entries on a router get high ids (*81000001...), which
    # also keeps an id from one menu from naming an item in another here.
    first_id: int = 1
    # Packages any one of which brings this menu (empty: every router has it). A router
    # without them answers a print as it answers any unknown path.
    packages: frozenset[str] = frozenset()

    @property
    def names_as_ids(self) -> bool:
        # Only config menus accept a name in .id; session menus are left strict so a
        # caller that relies on it here would not pass against the sim and fail for real.
        return self.key is not None and not self.session


PPP_SECRET = MenuSpec(
    path="/ppp/secret",
    commands=CONFIG_COMMANDS,
    fields=_names(
        "name password profile service disabled comment remote-address local-address "
        "caller-id routes ipv6-routes limit-bytes-in limit-bytes-out remote-ipv6-prefix "
        "local-ipv6-prefix"
    ),
    defaults={
        "service": "any",
        "caller-id": "",
        "password": "",
        "profile": "default",
        "routes": "",
        "ipv6-routes": "",
        "limit-bytes-in": "0",
        "limit-bytes-out": "0",
        "disabled": "false",
    },
    choices={
        "service": frozenset({"any", "async", "l2tp", "ovpn", "pppoe", "pptp", "sstp"}),
    },
    formats={"remote-address": is_ipv4, "local-address": is_ipv4},
    references={"profile": "/ppp/profile"},
    key="name",
    duplicate="failure: secret with the same name already exists",
)

PPP_PROFILE = MenuSpec(
    path="/ppp/profile",
    commands=CONFIG_COMMANDS,
    # local-address and remote-address may name a pool here: not checked as addresses.
    fields=_names(
        "name comment local-address remote-address rate-limit only-one dns-server "
        "wins-server parent-queue queue-type address-list interface-list use-encryption "
        "bridge idle-timeout session-timeout change-tcp-mss insert-queue-before "
        "incoming-filter outgoing-filter use-compression use-mpls use-upnp use-ipv6"
    ),
    defaults={
        "use-mpls": "default",
        "use-compression": "default",
        "use-encryption": "default",
        "only-one": "default",
        "change-tcp-mss": "default",
    },
    booleans=frozenset(),
    choices={
        "only-one": _YES_NO_DEFAULT,
        "change-tcp-mss": _YES_NO_DEFAULT,
        "use-compression": _YES_NO_DEFAULT,
        "use-upnp": _YES_NO_DEFAULT,
        "use-encryption": _YES_NO_DEFAULT | {"required"},
        "use-mpls": _YES_NO_DEFAULT | {"required"},
        "use-ipv6": _YES_NO_DEFAULT | {"required"},
    },
    formats={"rate-limit": is_rate_limit},
    key="name",
    duplicate="failure: profile with the same name already exists",
    # The built-in `default` and `default-encryption` cannot be removed (the text is a
    # stand-in: the refusal is documented, its wording was not captured here).
    permanent="failure: cannot remove default profile",
)

PPP_ACTIVE = MenuSpec(
    path="/ppp/active",
    commands=SESSION_COMMANDS,
    session=True,
    first_id=0x81000001,
    key="name",
    booleans=frozenset({"radius"}),
)

HOTSPOT_USER = MenuSpec(
    path="/ip/hotspot/user",
    commands=CONFIG_COMMANDS,
    fields=_names(
        "name password profile server disabled comment mac-address address email "
        "limit-uptime limit-bytes-in limit-bytes-out limit-bytes-total routes"
    ),
    defaults={"server": "all", "profile": "default", "disabled": "false"},
    formats={"address": is_ipv4, "mac-address": is_mac},
    references={"profile": "/ip/hotspot/user/profile"},
    key="name",
    key_scope="server",
    duplicate="failure: already have user with this name for this server",
)

HOTSPOT_USER_PROFILE = MenuSpec(
    path="/ip/hotspot/user/profile",
    commands=CONFIG_COMMANDS,
    fields=_names(
        "name rate-limit shared-users session-timeout idle-timeout keepalive-timeout "
        "address-pool address-list comment parent-queue queue-type incoming-filter "
        "outgoing-filter on-login on-logout status-autorefresh mac-cookie-timeout "
        "add-mac-cookie transparent-proxy open-status-page"
    ),
    defaults={"shared-users": "1", "idle-timeout": "none", "keepalive-timeout": "2m"},
    booleans=frozenset({"add-mac-cookie", "transparent-proxy"}),
    formats={"rate-limit": is_rate_limit},
    permanent="failure: cannot remove default profile",
    key="name",
    duplicate="failure: already have profile with such name",
)

HOTSPOT_ACTIVE = MenuSpec(
    path="/ip/hotspot/active",
    commands=SESSION_COMMANDS,
    session=True,
    first_id=0x82000001,
    key="user",
    booleans=frozenset({"radius"}),
)

QUEUE_SIMPLE = MenuSpec(
    path="/queue/simple",
    commands=CONFIG_COMMANDS,
    fields=_names(
        "name target dst max-limit limit-at burst-limit burst-threshold burst-time "
        "priority parent queue packet-marks comment disabled time bucket-size"
    ),
    defaults={
        "target": "",
        "parent": "none",
        "packet-marks": "",
        "priority": "8/8",
        "queue": "default-small/default-small",
        "limit-at": "0/0",
        "max-limit": "0/0",
        "burst-limit": "0/0",
        "burst-threshold": "0/0",
        "burst-time": "0s/0s",
        "bucket-size": "0.1/0.1",
        "disabled": "false",
    },
    key="name",
    duplicate="failure: already have such name",
    auto_name="queue",
)

# The registration tables: stations associated with the router's radios, read-only,
# `remove` de-authenticates one. Fields and formats from MikroTik's "Wireless Interface"
# and "WiFi" manuals and the v7 command reference; a v6 API print of the legacy table
# gives e.g. `signal-strength=-65dBm@6Mbps`, `tx-ccq=91`, `tx-rate=144.4Mbps-20MHz/2S/SGI`,
# `last-activity=4s750ms`; the wifi table gives `signal=-45` (dBm) and no CCQ.
WIRELESS_REGISTRATION = MenuSpec(
    path="/interface/wireless/registration-table",
    commands=SESSION_COMMANDS,
    session=True,
    first_id=0x83000001,
    key="mac-address",
    booleans=frozenset(
        {"ap", "wds", "bridge", "802.1x-port-enabled", "wmm-enabled", "management-protection"}
    ),
    packages=frozenset({"wireless"}),
)

WIFI_REGISTRATION = MenuSpec(
    path="/interface/wifi/registration-table",
    commands=SESSION_COMMANDS,
    session=True,
    first_id=0x84000001,
    key="mac-address",
    booleans=frozenset({"authorized"}),
    # RouterOS 7.13 and later; the driver package depends on the radio's chipset.
    packages=frozenset({"wifi-qcom", "wifi-qcom-ac"}),
)

SYSTEM_RESOURCE = MenuSpec(
    path="/system/resource",
    commands=READ_ONLY_COMMANDS,
    single=True,
    booleans=frozenset(),
)

SYSTEM_IDENTITY = MenuSpec(
    path="/system/identity",
    commands=frozenset({"print", "getall", "set"}),
    fields=frozenset({"name"}),
    single=True,
    booleans=frozenset(),
)

MENUS: Final[Mapping[str, MenuSpec]] = {
    spec.path: spec
    for spec in (
        PPP_SECRET,
        PPP_PROFILE,
        PPP_ACTIVE,
        HOTSPOT_USER,
        HOTSPOT_USER_PROFILE,
        HOTSPOT_ACTIVE,
        QUEUE_SIMPLE,
        SYSTEM_RESOURCE,
        SYSTEM_IDENTITY,
        WIRELESS_REGISTRATION,
        WIFI_REGISTRATION,
    )
}

# Items a fresh router already has; their ids are fixed and survive a reboot.
BUILTIN_ITEMS: Final[Mapping[str, tuple[tuple[int, Mapping[str, str]], ...]]] = {
    "/ppp/profile": (
        (0x0, {"name": "default"}),
        (0xFFFFFFFE, {"name": "default-encryption", "use-encryption": "yes"}),
    ),
    "/ip/hotspot/user/profile": ((0x0, {"name": "default"}),),
}

# Directories that exist without being menus here, so that `/ip/foo` and `/ppp/foo`
# get the "no such command or directory (foo)" of an unknown name one level down.
KNOWN_DIRS: Final = frozenset(
    {"/ppp", "/ip", "/ip/hotspot", "/queue", "/system", "/interface", "/user", "/tool"}
)

SPECIAL_COMMANDS: Final = frozenset({"/login", "/quit", "/cancel", "/system/reboot"})


def menu_path(menu: str) -> str:
    """Accept "/ppp/secret", "ppp/secret" or "ppp secret"."""
    path = "/" + "/".join(part for part in menu.replace(" ", "/").split("/") if part)
    if path not in MENUS:
        raise KeyError(f"the simulator has no menu {menu!r}")
    return path


def unknown_segment(command: str) -> str:
    """The first path segment of an unknown command that names nothing."""
    parts = [part for part in command.split("/") if part]
    known = set(MENUS) | KNOWN_DIRS
    prefix = ""
    for part in parts[:-1]:
        prefix += "/" + part
        if prefix not in known:
            return part
    return parts[-1] if parts else ""


# What tests may pass when seeding: stored as RouterOS prints it.
Value = str | int | bool
_UPTIME_PART = re.compile(r"(\d+)([wdhms])")
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}

# The RouterOS version a simulator reports unless told otherwise; from 7.18 on an empty
# print answers `!empty` before `!done`.
DEFAULT_VERSION: Final = "7.19.4"
EMPTY_REPLY_SINCE: Final = (7, 18)


def parse_version(version: str) -> tuple[int, ...]:
    """(7, 19, 4) from "7.19.4"; ValueError for anything that is not a RouterOS version."""
    if not re.fullmatch(r"\d+\.\d+(?:\.\d+)?", version):
        raise ValueError(f"not a RouterOS version: {version!r} (like 6.49.17 or 7.19.4)")
    return tuple(int(part) for part in version.split("."))


def answers_empty(version: str) -> bool:
    """Whether RouterOS `version` answers an empty print with `!empty` (7.18 and later)."""
    return parse_version(version)[:2] >= EMPTY_REPLY_SINCE


DEFAULT_RESOURCE: Mapping[str, str] = {
    "uptime": "",
    "version": f"{DEFAULT_VERSION} (stable)",
    "build-time": "2024-11-26 12:33:56",
    "factory-software": "7.1",
    "free-memory": "859181056",
    "total-memory": "1073741824",
    "cpu": "ARM64",
    "cpu-count": "4",
    "cpu-frequency": "1400",
    "cpu-load": "3",
    "free-hdd-space": "925196288",
    "total-hdd-space": "1073741824",
    "write-sect-since-reboot": "1024",
    "write-sect-total": "502371",
    "bad-blocks": "0",
    "architecture-name": "arm64",
    "board-name": "RB5009UG+S+",
    "platform": "MikroTik",
}


def parse_uptime(text: str) -> float:
    """Seconds in a RouterOS duration such as 1w2d3h4m5s."""
    if not re.fullmatch(r"(\d+[wdhms])+", text):
        raise ValueError(f"not a RouterOS duration: {text!r}")
    return float(sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _UPTIME_PART.findall(text)))


def to_wire(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_uptime(seconds: float) -> str:
    """RouterOS style: 1w2d3h4m5s, zero parts left out, "0s" at the start."""
    rest = max(int(seconds), 0)
    parts: list[str] = []
    for unit, size in _UNIT_SECONDS.items():
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def normalize_bool(field_name: str, value: str) -> str:
    """RouterOS takes yes/no/true/false and prints true/false."""
    lowered = value.lower()
    if lowered in ("yes", "true"):
        return "true"
    if lowered in ("no", "false"):
        return "false"
    raise Trap(INVALID_VALUE.format(name=field_name), ARGUMENT_FAILURE)


def format_id(number: int) -> str:
    return f"*{number:X}"


def parse_id(text: str) -> int | None:
    if not text.startswith("*"):
        return None
    try:
        number = int(text[1:], 16)
    except ValueError:
        return None
    return number if number >= 0 else None
