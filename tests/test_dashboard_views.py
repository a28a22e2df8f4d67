"""The dashboard's views over time: throughput chart, notification ledger, finished jobs and
a subscriber's detail, through their /api routes and in a real headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel, SecretStr
from redis.asyncio import Redis

from imsys.billing.handlers import current_period
from imsys.http import dashboard
from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from imsys.streams import activity
from imsys.streams.engine import Engine
from imsys.streams.job import Job, Registry
from imsys.streams.keys import Keys
from tests.browser import Browser, available, colour_spread, png_pixels
from tests.sync_support import _teardown, make_stack
from tests.test_billing import BillingStack
from tests.test_dashboard import TOKEN, make_app

AUTH = {"Authorization": f"Bearer {TOKEN}"}
AT_TOKEN = "at-hook-token"
Client = TestClient[web.Request, web.Application]

needs_chromium = pytest.mark.skipif(
    not available(), reason="Debian's chromium is not installed (make test runs scripts/browser.sh)"
)


@pytest.fixture
async def billing(
    settings: Settings, redis: Redis, prefix: str, isolated_database: str
) -> AsyncIterator[BillingStack]:
    """Sync and billing on a database of their own (exactly this test's rows on the page),
    SMS through the gateway simulator, Africa's Talking delivery reports on."""
    gateway = GatewaySimulator()
    await gateway.start()
    settings = settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": SecretStr(isolated_database)}),
            "sms": settings.sms.model_copy(
                update={
                    "url": f"{gateway.url}/version1/messaging",
                    "timeout": 3.0,
                    "webhook_token": SecretStr(AT_TOKEN),
                }
            ),
            "billing": settings.billing.model_copy(
                update={"send_rate_per_s": {"sms": 1000.0, "whatsapp": 1000.0, "email": 1000.0}}
            ),
            "streams": {
                **settings.streams,
                "billing": settings.streams["billing"].model_copy(update={"backoff_base": 0.05}),
            },
        }
    )
    pool = await asyncpg.create_pool(isolated_database, min_size=1, max_size=5)
    assert pool is not None
    stack, http, sync = await make_stack(settings, redis, pool, prefix)
    yield BillingStack(stack, gateway)
    await _teardown(stack, http, sync)
    await pool.close()
    await gateway.stop()


async def delivery_report(client: Client, provider_id: str, status: str, reason: str = "") -> None:
    """An Africa's Talking delivery report, as the provider posts it."""
    form = {"id": provider_id, "status": status, "phoneNumber": "+254700000000"}
    if reason:
        form["failureReason"] = reason
    resp = await client.post(f"/webhooks/africastalking?token={AT_TOKEN}", data=form)
    assert resp.status == 200, await resp.text()


async def populate(b: BillingStack, client: Client) -> dict[str, Any]:
    """Four synced subscribers billed by SMS (the gateway refuses one message), a delivery
    report and a failure report, alice suspended by the operator and a payment of hers:
    real rows in every view."""
    s = b.stack
    ids = {
        name: await s.add_subscriber(name, phone=f"+25470000{i:04d}")
        for i, name in enumerate(("alice", "bob", "carol", "dave"))
    }
    await b.settle()
    b.gateway.fail_next(1, status=400, channel="sms")
    await s.engine.producer.enqueue(
        "billing", "generate_bills", {"tenant_id": s.tenant_id, "period": current_period("UTC")}
    )
    await b.settle()
    sent = await s.db.fetch(
        "SELECT provider_message_id FROM notifications WHERE status = 'sent' ORDER BY id"
    )
    assert len(sent) == 3
    await delivery_report(client, sent[0]["provider_message_id"], "Success")
    await delivery_report(client, sent[1]["provider_message_id"], "Failed", "UserInBlacklist")
    # An admin suspension: its own cause and commands in alice's audit trail.
    await s.patch(ids["alice"], correlation="test:suspend", is_suspended=True)
    await b.settle()
    body = {"subscriber_id": ids["alice"], "amount": "10.00", "reference": "MPESA-QX7731"}
    resp = await client.post("/api/payments", json=body, headers=AUTH)
    assert resp.status == 201, await resp.text()
    await b.settle()
    return ids


