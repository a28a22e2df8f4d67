"""API-SSL as MikroTik routers do it: a pinned SHA-256, a CA without host name check, or
verification explicitly off; the real librouteros client against the simulator's TLS."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from imsys.http import api_network, api_sync
from imsys.http.server import build_app
from imsys.routeros import RouterPool, RouterTarget, RouterTLSError, RouterUnavailable
from imsys.routeros.tls import normalize_fingerprint
from imsys.sim.routeros import RouterOSSimulator
from imsys.sim.routeros_tls import SelfSigned, no_certificate, self_signed
from tests.sync_support import ROUTER_PASSWORD, Stack

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

USER = "admin"
PASSWORD = "Tls-Router-Secret-77"
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[web.Request, web.Application]


@pytest.fixture(scope="module")
def cert() -> SelfSigned:
    return self_signed("127.0.0.1")


@pytest.fixture
async def sim(cert: SelfSigned) -> AsyncIterator[RouterOSSimulator]:
    simulator = RouterOSSimulator(username=USER, password=PASSWORD, ssl_context=cert.context)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def pool() -> AsyncIterator[RouterPool]:
    routers = RouterPool()
    yield routers
    await routers.close()


def target(sim: RouterOSSimulator, **overrides: Any) -> RouterTarget:
    fields: dict[str, Any] = {
        "router_id": 31,
        "host": "127.0.0.1",
        "port": sim.port,
        "username": USER,
        "password": PASSWORD,
        "use_tls": True,
        "timeout": 3.0,
    }
    fields.update(overrides)
    return RouterTarget(**fields)


def logins(sim: RouterOSSimulator) -> int:
    return sum(1 for record in sim.commands if record.command == "/login")


def leaked(logs: list[dict[str, Any]]) -> bool:
    return any(PASSWORD in repr(entry) for entry in logs)


async def test_pinned_fingerprint_connects(
    sim: RouterOSSimulator, pool: RouterPool, cert: SelfSigned, caplog: pytest.LogCaptureFixture
) -> None:
    """A self-signed certificate addressed by IP is trusted by its pinned SHA-256; the
    password shows in no log (structlog or stdlib, librouteros's debug log included)."""
    colons = ":".join(cert.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    with caplog.at_level(logging.DEBUG), capture_logs() as logs:
        async with pool.session(target(sim, tls_fingerprint=colons)) as ros:
            assert (await ros.resource())["board-name"] == "RB5009UG+S+"
    assert logins(sim) == 1
    assert PASSWORD not in caplog.text
    assert not leaked(logs)


async def test_wrong_pin_is_refused_before_the_password_is_sent(
    sim: RouterOSSimulator, pool: RouterPool, cert: SelfSigned
) -> None:
    """Another certificate than the pinned one: RouterTLSError naming both, no login sent."""
    wrong = "ab" * 32
    with capture_logs() as logs, pytest.raises(RouterTLSError) as caught:
        async with pool.session(target(sim, tls_fingerprint=wrong)) as ros:
            await ros.resource()
    message = str(caught.value)
    assert wrong in message
    assert cert.fingerprint in message
    assert "router 31" in message
    assert PASSWORD not in message
    assert not leaked(logs)
    assert logins(sim) == 0
    assert any(entry["event"] == "router_tls_refused" for entry in logs)


async def test_ca_mode_trusts_the_ca_without_a_host_name_check(pool: RouterPool) -> None:
    """tls_ca: a certificate made for another name is still trusted when it chains to it."""
    named = self_signed("router.example")
    sim = RouterOSSimulator(username=USER, password=PASSWORD, ssl_context=named.context)
    await sim.start()
    try:
        async with pool.session(target(sim, tls_ca=named.pem)) as ros:
            assert (await ros.resource())["board-name"] == "RB5009UG+S+"
    finally:
        await sim.stop()


async def test_ca_mode_refuses_a_certificate_of_another_ca(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """tls_ca that did not sign the router's certificate: refused as untrusted, no login."""
    other = self_signed("127.0.0.1", common_name="other-ca")
    with capture_logs() as logs, pytest.raises(RouterTLSError, match="not trusted") as caught:
        async with pool.session(target(sim, tls_ca=other.pem)) as ros:
            await ros.resource()
    assert PASSWORD not in str(caught.value)
    assert not leaked(logs)
    assert logins(sim) == 0


async def test_unusable_ca_in_the_settings_is_a_clear_error(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A tls_ca that is no certificate (e.g. written by hand in SQL): RouterTLSError, no login."""
    with pytest.raises(RouterTLSError, match="tls_ca is not a usable PEM certificate"):
        async with pool.session(target(sim, tls_ca="garbage")) as ros:
            await ros.resource()
    assert logins(sim) == 0


async def test_system_cas_refuse_a_self_signed_certificate(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """use_tls with no TLS setting checks the system CAs: a router's own certificate fails."""
    with pytest.raises(RouterTLSError, match="not trusted"):
        async with pool.session(target(sim)) as ros:
            await ros.resource()
    assert logins(sim) == 0


async def test_verification_off_connects_and_warns_at_every_connect(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """tls_verify false accepts any certificate and logs a warning each time it connects."""
    unverified = target(sim, tls_verify=False)
    with capture_logs() as logs:
        async with pool.session(unverified) as ros:
            await ros.resource()
        async with pool.session(unverified) as first, pool.session(unverified) as second:
            await asyncio.gather(first.resource(), second.resource())
    warnings = [e for e in logs if e["event"] == "router_tls_unverified"]
    assert len(warnings) == sim.connections == 2
    assert all(e["log_level"] == "warning" for e in warnings)
    assert not leaked(logs)


async def test_router_without_certificate_gets_the_remedy(pool: RouterPool) -> None:
    """api-ssl with no certificate (anonymous DH only): an error that says what to do."""
    sim = RouterOSSimulator(username=USER, password=PASSWORD, ssl_context=no_certificate())
    await sim.start()
    try:
        with capture_logs() as logs, pytest.raises(RouterTLSError) as caught:
            async with pool.session(target(sim, tls_fingerprint="cd" * 32)) as ros:
                await ros.resource()
    finally:
        await sim.stop()
    message = str(caught.value)
    assert "no certificate" in message
    assert "/ip service set api-ssl certificate=" in message
    assert PASSWORD not in message
    assert not leaked(logs)


async def test_plain_api_port_is_not_mistaken_for_a_missing_certificate(pool: RouterPool) -> None:
    """TLS against a plain API port is RouterUnavailable (retryable), not the no-cert remedy."""
    sim = RouterOSSimulator(username=USER, password=PASSWORD)
    await sim.start()
    try:
        # The simulator reads the ClientHello as API words: it hangs up or waits for more.
        with pytest.raises(RouterUnavailable, match=r"TLS handshake failed|timed out") as caught:
            async with pool.session(target(sim, tls_fingerprint="cd" * 32, timeout=1.0)) as ros:
                await ros.resource()
    finally:
        await sim.stop()
    assert "certificate=" not in str(caught.value)


def test_fingerprint_forms_are_normalized_and_checked() -> None:
    """A pin may carry colons and upper case; anything but 64 hex digits is refused."""
    assert normalize_fingerprint("AB:" * 31 + "AB") == "ab" * 32
    with pytest.raises(ValueError, match="64 hex digits"):
        normalize_fingerprint("ab" * 31)
    with pytest.raises(ValueError, match="64 hex digits"):
        RouterTarget(1, "10.0.0.1", 8729, "admin", "pw", use_tls=True, tls_fingerprint="zz" * 32)


async def test_sim_cli_with_tls_prints_the_pin_that_connects(pool: RouterPool) -> None:
    """`python -m imsys sim routeros --tls` serves API-SSL and prints its SHA-256 to pin."""
    probe = RouterOSSimulator()
    await probe.start()
    port = probe.port
    await probe.stop()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imsys", "sim", "routeros", "--tls", "--host", "127.0.0.1",
        "--port", str(port), "--username", USER, "--password", PASSWORD,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            line = (await process.stdout.readline()).decode()
        word, pin = line.split()
        assert word == "tls_fingerprint"
        routed = RouterTarget(
            32, "127.0.0.1", port, USER, PASSWORD, use_tls=True, tls_fingerprint=pin, timeout=3
        )
        async with asyncio.timeout(20):
            while True:
                try:
                    async with pool.session(routed) as ros:
                        resource = await ros.resource()
                    break
                except RouterUnavailable:
                    await asyncio.sleep(0.1)  # not listening yet
        assert resource["board-name"] == "RB5009UG+S+"
    finally:
        process.terminate()
        await process.wait()


# -- the router's TLS settings through the API and a sync -------------------------------


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The admin app with the network routes, served for real on 127.0.0.1."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    api_sync.add_routes(app, stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        yield client


def router_body(stack: Stack, name: str, **tls: Any) -> dict[str, Any]:
    return {
        "tenant_id": stack.tenant_id,
        "name": name,
        "host": "127.0.0.1",
        "port": 8729,
        "username": "admin",
        "password": PASSWORD,
        "use_tls": True,
        **tls,
    }


async def test_api_takes_and_returns_the_tls_settings(
    api: Client, stack: Stack, cert: SelfSigned
) -> None:
    """POST/GET /api/routers carry tls_fingerprint (normalized), tls_ca, tls_verify; no password."""
    colons = ":".join(cert.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    resp = await api.post("/api/routers", json=router_body(stack, "pinned", tls_fingerprint=colons))
    raw = await resp.text()
    assert resp.status == 201, raw
    assert PASSWORD not in raw
    body = orjson.loads(raw)
    assert body["tls_fingerprint"] == cert.fingerprint
    assert body["tls_ca"] is None
    assert body["tls_verify"] is True
    resp = await api.post("/api/routers", json=router_body(stack, "by-ca", tls_ca=cert.pem))
    by_ca = orjson.loads(await resp.text())
    assert resp.status == 201, by_ca
    assert by_ca["tls_ca"] == cert.pem.strip()
    got = await api.get(f"/api/routers/{body['id']}")
    read = orjson.loads(await got.text())
    assert read["tls_fingerprint"] == cert.fingerprint
    assert "password" not in read
    listed = await api.get(f"/api/routers?tenant_id={stack.tenant_id}")
    text = await listed.text()
    assert PASSWORD not in text
    by_id = {r["id"]: r for r in orjson.loads(text)["routers"]}
    assert by_id[by_ca["id"]]["tls_ca"] == cert.pem.strip()


@pytest.mark.parametrize(
    ("tls", "needle"),
    [
        ({"tls_fingerprint": "ab" * 31}, "64 hex digits"),
        ({"tls_ca": "not a certificate"}, "tls_ca is not a PEM certificate"),
        ({"tls_verify": False, "tls_fingerprint": "ab" * 32}, "tls_verify false excludes"),
    ],
)
async def test_api_refuses_unusable_tls_settings(
    api: Client, stack: Stack, tls: dict[str, Any], needle: str
) -> None:
    """A malformed pin, a CA that is no PEM, or verify off with a pin: 400 saying which."""
    resp = await api.post("/api/routers", json=router_body(stack, "bad-tls", **tls))
    text = await resp.text()
    assert resp.status == 400, text
    assert needle in orjson.loads(text)["error"]
    assert PASSWORD not in text


async def test_sync_reaches_a_router_over_tls_by_its_pin(stack: Stack, cert: SelfSigned) -> None:
    """A router row with use_tls and tls_fingerprint: a subscriber syncs over API-SSL."""
    sim = RouterOSSimulator(username="admin", password=ROUTER_PASSWORD, ssl_context=cert.context)
    for profile in ("basic", "premium"):
        sim.add_item("/ppp/profile", name=profile)
        sim.add_item("/ip/hotspot/user/profile", name=profile)
    await sim.start()
    try:
        await stack.db.execute(
            "UPDATE routers SET port = $2, use_tls = true, tls_fingerprint = $3 WHERE id = $1",
            stack.router_id,
            sim.port,
            cert.fingerprint,
        )
        with capture_logs() as logs:
            subscriber = await stack.add_subscriber("tls-alice")
            await stack.settle()
        assert (await stack.subscriber(subscriber))["sync_status"] == "synced"
        assert [e["name"] for e in sim.items("/ppp/secret")] == ["tls-alice"]
        assert stack.sim.items("/ppp/secret") == []
        assert not any(ROUTER_PASSWORD in repr(entry) for entry in logs)
    finally:
        await sim.stop()
