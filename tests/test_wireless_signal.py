"""Signal strength: the RouterOS simulator's registration tables (v6 legacy wireless, v7
wifi), read by the router facts poll with the real librouteros client, matched to
subscribers by their session's MAC, stored in PostgreSQL and shown by the admin API."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import librouteros
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from librouteros.exceptions import MultiTrapError

from imsys.http import api_network
from imsys.http.server import build_app
from imsys.routeros.target import RouterTarget
from imsys.sim.routeros import RouterOSSimulator
from imsys.sync import wireless
from imsys.sync.handlers import router_target
from imsys.sync.reconcile import all_router_facts, router_facts
from imsys.sync.repo import load_router
from tests.browser import Browser
from tests.sync_support import Stack
from tests.test_dashboard import TOKEN as DASH_TOKEN
from tests.test_dashboard import make_app, needs_chromium

TOKEN = "test-token"
Client = TestClient[web.Request, web.Application]
LEGACY = "/interface/wireless/registration-table"
WIFI = "/interface/wifi/registration-table"
CPE = "4C:5E:0C:11:22:33"
PHONE = "A4:83:E7:44:55:66"


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The admin app with the network routes, served for real on 127.0.0.1."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=headers) as client:
        yield client


async def subscriber_json(api: Client, subscriber_id: int) -> dict[str, Any]:
    resp = await api.get(f"/api/subscribers/{subscriber_id}")
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def facts(stack: Stack) -> None:
    await router_facts(stack.sync, await load_router(stack.db, stack.router_id))


async def print_rows(sim: RouterOSSimulator, menu: str) -> list[dict[str, Any]]:
    client = await librouteros.async_connect(
        "127.0.0.1", "admin", "pw", port=sim.port, timeout=2.0
    )
    try:
        return [row async for row in client.rawCmd(f"{menu}/print")]
    finally:
        with contextlib.suppress(Exception):
            await client.close()


@pytest.fixture
async def sims() -> AsyncIterator[dict[str, RouterOSSimulator]]:
    """A RouterOS 6 router (legacy wireless bundled), a 7.19 one with the wifi-qcom driver
    and a 7.19 one without radio packages."""
    made = {
        "v6": RouterOSSimulator(password="pw", version="6.49.17"),
        "v7wifi": RouterOSSimulator(password="pw", packages=["wifi-qcom"]),
        "v7wired": RouterOSSimulator(password="pw"),
    }
    for sim in made.values():
        await sim.start()
    yield made
    for sim in made.values():
        await sim.stop()


# -- the simulator's menus -------------------------------------------------------------


async def test_v6_legacy_registration_table_prints_documented_fields(
    sims: dict[str, RouterOSSimulator],
) -> None:
    """RouterOS 6 has /interface/wireless: a station prints with signal-strength like
    -65dBm@6Mbps, tx-ccq/rx-ccq, rates, uptime and last-activity; no /interface/wifi."""
    sim = sims["v6"]
    sim.associate_wireless(CPE.lower(), signal=-71, tx_ccq=87, last_activity="4s750ms")
    (row,) = await print_rows(sim, LEGACY)
    assert row["mac-address"] == CPE
    assert row["signal-strength"] == "-71dBm@6Mbps"
    assert row["tx-ccq"] == 87  # librouteros converts digit strings
    assert row["rx-ccq"] == 88
    assert row["tx-rate"] == "144.4Mbps-20MHz/2S/SGI"
    assert row["last-activity"] == "4s750ms"
    assert row["uptime"] == "0s"
    assert row["ap"] is False
    assert "signal" not in row
    with pytest.raises(MultiTrapError) as caught:
        await print_rows(sim, WIFI)
    assert [t.message for t in caught.value.traps] == [
        "no such command or directory (wifi)",
        "no such command prefix",
    ]


async def test_v7_wifi_registration_table_prints_signal_in_dbm(
    sims: dict[str, RouterOSSimulator],
) -> None:
    """RouterOS 7.13+ with a wifi driver has /interface/wifi (signal=-45, no CCQ) and, without
    the `wireless` package, no /interface/wireless."""
    sim = sims["v7wifi"]
    sim.associate_wireless(PHONE, signal=-45, tx_rate="1.2Gbps-80MHz/2S")
    (row,) = await print_rows(sim, WIFI)
    assert row["mac-address"] == PHONE
    assert row["signal"] == -45
    assert row["authorized"] is True
    assert row["tx-rate"] == "1.2Gbps-80MHz/2S"
    assert "tx-ccq" not in row
    with pytest.raises(MultiTrapError) as caught:
        await print_rows(sim, LEGACY)
    assert caught.value.traps[0].message == "no such command or directory (wireless)"
    assert sim.disassociate_wireless(PHONE) == 1
    assert await print_rows(sim, WIFI) == []


async def test_router_without_radio_packages_has_neither_menu(
    sims: dict[str, RouterOSSimulator],
) -> None:
    """A 7.x router without radio packages answers both prints with the unknown-path traps,
    and refuses to associate a station (the test would model a radio it has not got)."""
    sim = sims["v7wired"]
    for menu in (LEGACY, WIFI):
        with pytest.raises(MultiTrapError):
            await print_rows(sim, menu)
    with pytest.raises(ValueError, match="no /interface"):
        sim.associate_wireless(CPE, menu="wifi")


def test_packages_must_suit_the_version() -> None:
    """The wifi drivers need RouterOS 7.13 or later; unknown package names are refused."""
    with pytest.raises(ValueError, match=r"7\.13"):
        RouterOSSimulator(version="6.49.17", packages=["wifi-qcom"])
    with pytest.raises(ValueError, match=r"7\.13"):
        RouterOSSimulator(version="7.12.1", packages=["wifi-qcom-ac"])
    with pytest.raises(ValueError, match="unknown"):
        RouterOSSimulator(packages=["wireles"])
    assert RouterOSSimulator(version="7.12.1", packages=["wireless"]).packages == {"wireless"}


def test_signal_and_mac_parsing() -> None:
    """Signal in dBm from each printed form; MACs normalised; an IP caller-id is no MAC."""
    assert wireless.parse_signal("-65dBm@6Mbps") == -65
    assert wireless.parse_signal("-51@1Mbps") == -51  # v6.4x API form
    assert wireless.parse_signal("-45") == -45
    assert wireless.parse_signal("") is None
    assert wireless.parse_signal("strong") is None
    assert wireless.parse_percent("96%") == 96
    assert wireless.normalize_mac("4c-5e-0c-11-22-33") == CPE
    assert wireless.normalize_mac("10.0.0.7") is None


# -- the facts poll, the database and the API ----------------------------------------


@pytest.mark.parametrize("ros_version", ["6.49.17"])
async def test_v6_pppoe_subscriber_gets_signal_by_caller_id(stack: Stack, api: Client) -> None:
    """On RouterOS 6, the station whose MAC is a PPPoE session's caller-id gives that
    subscriber signal, CCQ, rates and last seen in GET and list; another online subscriber
    whose device is not a station has wireless null."""
    alice = await stack.add_subscriber("alice")
    bob = await stack.add_subscriber("bob")
    await stack.settle()
    stack.sim.connect_session("alice", caller_id=CPE)
    stack.sim.connect_session("bob")  # dials from a wired device
    stack.sim.associate_wireless(CPE, signal=-71, tx_ccq=87, rx_ccq=79, last_activity="1s20ms")
    stack.sim.associate_wireless(PHONE, signal=-50)  # a station of nobody's session
    await facts(stack)

    body = await subscriber_json(api, alice)
    link = body["wireless"]
    assert link["source"] == "wireless"
    assert link["mac_address"] == CPE
    assert link["signal"] == "-71dBm@6Mbps"
    assert link["signal_dbm"] == -71
    assert (link["tx_ccq"], link["rx_ccq"]) == (87, 79)
    assert link["tx_rate"] == "144.4Mbps-20MHz/2S/SGI"
    assert link["rx_rate"] == "130Mbps-20MHz/2S"
    assert link["last_activity"] == "1s20ms"
    assert link["interface"] == "wlan1"
    assert link["associated"] is True
    assert link["last_seen_at"]
    assert (await subscriber_json(api, bob))["wireless"] is None

    resp = await api.get(f"/api/subscribers?router_id={stack.router_id}")
    listed = {s["id"]: s for s in (await resp.json())["subscribers"]}
    assert listed[alice]["wireless"]["signal_dbm"] == -71
    assert listed[bob]["wireless"] is None


async def test_v7_wifi_hotspot_subscriber_matched_by_mac(stack: Stack, api: Client) -> None:
    """On RouterOS 7 with the wifi package, a hotspot session's mac-address finds its
    station in /interface/wifi: signal in dBm, rates, no CCQ."""
    stack.sim.packages = frozenset({"wifi-qcom"})
    carol = await stack.add_subscriber("carol", service="hotspot")
    await stack.settle()
    stack.sim.login_hotspot("carol", mac_address=PHONE)
    stack.sim.associate_wireless(PHONE, signal=-58, tx_rate="866.7Mbps-80MHz/2S")
    await facts(stack)
    link = (await subscriber_json(api, carol))["wireless"]
    assert link["source"] == "wifi"
    assert link["signal"] == "-58"
    assert link["signal_dbm"] == -58
    assert link["tx_ccq"] is None
    assert link["tx_rate"] == "866.7Mbps-80MHz/2S"
    assert link["interface"] == "wifi1"


async def test_station_that_leaves_keeps_last_reading(stack: Stack, api: Client) -> None:
    """A station gone from the table keeps its last signal, associated false and last seen
    unchanged; when it comes back the reading is fresh again."""
    stack.sim.packages = frozenset({"wireless"})
    alice = await stack.add_subscriber("alice")
    await stack.settle()
    stack.sim.connect_session("alice", caller_id=CPE)
    stack.sim.associate_wireless(CPE, signal=-70)
    await facts(stack)
    first = (await subscriber_json(api, alice))["wireless"]

    assert stack.sim.disassociate_wireless(CPE) == 1
    await facts(stack)
    gone = (await subscriber_json(api, alice))["wireless"]
    assert gone["associated"] is False
    assert gone["signal_dbm"] == -70
    assert gone["last_seen_at"] == first["last_seen_at"]

    stack.sim.associate_wireless(CPE, signal=-62)
    await facts(stack)
    back = (await subscriber_json(api, alice))["wireless"]
    assert back["associated"] is True
    assert back["signal_dbm"] == -62
    assert back["last_seen_at"] > first["last_seen_at"]


async def test_router_without_wireless_is_polled_as_usual(stack: Stack, api: Client) -> None:
    """A router with no radio menu (7.x, no packages): the facts poll still records the
    router and the session, and the subscriber's wireless is null."""
    alice = await stack.add_subscriber("alice")
    await stack.settle()
    stack.sim.connect_session("alice", caller_id=CPE)
    await facts(stack)
    body = await subscriber_json(api, alice)
    assert body["online"] is True
    assert body["wireless"] is None
    router = await load_router(stack.db, stack.router_id)
    assert router["online"] is True
    asked = {c.command for c in stack.sim.commands}
    assert {f"{LEGACY}/print", f"{WIFI}/print"} <= asked