def billing_app(b: BillingStack) -> web.Application:
    """The dashboard's app, billing routes (payments, the ledger) included."""
    return make_app(b.stack)


# --- the routes, without a browser -------------------------------------------------------------


async def test_subscriber_routes_answer_rows_and_404(billing: BillingStack) -> None:
    """A subscriber's invoices, payments and audit trail come back as rows (the payment
    applied, the invoice paid, every router command with its outcome); an unknown
    subscriber is a 404 and no token a 401."""
    async with TestClient(TestServer(billing_app(billing), host="127.0.0.1")) as client:
        ids = await populate(billing, client)
        base = f"/api/subscribers/{ids['alice']}"
        invoices = (await (await client.get(f"{base}/invoices", headers=AUTH)).json())["invoices"]
        payments = (await (await client.get(f"{base}/payments", headers=AUTH)).json())["payments"]
        audit = (await (await client.get(f"{base}/audit", headers=AUTH)).json())["audit"]
        assert [(i["period"], i["amount"], i["status"], i["package"]) for i in invoices] == [
            (current_period("UTC"), "10.00", "paid", "basic")
        ]
        [payment] = payments
        assert payment["reference"] == "MPESA-QX7731"
        assert payment["applied_at"] is not None
        assert audit, "alice's creation sent commands to the router"
        assert {a["outcome"] for a in audit} == {"ok"}
        assert "add /ppp/secret" in {a["action"] for a in audit}
        by_correlation = {a["correlation_id"]: a["cause"] for a in audit}
        assert by_correlation == {
            "test:create:alice": "api",
            "test:suspend": "api",
            "payment:MPESA-QX7731": "payment",  # the payment's sync of her
        }
        suspend = [a for a in audit if a["correlation_id"] == "test:suspend"]
        assert "remove /ppp/active" in {a["action"] for a in suspend}  # its session cut
        assert audit == sorted(audit, key=lambda a: (a["at"], a["id"]), reverse=True)
        assert all(a["router"] == "r0" for a in audit)
        assert "pw-alice" not in json.dumps(audit)  # the command's password is masked
        for tail in ("invoices", "payments", "audit"):
            resp = await client.get(f"/api/subscribers/999999/{tail}", headers=AUTH)
            assert resp.status == 404
            assert "subscriber 999999" in (await resp.json())["error"]
            assert (await client.get(f"{base}/{tail}")).status == 401


async def test_history_route_filters_and_refuses_bad_input(billing: BillingStack) -> None:
    """/api/history lists finished jobs newest first, by stream and outcome (the refused
    SMS is the one dead billing job); a bad stream, outcome or id is a 400."""
    async with TestClient(TestServer(billing_app(billing), host="127.0.0.1")) as client:
        await populate(billing, client)

        async def history(query: str) -> list[dict[str, Any]]:
            resp = await client.get(f"/api/history?{query}", headers=AUTH)
            assert resp.status == 200, await resp.text()
            rows: list[dict[str, Any]] = (await resp.json())["history"]
            return rows

        everything = await history("limit=1000")
        assert [h["id"] for h in everything] == sorted(
            (h["id"] for h in everything), key=lambda i: tuple(map(int, i.split("-"))), reverse=True
        )
        assert {h["stream"] for h in everything} == {"sync", "billing"}
        [dead] = await history("outcome=dead")
        assert (dead["stream"], dead["type"]) == ("billing", "send_notification")
        sync = await history("stream=sync&limit=2")
        assert len(sync) == 2
        assert all(h["stream"] == "sync" and h["outcome"] == "done" for h in sync)
        older = await history(f"stream=sync&before={sync[0]['id']}&limit=1")
        assert older == sync[1:]
        for bad in ("stream=nope", "outcome=lost", "before=abc", "limit=0"):
            resp = await client.get(f"/api/history?{bad}", headers=AUTH)
            assert resp.status == 400, bad


class Item(BaseModel):
    n: int


