"""Messages that arrive: WhatsApp window and templates, receipts through signed webhooks,
SMS fallback, out of credit, per-tenant accounts — against gateway simulators that call
a real webhook server, with real Redis and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from imsys.billing.context import BillingContext
from imsys.billing.domain import queue_reminders
from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from tests.events_support import backend_events
from tests.messaging_support import (
    APP_SECRET,
    AT_TOKEN,
    VERIFY_TOKEN,
    MessagingStack,
    open_stack,
)
from tests.sync_support import _teardown

FINAL = {"delivered", "read", "failed"}


@pytest.fixture
async def messaging(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> AsyncIterator[MessagingStack]:
    gateway = GatewaySimulator()
    await gateway.start()
    m, http, pool, runner = await open_stack(settings, redis, db, prefix, gateway)
    yield m
    await gateway.stop()
    await runner.cleanup()
    await _teardown(m.stack, http, pool)


async def test_reminder_goes_as_template_outside_the_window_as_text_inside(
    messaging: MessagingStack,
) -> None:
    """A reminder to a customer who has not written in 24 hours goes as the configured
    template with its parameters in order; to one who just wrote (inbound webhook), as
    free-form text. The simulator enforces templates (132001/132000 otherwise)."""
    m = messaging
    m.gateway.add_template("renewal_reminder", "en", params=4)
    soon = datetime.now(UTC) + timedelta(hours=20)
    quiet = await m.stack.add_subscriber("quiet", phone="+254711000001", expires_at=soon)
    chatty = await m.stack.add_subscriber("chatty", phone="+254711000002", expires_at=soon)
    await m.gateway.inbound("254711000002", "hello")
    await m.gateway.callbacks.idle()
    assert await queue_reminders(BillingContext.from_deps(m.stack.deps)) == 2
    await m.quiet()
    sent = {msg.to: msg for msg in m.gateway.messages("whatsapp")}
    assert sent["+254711000001"].template == "renewal_reminder"
    assert sent["+254711000001"].body.startswith("quiet basic ")
    assert sent["+254711000002"].template is None
    assert sent["+254711000002"].body.startswith("Hi chatty")
    rows = await m.stack.db.fetch(
        "SELECT subscriber_id, status, sent_as FROM notifications WHERE subscriber_id = ANY($1)",
        [quiet, chatty],
    )
    got = {r["subscriber_id"]: (r["sent_as"], r["status"] in FINAL) for r in rows}
    assert got == {quiet: ("renewal_reminder", True), chatty: ("text", True)}


async def test_thousand_notifications_end_from_receipts_and_forgeries_change_nothing(
    messaging: MessagingStack,
) -> None:
    """1,000 messages (WhatsApp and Africa's Talking SMS, some failing): each ends in the
    status its last receipt gave, with the provider's code; then unsigned, forged,
    wrong-token and replayed webhooks are refused or change nothing."""
    m = messaging
    m.gateway.receipts.failed_ratio = 0.1
    m.gateway.receipts.seed = 15
    await m.stack.db.execute(
        "INSERT INTO tenant_messaging (tenant_id, sms_fallback) VALUES ($1, false)",
        m.stack.tenant_id,
    )
    ids = await m.notify(500, channel="whatsapp", start=20_000)
    ids += await m.notify(500, channel="sms", start=30_000)
    await m.quiet()
    ledger = await m.ledger(ids)
    last: dict[str, str] = {}
    for item in m.gateway.callbacks.sent:
        if item["api"] == "whatsapp":
            for st in orjson.loads(item["body"])["entry"][0]["changes"][0]["value"].get(
                "statuses", []
            ):
                last[st["id"]] = st["status"]
        else:
            last[item["form"]["id"]] = {"Success": "delivered", "Failed": "failed"}.get(
                item["form"]["status"], "sent"
            )
    assert len(ledger) == 1000
    assert {row["status"] for row in ledger.values()} <= FINAL
    assert all(row["status"] == last[row["provider_message_id"]] for row in ledger.values())
    failed = [r for r in ledger.values() if r["status"] == "failed"]
    assert failed
    assert all(r["status_code"] in {"131026", "AbsentSubscriber"} for r in failed)
    assert all(r["status_at"] is not None for r in ledger.values())
    assert not await m.stack.db.fetchval(
        "SELECT count(*) FROM notifications WHERE fallback_of = ANY($1)", ids
    )

    before = await m.ledger(ids)
    delivered = next(r for r in before.values() if r["status"] == "read")
    forged = orjson.dumps({"object": "whatsapp_business_account", "entry": [{"changes": [{
        "field": "messages", "value": {"metadata": {"phone_number_id": "100000000000001"},
        "statuses": [{"id": delivered["provider_message_id"], "status": "failed",
                      "timestamp": "1", "errors": [{"code": 131026}]}]}}]}]})
    good_sig = "sha256=" + hmac.new(APP_SECRET.encode(), forged, hashlib.sha256).hexdigest()
    bad_sig = "sha256=" + hmac.new(b"not-the-secret", forged, hashlib.sha256).hexdigest()
    wa = f"{m.url}/webhooks/whatsapp"
    async with aiohttp.ClientSession() as http:
        async with http.post(wa, data=forged) as resp:
            assert resp.status == 401
        async with http.post(wa, data=forged, headers={"X-Hub-Signature-256": bad_sig}) as resp:
            assert resp.status == 403
        # Signed, but tampered after signing.
        tampered = forged.replace(b'"failed"', b'"delivered"')
        async with http.post(wa, data=tampered,
                             headers={"X-Hub-Signature-256": good_sig}) as resp:
            assert resp.status == 403
        at_form = {"id": failed[0]["provider_message_id"], "status": "Success"}
        async with http.post(f"{m.url}/webhooks/africastalking", data=at_form) as resp:
            assert resp.status == 401
        async with http.post(f"{m.url}/webhooks/africastalking?token=wrong",
                             data=at_form) as resp:
            assert resp.status == 403
        # Replays of genuine receipts, signed as the provider signed them.
        for item in m.gateway.callbacks.sent[:300]:
            if item["api"] == "whatsapp":
                sig = "sha256=" + hmac.new(APP_SECRET.encode(), item["body"],
                                           hashlib.sha256).hexdigest()
                async with http.post(wa, data=item["body"],
                                     headers={"X-Hub-Signature-256": sig}) as resp:
                    assert resp.status == 200
            else:
                url = f"{m.url}/webhooks/africastalking?token={AT_TOKEN}"
                async with http.post(url, data=item["form"]) as resp:
                    assert resp.status == 200
        # An id imsys never sent: acknowledged, ignored.
        unknown = dict(at_form, id="ATXid_never_sent")
        async with http.post(f"{m.url}/webhooks/africastalking?token={AT_TOKEN}",
                             data=unknown) as resp:
            assert resp.status == 200
    assert await m.ledger(ids) == before


async def test_whatsapp_handshake_and_routes_off_without_secrets(
    messaging: MessagingStack, settings: Settings, redis: Redis, db: asyncpg.Pool
) -> None:
    """Meta's GET handshake echoes hub.challenge only with the verify token; the Twilio
    route is off (404) while no Twilio account is configured."""
    url = f"{messaging.url}/webhooks/whatsapp"
    async with aiohttp.ClientSession() as http:
        q = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158"}
        async with http.get(url, params=q) as resp:
            assert (resp.status, await resp.text()) == (200, "1158")
        async with http.get(url, params={**q, "hub.verify_token": "guess"}) as resp:
            assert resp.status == 403
        async with http.post(f"{messaging.url}/webhooks/twilio", data={"A": "b"}) as resp:
            assert resp.status == 404


async def test_whatsapp_failure_sends_exactly_one_sms_and_both_failing_keep_both_reasons(
    messaging: MessagingStack,
) -> None:
    """A WhatsApp message that fails (131026 receipt) goes once by SMS, however often the
    failure is reported; when the SMS fails too, both messages are failed and carry
    both reasons. A failure at send time (unknown template, 132001) falls back too."""
    m = messaging
    g = m.gateway
    g.receipts.unreachable["whatsapp"] |= {"+254740000001", "+254740000002"}
    g.receipts.unreachable["sms"] |= {"+254740000002"}
    ids = await m.notify(2, channel="whatsapp", start=40_000_001)
    await m.quiet()
    rows = await m.ledger(ids)
    one, two = rows[ids[0]], rows[ids[1]]
    assert one["status"] == two["status"] == "failed"
    sms = await m.ledger([one["fallback_id"], two["fallback_id"]])
    assert sms[one["fallback_id"]]["status"] in {"delivered"}
    assert sms[two["fallback_id"]]["status"] == "failed"
    for row in (two, sms[two["fallback_id"]]):
        assert "131026" in row["error"]
        assert "AbsentSubscriber" in row["error"]
    assert sorted(x.to for x in g.messages("sms")) == ["+254740000001", "+254740000002"]
    # The failure reported again (a replay) queues nothing more.
    for item in g.callbacks.sent:
        if item["api"] == "whatsapp":
            sig = "sha256=" + hmac.new(APP_SECRET.encode(), item["body"],
                                       hashlib.sha256).hexdigest()
            async with aiohttp.ClientSession() as http, http.post(
                f"{m.url}/webhooks/whatsapp", data=item["body"],
                headers={"X-Hub-Signature-256": sig},
            ) as resp:
                assert resp.status == 200
    await m.quiet()
    assert len(g.messages("sms")) == 2
    # Refused at send time: the template is not approved.
    g.add_template("something_else", "en", params=1)
    [nid] = await m.notify(1, channel="whatsapp", start=40_000_010)
    await m.quiet()
    row = (await m.ledger([nid]))[nid]
    assert row["status"] == "failed"
    assert "132001" in row["error"]
    assert (await m.ledger([row["fallback_id"]]))[row["fallback_id"]]["status"] == "delivered"
    assert not await m.dead()


async def test_balance_runs_out_mid_run_channel_stops_then_all_go_after_start(
    messaging: MessagingStack,
) -> None:
    """The SMS balance runs out after 30 of 100 messages: the channel stops for the
    tenant (event channel_out_of_credit once, /api/channels shows it), nothing is
    dead-lettered or failed; after service_control start every message goes, each once."""
    m = messaging
    m.gateway.set_balance("africastalking", 30)
    ids = await m.notify(100, channel="sms", start=50_000)
    held = m.stack.engine.keys.delayed("billing")

    async def stopped_and_held() -> bool:
        return (
            not await m.stack.db.fetchval("SELECT count(*) FROM outbox")
            and await m.stack.deps.redis.zcard(held) == 70
        )

    await m.run_until(stopped_and_held)
    await m.gateway.callbacks.idle()
    rows = await m.ledger(ids)
    assert sum(r["status"] != "queued" for r in rows.values()) == 30
    assert sum(r["status"] == "queued" for r in rows.values()) == 70
    assert not await m.dead()
    events = await backend_events(m.stack.deps.redis, m.stack.engine.keys.backend_events,
                                  "channel_out_of_credit")
    assert [(e["payload"]["channel"], e["payload"]["tenant_id"]) for e in events] == [
        ("sms", m.stack.tenant_id)
    ]
    async with aiohttp.ClientSession() as http, http.get(
        f"{m.url}/api/channels", headers={"Authorization": "Bearer test-token"}
    ) as resp:
        channels = {c["service"]: c for c in (await resp.json())["channels"]}
    assert [s["tenant_id"] for s in channels["sms"]["out_of_credit"]] == [m.stack.tenant_id]
    assert "secret" not in orjson.dumps(channels).decode().lower()
    m.gateway.set_balance("africastalking", None)
    await m.stack.engine.producer.enqueue(
        "events", "service_control", {"action": "start", "service": "sms"}
    )
    await m.stack.engine.consumers["events"].process_once(block_ms=50)
    await m.quiet()
    rows = await m.ledger(ids)
    assert all(r["status"] in FINAL for r in rows.values())
    assert len(m.gateway.messages("sms")) == 100
    assert len({x.to for x in m.gateway.messages("sms")}) == 100
    assert not await m.dead()


async def test_two_tenants_with_their_own_accounts(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> None:
    """Each tenant's messages go through its own account (its own gateway and
    credentials); a tenant without one uses the global account; no credential is in
    the ledger."""
    main, own = GatewaySimulator(), GatewaySimulator(at_username="isp-b", at_api_key="key-b")
    await main.start()
    await own.start()
    accounts = {"isp_b": {"sms": {"url": f"{own.url}/version1/messaging",
                                  "username": "isp-b", "secret": "key-b"}}}
    settings = Settings(**{**settings.model_dump(mode="python"),
                           "messaging": {"accounts": accounts}})
    m, http, pool, runner = await open_stack(settings, redis, db, prefix, main)
    try:
        other = await m.stack.db.fetchval(
            "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"b-{secrets.token_hex(3)}"
        )
        await m.stack.db.execute(
            "INSERT INTO tenant_messaging (tenant_id, account) VALUES ($1, 'isp_b')", other
        )
        a = await m.notify(5, channel="sms", start=60_000)
        b = await m.notify(7, channel="sms", start=61_000, tenant_id=other)
        await m.quiet()
        assert len(main.messages("sms")) == 5
        assert len(own.messages("sms")) == 7
        rows = await m.ledger(a + b)
        assert all(r["status"] != "queued" for r in rows.values())
        assert {x.provider_id for x in own.messages("sms")} == {
            rows[i]["provider_message_id"] for i in b
        }
        dump = orjson.dumps(
            [dict(r) for r in await m.stack.db.fetch(
                "SELECT * FROM notifications n LEFT JOIN tenant_messaging t USING (tenant_id)"
                " WHERE n.id = ANY($1)", a + b)], default=str,
        ).decode()
        assert "key-b" not in dump
    finally:
        await main.stop()
        await own.stop()
        await runner.cleanup()
        await _teardown(m.stack, http, pool)


async def test_tenant_template_and_account_through_the_api(messaging: MessagingStack) -> None:
    """PUT a tenant's WhatsApp template: its reminders outside the window use it; an
    account name the configuration lacks is refused (400), and the answer for a known
    setting names the account, never a credential."""
    m = messaging
    m.gateway.add_template("isp_reminder", "sw", params=2)
    headers = {"Authorization": "Bearer test-token"}
    from imsys.http import api_billing
    from imsys.http.server import build_app

    s = m.stack
    app = build_app(s.engine, s.deps.redis, s.db, "test-token")
    api_billing.add_routes(app, s.deps)
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.put(f"/api/tenants/{s.tenant_id}/whatsapp-templates/reminder",
                                json={"name": "isp_reminder", "language": "sw",
                                      "params": ["name", "expires_at"]}, headers=headers)
        assert resp.status == 200, await resp.text()
        resp = await client.put(f"/api/tenants/{s.tenant_id}/messaging",
                                json={"account": "nope"}, headers=headers)
        assert resp.status == 400
        resp = await client.put(f"/api/tenants/{s.tenant_id}/messaging",
                                json={"sms_fallback": False}, headers=headers)
        assert (await resp.json())["account"] is None
    [nid] = await m.notify(1, channel="whatsapp", start=70_000)
    await m.quiet()
    [sent] = m.gateway.messages("whatsapp")
    assert (sent.template, sent.body) == ("isp_reminder", "c70000 2030-01-01 00:00")
    assert (await m.ledger([nid]))[nid]["sent_as"] == "isp_reminder"


async def test_twilio_status_callbacks_are_verified_and_applied(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> None:
    """SMS through Twilio's API: the simulator calls the message's StatusCallback signed
    X-Twilio-Signature; the ledger ends delivered or failed (30003), and a callback with
    a wrong signature (or none) is refused and changes nothing."""
    from tests.events_support import free_port
    from tests.messaging_support import point_at

    gateway = GatewaySimulator()
    await gateway.start()
    port = free_port()
    sid, token = gateway.twilio_account_sid, gateway.twilio_auth_token
    base = point_at(settings, gateway)
    twilio = {
        "name": "twilio", "url": f"{gateway.url}/2010-04-01/Accounts/{sid}/Messages.json",
        "auth": "basic", "username": sid, "secret": token, "sender": "+15005550006",
        "body": {"To": "{to}", "From": "{sender}", "Body": "{message}",
                 "StatusCallback": "{status_callback}"},
        "message_id_path": "sid", "status_path": "",
        "status_callback": f"http://127.0.0.1:{port}/webhooks/twilio",
    }
    base = Settings(**{**base.model_dump(mode="python"), "sms": twilio})
    gateway.receipts.unreachable["sms"] |= {"+254780000001"}
    m, http, pool, runner = await open_stack(base, redis, db, prefix, gateway, port=port,
                                             repoint=False)
    try:
        ids = await m.notify(3, channel="sms", start=80_000_000)
        await m.quiet()
        rows = await m.ledger(ids)
        by_to = {r["provider_message_id"]: r for r in rows.values()}
        assert sorted(r["status"] for r in rows.values()) == ["delivered", "delivered", "failed"]
        failed = next(r for r in rows.values() if r["status"] == "failed")
        assert failed["status_code"] == "30003"
        before = await m.ledger(ids)
        sid0 = next(iter(by_to))
        form = {"MessageSid": sid0, "MessageStatus": "failed", "ErrorCode": "30005"}
        async with aiohttp.ClientSession() as client:
            for headers in ({}, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}):
                async with client.post(f"{m.url}/webhooks/twilio", data=form,
                                       headers=headers) as resp:
                    assert resp.status in (401, 403)
        assert await m.ledger(ids) == before
    finally:
        await gateway.stop()
        await runner.cleanup()
        await _teardown(m.stack, http, pool)
