"""Signal strength: the router's wireless registration tables, matched to subscribers.

The hardware is the master of signal strength. Each router facts poll reads
`/interface/wireless/registration-table` (the legacy `wireless` package: RouterOS 6,
and 7 where installed) and `/interface/wifi/registration-table` (RouterOS 7.13+ with a
wifi driver package), and matches each station to a subscriber by the MAC of the
subscriber's live session: a PPPoE session's `caller-id` (the MAC the client dialled
from) or a hotspot session's `mac-address`. One row per subscriber in
`subscriber_wireless` keeps the latest reading; a station that leaves keeps its last
reading with `associated` false, so the operator still sees the signal it had and when.

A router without either menu is the usual case (a wired concentrator) and is no error.
A failing read is logged and changes nothing: it never stops the facts poll.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import structlog

from imsys.routeros import RouterError, RouterSession, RouterTrap, menus

if TYPE_CHECKING:
    from imsys.db import Executor

log = structlog.get_logger("imsys.sync")

# The tables, by the name the API reports as `source`.
TABLES: Final = {"wireless": menus.WIRELESS_REGISTRATION, "wifi": menus.WIFI_REGISTRATION}
_MAC: Final = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}")
# `-65dBm@6Mbps` (the legacy table; v6.4x API prints `-65@6Mbps`), `-45` (wifi), `-45dBm`.
_SIGNAL: Final = re.compile(r"(-?\d+)(?:\s*dBm)?(?:@.*)?")
_PERCENT: Final = re.compile(r"(\d+)\s*%?")


@dataclass(frozen=True, slots=True)
class Station:
    """One registration-table entry, values as the router printed them."""

    mac_address: str
    source: str
    interface: str | None
    signal: str | None
    signal_dbm: int | None
    tx_ccq: int | None
    rx_ccq: int | None
    tx_rate: str | None
    rx_rate: str | None
    uptime: str | None
    last_activity: str | None


def normalize_mac(text: str | None) -> str | None:
    """`AA:BB:CC:DD:EE:FF` from a MAC written with `:` or `-` in any case; None for
    anything else (a PPTP or L2TP caller-id is the client's IP address)."""
    if not text or not _MAC.fullmatch(text.strip()):
        return None
    return text.strip().upper().replace("-", ":")


def parse_signal(text: str | None) -> int | None:
    """dBm from `-65dBm@6Mbps`, `-65@6Mbps`, `-65dBm` or `-65`; None if unreadable."""
    match = _SIGNAL.fullmatch(text.strip()) if text else None
    return int(match.group(1)) if match else None


def parse_percent(text: str | None) -> int | None:
    """CCQ in percent from `91` or `91%`; None if unreadable."""
    match = _PERCENT.fullmatch(text.strip()) if text else None
    return int(match.group(1)) if match else None


def station_from(row: Mapping[str, str], source: str) -> Station | None:
    """The station of a printed row; None for a row without a MAC address."""
    mac = normalize_mac(row.get("mac-address"))
    if mac is None:
        return None
    raw = row.get("signal-strength") if source == "wireless" else row.get("signal")
    return Station(
        mac_address=mac,
        source=source,
        interface=row.get("interface"),
        signal=raw,
        signal_dbm=parse_signal(raw),
        tx_ccq=parse_percent(row.get("tx-ccq")),
        rx_ccq=parse_percent(row.get("rx-ccq")),
        tx_rate=row.get("tx-rate"),
        rx_rate=row.get("rx-rate"),
        uptime=row.get("uptime"),
        last_activity=row.get("last-activity"),
    )


def _missing_menu(exc: RouterTrap) -> bool:
    # "no such command or directory (wifi)"; "no such command prefix": no such package.
    return "no such command" in exc.message


async def read_stations(ros: RouterSession) -> list[Station]:
    """Every station in the router's registration tables (none if it has no radio menu).

    Raises RouterError when a table the router has cannot be read.
    """
    stations: list[Station] = []
    for source, menu in TABLES.items():
        try:
            rows = await ros.print(menu)
        except RouterTrap as exc:
            if _missing_menu(exc):
                continue
            raise
        stations.extend(s for s in (station_from(r, source) for r in rows) if s is not None)
    return stations


def match(
    ppp: Iterable[Mapping[str, str]],
    hotspot: Iterable[Mapping[str, str]],
    stations: Iterable[Station],
) -> list[tuple[str, str, Station]]:
    """(service, username, station) for each session whose MAC is an associated station.

    A PPPoE session's `caller-id` is the MAC its client dialled from; a hotspot session
    has its client's `mac-address`. A session without a MAC (PPTP, L2TP) matches nothing.
    """
    by_mac = {s.mac_address: s for s in stations}
    found: list[tuple[str, str, Station]] = []
    for service, rows, user_key, mac_key in (
        ("pppoe", ppp, "name", "caller-id"),
        ("hotspot", hotspot, "user", "mac-address"),
    ):
        for row in rows:
            mac = normalize_mac(row.get(mac_key))
            station = by_mac.get(mac) if mac else None
            if station is not None and row.get(user_key):
                found.append((service, row[user_key], station))
    return found


RECORD = """
WITH seen AS (
    SELECT DISTINCT ON (s.id) s.id AS subscriber_id, m.*
    FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::int[], $9::int[], $10::int[], $11::text[], $12::text[], $13::text[],
                $14::text[])
         AS m(service, username, mac_address, source, interface, signal, signal_dbm,
              tx_ccq, rx_ccq, tx_rate, rx_rate, uptime, last_activity)
    JOIN subscribers s ON s.router_id = $1 AND s.deleted_at IS NULL
                      AND s.service = m.service AND s.username = m.username
    ORDER BY s.id
), upserted AS (
    INSERT INTO subscriber_wireless AS w (subscriber_id, router_id, mac_address, source,
        interface, signal, signal_dbm, tx_ccq, rx_ccq, tx_rate, rx_rate, uptime,
        last_activity, associated, last_seen_at)
    SELECT subscriber_id, $1, mac_address, source, interface, signal, signal_dbm, tx_ccq,
           rx_ccq, tx_rate, rx_rate, uptime, last_activity, true, now()
    FROM seen
    ON CONFLICT (subscriber_id) DO UPDATE SET router_id = EXCLUDED.router_id,
        mac_address = EXCLUDED.mac_address, source = EXCLUDED.source,
        interface = EXCLUDED.interface, signal = EXCLUDED.signal,
        signal_dbm = EXCLUDED.signal_dbm, tx_ccq = EXCLUDED.tx_ccq, rx_ccq = EXCLUDED.rx_ccq,
        tx_rate = EXCLUDED.tx_rate, rx_rate = EXCLUDED.rx_rate, uptime = EXCLUDED.uptime,
        last_activity = EXCLUDED.last_activity, associated = true, last_seen_at = now()
    RETURNING subscriber_id
)
UPDATE subscriber_wireless SET associated = false
WHERE router_id = $1 AND associated
  AND subscriber_id NOT IN (SELECT subscriber_id FROM upserted)
"""


async def record(db: Executor, router_id: int, matched: Sequence[tuple[str, str, Station]]) -> None:
    """Store this poll's readings of the router's subscribers, in one statement; those of
    its subscribers no longer in a registration table stay, no longer associated."""
    stations = [m[2] for m in matched]
    await db.execute(
        RECORD,
        router_id,
        [m[0] for m in matched],
        [m[1] for m in matched],
        [s.mac_address for s in stations],
        [s.source for s in stations],
        [s.interface for s in stations],
        [s.signal for s in stations],
        [s.signal_dbm for s in stations],
        [s.tx_ccq for s in stations],
        [s.rx_ccq for s in stations],
        [s.tx_rate for s in stations],
        [s.rx_rate for s in stations],
        [s.uptime for s in stations],
        [s.last_activity for s in stations],
    )


async def poll_router(
    db: asyncpg.Pool,
    ros: RouterSession,
    router_id: int,
    ppp: Sequence[Mapping[str, str]],
    hotspot: Sequence[Mapping[str, str]],
) -> None:
    """Read the registration tables and record what matches the sessions just read.

    Called by the router facts poll with its open session; never raises (but
    cancellation): a router that cannot be read, or a database that refuses the write,
    is logged and leaves the stored readings as they were.
    """
    try:
        stations = await read_stations(ros)
    except RouterError as exc:
        log.warning("wireless_read_failed", router_id=router_id, error=str(exc))
        return
    matched = match(ppp, hotspot, stations)
    try:
        await record(db, router_id, matched)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        log.warning("wireless_record_failed", router_id=router_id, error=str(exc))
        return
    if stations:
        log.debug(
            "wireless_read", router_id=router_id, stations=len(stations), matched=len(matched)
        )


# -- the admin API's view ----------------------------------------------------------------

WIRELESS_OF = """
SELECT subscriber_id, source, mac_address, interface, signal, signal_dbm, tx_ccq, rx_ccq,
       tx_rate, rx_rate, uptime, last_activity, associated, last_seen_at
FROM subscriber_wireless WHERE subscriber_id = ANY($1::bigint[])
"""


async def attach(db: Executor, subscribers: Sequence[dict[str, Any]]) -> None:
    """Give each subscriber dict (with `id`) its `wireless` object, or None when no
    registration table has shown its device, in one query."""
    rows = await db.fetch(WIRELESS_OF, [s["id"] for s in subscribers])
    by_id = {r["subscriber_id"]: r for r in rows}
    for sub in subscribers:
        row = by_id.get(sub["id"])
        sub["wireless"] = None if row is None else {
            k: v for k, v in dict(row).items() if k != "subscriber_id"
        }