async def test_throughput_is_shared_by_every_process(
    settings: Settings, redis: Redis, prefix: str
) -> None:
    """Jobs acknowledged by two engines (two processes' worth) land in the same
    per-minute counters, which expire in two hours; a reader with nothing but the key
    prefix sees their sum, and nothing for a stream that ran nothing."""

    async def ok(_job: Job[Item]) -> None:
        return None

    registry = Registry()
    registry.register("billing", "noop", Item, ok)
    engines = [Engine(redis, settings, registry, consumer=f"{prefix}-{i}") for i in range(2)]
    for engine in engines:
        await engine.prepare()
    for i in range(7):
        await engines[0].producer.enqueue("billing", "noop", {"n": i})
    ran = [0, 0]
    async with asyncio.timeout(30):
        while sum(ran) < 7:
            for i, engine in enumerate(engines):
                ran[i] += await engine.consumers["billing"].process_once(block_ms=10, count=4)
    assert ran[0] > 0
    assert ran[1] > 0
    reader = Keys(settings.redis.prefix)
    data = await activity.throughput(redis, reader, ["billing", "sync"], minutes=60)
    billing, sync = data["streams"]
    assert len(billing["counts"]) == 60
    assert sum(billing["counts"]) == 7
    assert sum(billing["counts"][-2:]) == 7  # this minute, or the one just turned
    assert sum(billing["per_s"][-2:]) > 0
    assert sum(sync["counts"]) == 0
    last = data["now_ms"] // 60_000
    ttls = [await redis.ttl(reader.throughput("billing", m)) for m in (last - 1, last)]
    assert any(0 < t <= 2 * 3600 for t in ttls)
    assert all(t == -2 or 0 < t <= 2 * 3600 for t in ttls)  # none kept for ever


async def test_throughput_route_validates(billing: BillingStack) -> None:
    """/api/throughput answers one series per stream of ``minutes`` points; minutes out of
    1-120 or not a number is a 400."""
    async with TestClient(TestServer(billing_app(billing), host="127.0.0.1")) as client:
        resp = await client.get("/api/throughput?minutes=5", headers=AUTH)
        data = await resp.json()
        assert [s["stream"] for s in data["streams"]] == ["sync", "billing", "events", "bouncer"]
        assert all(len(s["counts"]) == 5 and len(s["per_s"]) == 5 for s in data["streams"])
        for bad in ("0", "121", "x"):
            assert (await client.get(f"/api/throughput?minutes={bad}", headers=AUTH)).status == 400


async def test_views_script_never_writes_html() -> None:
    """views.js puts server data in the DOM as text only (no innerHTML & co)."""
    script = (Path(dashboard.STATIC) / "views.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


# --- in the browser ------------------------------------------------------------------------------

VIEWS = """(() => {
  const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)];
  const paths = [...document.querySelectorAll("#throughput-chart path.series")];
  const svg = document.querySelector("#throughput-chart svg");
  return JSON.stringify({
    ledger: rows("ledger").map((r) => [r.dataset.status, r.textContent]),
    ledgerSummary: document.getElementById("ledger-summary").textContent,
    history: rows("history").map((r) => [r.dataset.outcome, r.textContent]),
    paths: paths.map((p) => ({
      stream: p.dataset.stream,
      d: p.getAttribute("d"),
      peak: Number(p.dataset.peak),
      box: p.getBBox().height,
    })),
    baseline: svg ? Number(svg.dataset.baseline) : null,
    legend: document.getElementById("throughput-legend").textContent,
    errors: [...document.querySelectorAll("[data-error]")]
      .map((e) => e.textContent).filter(Boolean),
  });
})()"""

DETAIL = """(() => {
  const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)];
  const card = document.getElementById("subscriber-detail");
  return JSON.stringify({
    hidden: card.hidden,
    title: document.getElementById("detail-title").textContent,
    facts: Object.fromEntries([...document.querySelectorAll("#detail-facts dd")]
      .map((d) => [d.dataset.fact, d.textContent])),
    invoices: rows("detail-invoices").map((r) => [r.dataset.status, r.textContent]),
    payments: rows("detail-payments").map((r) => r.textContent),
    messages: rows("detail-notifications").map((r) => [r.dataset.status, r.textContent]),
    audit: rows("detail-audit").map((r) => ({
      cause: r.dataset.cause,
      cells: [...r.cells].map((c) => c.textContent),
    })),
  });
})()"""


async def shot(browser: Browser, selector: str, name: str, tmp_path: Path) -> bytes:
    """A PNG of one view (its card), kept under $IMSYS_SCREENSHOT_DIR when set."""
    box = await browser.evaluate(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
        " e.scrollIntoView({block: 'start'}); const r = e.getBoundingClientRect();"
        " return [r.x + scrollX, r.y + scrollY, r.width, r.height]; })()"
    )
    x, y, width, height = box
    reply = await browser.send(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": x, "y": y, "width": width, "height": min(height, 1400), "scale": 1},
        },
    )
    png = base64.b64decode(reply["data"])
    (tmp_path / f"{name}.png").write_bytes(png)
    if target := os.environ.get("IMSYS_SCREENSHOT_DIR"):
        Path(target, f"{name}.png").write_bytes(png)
    return png