async def test_failed_read_changes_nothing_and_does_not_raise(stack: Stack) -> None:
    """A router lost in the middle of the wireless read: poll_router logs and returns,
    the stored reading stays as it was."""
    stack.sim.packages = frozenset({"wireless"})
    alice = await stack.add_subscriber("alice")
    await stack.settle()
    stack.sim.connect_session("alice", caller_id=CPE)
    stack.sim.associate_wireless(CPE, signal=-66)
    await facts(stack)
    router = await load_router(stack.db, stack.router_id)
    target: RouterTarget = router_target(stack.sync, router)
    async with stack.sync.routers.session(target) as ros:
        ppp = await ros.active_ppp(None)
        await stack.sim.go_down()
        await wireless.poll_router(stack.db, ros, stack.router_id, ppp, [])
    row = await stack.db.fetchrow(
        "SELECT signal_dbm, associated FROM subscriber_wireless WHERE subscriber_id = $1", alice
    )
    assert row is not None
    assert (row["signal_dbm"], row["associated"]) == (-66, True)


# -- the dashboard, in a real headless Chromium ------------------------------------------

SIGNAL_CELLS = """JSON.stringify([...document.querySelectorAll('#subscribers tbody tr')]
 .map((r) => {
  const cell = r.cells[[...document.querySelectorAll('#subscribers thead th')]
    .findIndex((th) => th.textContent === 'signal')];
  return [r.cells[1].textContent, cell.textContent, cell.title];
}))"""


