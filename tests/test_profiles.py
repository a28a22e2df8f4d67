"""Packages as router profiles, black-box: the admin API over the whole sync stack
(real Redis, PostgreSQL, engine, outbox relay, librouteros) against a RouterOS simulator
that starts empty (no profile but the built-in ``default``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imsys.http import api_network, api_sync
from imsys.http.server import build_app
from imsys.network.models import check_rate_limit
from imsys.sim.routeros import RouterOSSimulator
from imsys.sync.service import queue_reconciliation
from tests.sync_support import ROUTER_PASSWORD, Stack

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PPP_PROFILE = "/ppp/profile"
HS_PROFILE = "/ip/hotspot/user/profile"
TAG = "imsys:profile"
Client = TestClient[web.Request, web.Application]


@dataclass
class Net:
    """A tenant with one router on an empty simulator, made through the API."""

    api: Client
    stack: Stack
    sim: RouterOSSimulator
    tenant_id: int
    router_id: int

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.api.post(path, json=body)
        assert resp.status == 201, await resp.text()
        out: dict[str, Any] = await resp.json()
        return out

    async def package(self, name: str, rate: str | None = "10M/10M") -> int:
        body = {"tenant_id": self.tenant_id, "name": name, "profile": name, "price": 10}
        body |= {"period_days": 30, "rate_limit": rate}
        return int((await self.post("/api/packages", body))["id"])

    async def subscriber(self, username: str, package_id: int, service: str = "pppoe") -> int:
        body = {
            "tenant_id": self.tenant_id,
            "router_id": self.router_id,
            "package_id": package_id,
            "username": username,
            "password": f"pw-{username}",
            "service": service,
        }
        return int((await self.post("/api/subscribers", body))["id"])

    def profile(self, name: str, menu: str = PPP_PROFILE) -> dict[str, str] | None:
        found = self.sim.find(menu, name=name)
        return found[0] if found else None


@pytest.fixture
async def net(stack: Stack) -> AsyncIterator[Net]:
    sim = RouterOSSimulator(username="admin", password=ROUTER_PASSWORD)
    await sim.start()
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    api_sync.add_routes(app, stack.deps)
    try:
        async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as api:
            resp = await api.post("/api/tenants", json={"name": f"{stack.prefix}-isp"})
            tenant = await resp.json()
            router_body = {
                "tenant_id": tenant["id"],
                "name": "edge",
                "host": "127.0.0.1",
                "port": sim.port,
                "username": "admin",
                "password": ROUTER_PASSWORD,
            }
            resp = await api.post("/api/routers", json=router_body)
            assert resp.status == 201, await resp.text()
            router = await resp.json()
            yield Net(api, stack, sim, tenant["id"], router["id"])
    finally:
        await sim.stop()


async def statuses(net: Net) -> list[str]:
    rows = await net.stack.db.fetch(
        "SELECT sync_status FROM subscribers WHERE router_id = $1 ORDER BY id", net.router_id
    )
    return [r["sync_status"] for r in rows]


async def test_thirty_subscribers_on_an_empty_router_all_sync_with_the_package_profile(
    net: Net,
) -> None:
    """Package and 30 subscribers through the API on an empty router: all synced, the
    profile made (tagged, the package's rate) in both profile menus, no dead letter."""
    pkg = await net.package("home10", "10M/10M")
    for i in range(30):
        await net.subscriber(f"home-{i}", pkg, "hotspot" if i % 10 == 0 else "pppoe")
    await net.stack.settle()
    assert await statuses(net) == ["synced"] * 30
    for menu in (PPP_PROFILE, HS_PROFILE):
        profile = net.profile("home10", menu)
        assert profile is not None
        assert (profile["rate-limit"], profile["comment"]) == ("10M/10M", TAG)
    assert len(net.sim.items("/ppp/secret")) == 27
    assert len(net.sim.items("/ip/hotspot/user")) == 3
    assert await net.stack.deps.redis.xlen(net.stack.engine.keys.dead) == 0


async def test_patch_rate_reaches_the_router_and_apply_now_ends_sessions(net: Net) -> None:
    """PATCH rate_limit re-sets the profile's rate on the router and leaves sessions up;
    with apply_now the package's live sessions end (and only that package's)."""
    pkg = await net.package("home20", "20M/20M")
    other = await net.package("other", "5M/5M")
    for i in range(5):
        await net.subscriber(f"h20-{i}", pkg)
    await net.subscriber("o-1", other)
    await net.stack.settle()
    for name in [*(f"h20-{i}" for i in range(5)), "o-1"]:
        net.sim.connect_session(name)

    resp = await net.api.patch(f"/api/packages/{pkg}", json={"rate_limit": "25M/25M", "price": 12})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["rate_limit"] == "25M/25M"
    await net.stack.settle()
    assert net.profile("home20") is not None
    assert net.profile("home20")["rate-limit"] == "25M/25M"  # type: ignore[index]
    assert net.profile("home20", HS_PROFILE)["rate-limit"] == "25M/25M"  # type: ignore[index]
    assert len(net.sim.items("/ppp/active")) == 6

    resp = await net.api.patch(
        f"/api/packages/{pkg}",
        json={"rate_limit": "30M/30M 40M/40M 24M/24M 10/10 8", "apply_now": True},
    )
    assert resp.status == 200, await resp.text()
    await net.stack.settle()
    assert net.profile("home20")["rate-limit"] == "30M/30M 40M/40M 24M/24M 10/10 8"  # type: ignore[index]
    assert [a["name"] for a in net.sim.items("/ppp/active")] == ["o-1"]
    assert await statuses(net) == ["synced"] * 6


async def test_delete_is_refused_while_used_then_removes_the_profile(net: Net) -> None:
    """DELETE of a package in use is 409 naming the users; once unused it answers 200,
    leaves the package list, and its tagged profile leaves the router."""
    pkg = await net.package("gone", "1M/1M")
    sid = await net.subscriber("leaver", pkg)
    await net.stack.settle()
    assert net.profile("gone") is not None

    resp = await net.api.delete(f"/api/packages/{pkg}")
    assert resp.status == 409, await resp.text()
    assert "used by 1 subscriber" in (await resp.json())["error"]

    resp = await net.api.delete(f"/api/subscribers/{sid}")
    assert resp.status == 200, await resp.text()
    await net.stack.settle()
    resp = await net.api.delete(f"/api/packages/{pkg}")
    assert resp.status == 200, await resp.text()
    await net.stack.settle()
    assert net.profile("gone") is None
    assert net.profile("gone", HS_PROFILE) is None
    listed = await (await net.api.get(f"/api/packages?tenant_id={net.tenant_id}")).json()
    assert pkg not in [p["id"] for p in listed["packages"]]
    assert net.profile("default") is not None


async def test_invalid_rate_limit_is_a_400_naming_the_format(net: Net) -> None:
    """A rate_limit not in RouterOS's format is refused, on create and on PATCH, with a
    400 that names the field and the format; nothing reaches the router."""
    body = {"tenant_id": net.tenant_id, "name": "bad", "profile": "bad", "price": 1}
    body |= {"period_days": 30, "rate_limit": "tenmegabits"}
    resp = await net.api.post("/api/packages", json=body)
    assert resp.status == 400
    message = (await resp.json())["error"]
    assert "rate_limit" in message
    assert "rx/tx [rx-burst/tx-burst" in message
    pkg = await net.package("good", "10M/10M")
    resp = await net.api.patch(f"/api/packages/{pkg}", json={"rate_limit": "10M"})
    assert resp.status == 400
    assert "k/M/G" in (await resp.json())["error"]
    await net.stack.settle()
    assert net.profile("bad") is None
    assert net.profile("good")["rate-limit"] == "10M/10M"  # type: ignore[index]


def test_rate_limit_format_accepts_routeros_forms_and_refuses_others() -> None:
    """The validator takes each optional part of RouterOS's rate-limit and nothing else."""
    for good in (
        "512k/1M",
        "1G/1G 2G/2G",
        "10M/10M 20M/20M 8M/8M 10/10 8 1M/1M",
        "1M/2M 2M/4M 1M/2M 16s/16s",
    ):
        assert check_rate_limit(good) == good
    for bad in ("10M", "10X/10M", "10M/10M 20M", "10M/10M 1M/1M 1M/1M 10/10 9", "ten/ten"):
        with pytest.raises(ValueError, match="RouterOS's format"):
            check_rate_limit(bad)


async def test_reconciliation_aligns_profiles_and_removes_only_unused_orphans(net: Net) -> None:
    """Reconciliation re-sets a drifted rate and re-adds a missing profile; a tagged
    profile no package wants goes unless a login still names it; untagged ones and the
    built-in default are never touched."""
    pkg = await net.package("fast", "50M/50M")
    await net.subscriber("f-1", pkg)
    await net.stack.settle()
    drifted = net.profile("fast")
    assert drifted is not None
    net.sim.state.execute(PPP_PROFILE, "set", {".id": drifted[".id"], "rate-limit": "1k/1k"}, [])
    hs = net.profile("fast", HS_PROFILE)
    assert hs is not None
    net.sim.state.execute(HS_PROFILE, "remove", {".id": hs[".id"]}, [])
    net.sim.add_item(PPP_PROFILE, name="stale", comment=TAG)
    net.sim.add_item(PPP_PROFILE, name="stale-used", comment=TAG)
    net.sim.add_item("/ppp/secret", name="hand", password="x", profile="stale-used")
    net.sim.add_item(PPP_PROFILE, name="by-hand", rate_limit="3M/3M")

    await queue_reconciliation(net.stack.engine.producer, net.router_id)
    await net.stack.settle()
    assert net.profile("fast")["rate-limit"] == "50M/50M"  # type: ignore[index]
    assert net.profile("fast", HS_PROFILE)["rate-limit"] == "50M/50M"  # type: ignore[index]
    assert net.profile("stale") is None
    assert net.profile("stale-used") is not None
    assert net.profile("by-hand")["rate-limit"] == "3M/3M"  # type: ignore[index]
    assert net.profile("default") is not None