def not_blank(png: bytes) -> None:
    _width, _height, pixels = png_pixels(png)
    colours, commonest = colour_spread(pixels)
    assert colours > 20, "a blank or nearly blank view"
    assert commonest < 0.97, "one colour covers the whole view"


@needs_chromium
async def test_views_in_chromium_show_real_data(billing: BillingStack, tmp_path: Path) -> None:
    """With jobs run, bills sent and a payment made: the chart draws a sync and a billing
    line above the baseline; the ledger shows sent, delivered and failed messages with
    the provider's codes and filters by status; the finished jobs show done and dead and
    filter by outcome; a click on alice's row opens her invoice (paid), payment, message
    and audit trail (cause → command → outcome). No script error, no CSP violation."""
    async with (
        TestClient(TestServer(billing_app(billing), host="127.0.0.1")) as client,
        Browser(width=1400, height=1000) as browser,
    ):
        ids = await populate(billing, client)
        await browser.goto(f"http://127.0.0.1:{client.port}/#token={TOKEN}")
        await browser.wait_for(
            "document.querySelectorAll('#ledger tbody tr').length === 5"
            " && document.querySelectorAll('#history tbody tr').length > 5"
            " && document.querySelectorAll('#throughput-chart path.series').length === 4"
            " && document.querySelectorAll('#subscribers tbody tr').length === 4"
        )
        page = json.loads(await browser.evaluate(VIEWS))

        # Ledger: every status the rows have, each with its provider and code.
        statuses = sorted(status for status, _ in page["ledger"])
        assert statuses == ["delivered", "failed", "failed", "sent", "sent"]
        delivered = next(text for status, text in page["ledger"] if status == "delivered")
        assert "Success" in delivered
        assert "africastalking" in delivered
        failed = [text for status, text in page["ledger"] if status == "failed"]
        assert any("UserInBlacklist" in t for t in failed)
        assert any("400" in t for t in failed)  # the gateway's refusal
        assert "failed 2" in page["ledgerSummary"]
        assert "delivered 1" in page["ledgerSummary"]
        # The payment's acknowledgement is the fifth message, still as sent.
        assert sum("payment" in t for _, t in page["ledger"]) == 1

        # History: finished jobs of both streams, the refused SMS dead.
        outcomes = {outcome for outcome, _ in page["history"]}
        assert outcomes == {"done", "dead"}
        assert any("sync_subscriber" in t for _, t in page["history"])
        assert any("send_notification" in t for o, t in page["history"] if o == "dead")

        # Chart: sync and billing drew lines that leave the baseline; the others are flat.
        paths = {p["stream"]: p for p in page["paths"]}
        assert set(paths) == {"sync", "billing", "events", "bouncer"}
        for stream in ("sync", "billing"):
            assert paths[stream]["d"].startswith("M")
            assert paths[stream]["d"].count("L") == 59
            assert paths[stream]["peak"] > 0
            ys = [float(p.split(",")[1]) for p in paths[stream]["d"][1:].split(" L")]
            assert min(ys) < page["baseline"], f"{stream}'s line never leaves zero"
        for stream in ("events", "bouncer"):
            assert paths[stream]["peak"] == 0
            assert paths[stream]["box"] == 0
        assert "sync" in page["legend"]
        assert page["errors"] == []

        charts = await shot(browser, "#throughput-card", "throughput", tmp_path)
        ledger_png = await shot(browser, "#ledger-card", "ledger", tmp_path)
        history_png = await shot(browser, "#history-card", "history", tmp_path)

        # Filters: the ledger by status, the history by outcome.
        await browser.evaluate(
            "(() => { const s = document.getElementById('ledger-status'); s.value = 'failed';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        await browser.wait_for(
            "[...document.querySelectorAll('#ledger tbody tr')].length === 2"
            " && [...document.querySelectorAll('#ledger tbody tr')]"
            ".every((r) => r.dataset.status === 'failed')"
        )
        await browser.evaluate(
            "(() => { const s = document.getElementById('history-outcome'); s.value = 'dead';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        await browser.wait_for(
            "document.querySelectorAll('#history tbody tr').length === 1"
            " && document.querySelector('#history tbody tr').dataset.outcome === 'dead'"
        )

        # Subscriber detail: a click on alice's row.
        assert await browser.evaluate("document.getElementById('subscriber-detail').hidden")
        await browser.click(f'#subscribers tr[data-subscriber="{ids["alice"]}"] td:nth-child(2)')
        await browser.wait_for(
            "!document.getElementById('subscriber-detail').hidden"
            " && document.querySelectorAll('#detail-invoices tbody tr').length === 1"
            " && document.querySelectorAll('#detail-payments tbody tr').length === 1"
            " && document.querySelectorAll('#detail-audit tbody tr').length > 0"
            " && document.querySelectorAll('#detail-notifications tbody tr').length > 0"
        )
        detail = json.loads(await browser.evaluate(DETAIL))
        detail_png = await shot(browser, "#subscriber-detail", "subscriber", tmp_path)
        full = await browser.screenshot()
        exceptions = browser.exceptions()
        console = browser.console_errors()

    assert detail["title"] == f"Subscriber alice (#{ids['alice']})"
    assert detail["facts"]["sync"] == "synced"
    assert detail["facts"]["phone"] == "+254700000000"
    [(invoice_status, invoice)] = detail["invoices"]
    assert invoice_status == "paid"
    assert current_period("UTC") in invoice
    assert "10.00" in invoice
    assert "basic" in invoice
    [payment] = detail["payments"]
    assert "MPESA-QX7731" in payment
    assert "10.00" in payment
    assert "not yet" not in payment  # applied
    templates = {text.split("sms")[1][:20] for _, text in detail["messages"]}
    assert any("invoice" in t for t in templates)
    # Each audit row: when, cause (over its correlation), the command, its outcome, router.
    rows = [(a["cause"], *a["cells"]) for a in detail["audit"]]
    creation = [r for r in rows if r[2] == "apitest:create:alice"]
    assert any(r[3].startswith("add /ppp/secret") for r in creation), rows
    suspension = [r for r in rows if r[2] == "apitest:suspend"]
    assert any(r[3].startswith("remove /ppp/active") for r in suspension)
    assert {r[0] for r in rows} == {"api", "payment"}
    assert any(r[2] == "paymentpayment:MPESA-QX7731" for r in rows)
    assert all(r[4] == "ok" and r[5] == "r0" for r in rows)
    assert detail["facts"]["suspended"] == "yes: admin"
    assert exceptions == []
    assert [e for e in console if "/api/bouncer/batches" not in e] == []
    for png in (charts, ledger_png, history_png, detail_png, full):
        not_blank(png)


async def test_views_need_no_browser_to_fail_closed(billing: BillingStack) -> None:
    """The page's new assets are served under the same strict CSP page (its own files
    only), and views.js is loaded after app.js, whose helpers it uses."""
    async with TestClient(TestServer(billing_app(billing), host="127.0.0.1")) as client:
        html = await (await client.get("/")).text()
        assert html.index('src="/static/app.js"') < html.index('src="/static/views.js"')
        for asset, kind in (("/static/views.js", "javascript"), ("/static/views.css", "text/css")):
            resp = await client.get(asset)
            assert resp.status == 200
            assert kind in resp.content_type
        csp = (await client.get("/")).headers["Content-Security-Policy"]
        assert "script-src 'self';" in csp
        assert "unsafe-inline" not in csp