@needs_chromium
async def test_dashboard_shows_signal_in_chromium(isolated_stack: Stack) -> None:
    """The subscribers table has a signal column: dBm and CCQ for the subscriber whose CPE
    is a station (MAC and rates on hover), a dash for the one without."""
    stack = isolated_stack  # a database of its own: only these rows on the page
    stack.sim.packages = frozenset({"wireless"})
    await stack.add_subscriber("alice")
    await stack.add_subscriber("bob")
    await stack.settle()
    stack.sim.connect_session("alice", caller_id=CPE)
    stack.sim.connect_session("bob")
    stack.sim.associate_wireless(CPE, signal=-71, tx_ccq=87)
    await all_router_facts(stack.sync)
    async with (
        TestServer(make_app(stack), host="127.0.0.1") as server,
        Browser(width=1400, height=1000) as browser,
    ):
        await browser.goto(f"http://127.0.0.1:{server.port}/#token={DASH_TOKEN}")
        await browser.wait_for("document.querySelectorAll('#subscribers tbody tr').length === 2")
        cells = {name: (text, title) for name, text, title in json.loads(
            await browser.evaluate(SIGNAL_CELLS)
        )}
        exceptions = browser.exceptions()
    assert cells["alice"][0] == "-71 dBm · CCQ 87%"
    assert CPE in cells["alice"][1]
    assert "144.4Mbps-20MHz/2S/SGI" in cells["alice"][1]
    assert cells["bob"][0] == "\u2013"  # an en dash: no reading
    assert exceptions == []
