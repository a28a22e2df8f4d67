"""The dashboard opened with a tenant's token, in a real headless Chromium, against the
service's own admin app (`imsys.app.build_http`) and the real stack."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from aiohttp.test_utils import TestServer

from imsys import tokens
from imsys.app import build_http
from imsys.network import models, service
from imsys.sync.service import subscriber_changed
from tests.browser import Browser, available
from tests.sync_support import ROUTER_PASSWORD, Stack

needs_chromium = pytest.mark.skipif(
    not available(), reason="Debian's chromium is not installed (make test runs scripts/browser.sh)"
)

SUMMARY = """JSON.stringify({
  scope: document.getElementById('scope').textContent,
  subscribers: [...document.querySelectorAll('#subscribers tbody tr')].map((r) => r.textContent),
  routers: [...document.querySelectorAll('#routers tbody tr')].map((r) => r.textContent),
  streamsHidden: document.getElementById('queues').hidden,
  deadHidden: document.getElementById('dead-card').hidden,
  errors: [...document.querySelectorAll('[data-error]')].map((n) => n.textContent).join(''),
})"""


async def other_tenant(stack: Stack) -> None:
    """A second tenant with a router and a subscriber the page must never show."""
    db = stack.db
    tenant = await service.create_tenant(db, models.TenantIn(name="other-isp"))
    router = await service.create_router(
        db,
        models.RouterIn(
            tenant_id=tenant["id"],
            name="other-router",
            host="127.0.0.1",
            port=stack.sim.port,
            username="admin",
            password=ROUTER_PASSWORD,
        ),
    )
    package = await service.create_package(
        db,
        models.PackageIn(
            tenant_id=tenant["id"], name="p", profile="basic", price=Decimal(1), period_days=30
        ),
    )
    await service.create_subscriber(
        db,
        models.SubscriberIn(
            tenant_id=tenant["id"],
            router_id=router["id"],
            package_id=package["id"],
            username="other-sub",
            password="pw-other",
            service="pppoe",
        ),
        "test:other",
        on_change=subscriber_changed,
    )


@needs_chromium
async def test_dashboard_with_a_tenant_token_shows_that_tenant_only(
    isolated_stack: Stack,
) -> None:
    """With a tenant's token the header names the tenant, the routers and subscribers are
    that tenant's only, the service-wide cards (streams, dead letters) are hidden rather
    than shown as errors, and no script fails."""
    stack = isolated_stack
    await stack.add_subscriber("alice")
    await other_tenant(stack)
    made = await tokens.create(stack.db, tokens.TokenIn(tenant_id=stack.tenant_id, name="dash"))
    async with (
        TestServer(build_http(stack.deps), host="127.0.0.1") as server,
        Browser(width=1400, height=1000) as browser,
    ):
        await browser.goto(f"http://127.0.0.1:{server.port}/#token={made['token']}")
        await browser.wait_for(
            "document.querySelectorAll('#subscribers tbody tr').length === 1"
            " && document.getElementById('queues').hidden"
            " && document.getElementById('dead-card').hidden"
            " && document.getElementById('scope').textContent !== ''"
        )
        page = json.loads(await browser.evaluate(SUMMARY))
        exceptions = browser.exceptions()
    assert page["scope"] == f"tenant tenant-{stack.prefix}"
    [sub] = page["subscribers"]
    assert "alice" in sub
    [router] = page["routers"]
    assert "r0" in router
    assert "other" not in json.dumps(page)
    assert page["streamsHidden"] is True
    assert page["deadHidden"] is True
    assert page["errors"] == ""
    assert exceptions == []
