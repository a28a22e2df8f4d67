"""A tenant's own SMTP account: its e-mail goes through its relay, logged in with its
credentials and sent from its address, another tenant's through the global relay; the
credentials appear in no ledger row, API answer or log line. Two real SMTP servers
(aiosmtpd), real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from redis.asyncio import Redis

from imsys.http import api_billing
from imsys.http.server import build_app
from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from tests.events_support import free_port
from tests.messaging_support import MessagingStack, open_stack
from tests.sync_support import _teardown

USER, PASSWORD = "isp-b-mailer", f"mail-{secrets.token_hex(8)}"
SENDER_B = "ISP B Billing <billing@isp-b.example>"


@dataclass
class Relay:
    """An SMTP server keeping (MAIL FROM, RCPT TO, Subject) of what it accepted."""

    port: int = 0
    accepted: list[tuple[str, list[str], str]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        self.accepted.append((envelope.mail_from, list(envelope.rcpt_tos),
                              str(parsed["Subject"])))
        return "250 Message accepted for delivery"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
              and auth_data.password == PASSWORD.encode())
        if ok:
            self.logins.append(USER)
        return AuthResult(success=ok, handled=False)


@pytest.fixture
async def relays() -> AsyncIterator[tuple[Relay, Relay]]:
    """The global relay (no login) and tenant B's own (login required)."""
    shared, own = Relay(free_port()), Relay(free_port())
    controllers = [
        Controller(shared, hostname="127.0.0.1", port=shared.port),
        Controller(own, hostname="127.0.0.1", port=own.port, authenticator=own.authenticate,
                   auth_required=True, auth_require_tls=False),
    ]
    for c in controllers:
        await asyncio.to_thread(c.start)
    yield shared, own
    for c in controllers:
        await asyncio.to_thread(c.stop)


async def _emails(m: MessagingStack, tenant_id: int, n: int, tag: str) -> list[int]:
    rows = await m.stack.db.fetch(
        """
        WITH note AS (
            INSERT INTO notifications (tenant_id, channel, recipient, template, body, dedupe_key)
            SELECT $1::bigint, 'email', $2 || i || '@example.com', 'invoice', 'Bill ' || i,
                   'smtp-test:' || $2 || ':' || i
            FROM generate_series(1, $3::int) AS i RETURNING id
        ), q AS (
            INSERT INTO outbox (stream, type, payload, job_id)
            SELECT 'billing', 'send_notification', jsonb_build_object('notification_id', id),
                   'send_notification:' || id FROM note RETURNING 1
        )
        SELECT id FROM note ORDER BY id
        """,
        tenant_id, tag, n,
    )
    return [r["id"] for r in rows]


async def test_tenant_mail_goes_through_its_own_smtp_account(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str,
    relays: tuple[Relay, Relay], capfd: pytest.CaptureFixture[str],
) -> None:
    """Tenant B (account with its own smtp table) sends its 4 e-mails through its relay,
    logged in as its user and from its address; tenant A's 3 go through the global
    relay; the password is in no notification row, no API answer (ledger, messaging
    setting) and no log line of the run."""
    shared, own = relays
    gateway = GatewaySimulator()
    await gateway.start()
    tag = secrets.token_hex(3)
    smtp_b = {"host": "127.0.0.1", "port": own.port, "username": USER, "password": PASSWORD,
              "starttls": False, "sender": SENDER_B, "timeout": 5.0,
              "local_hostname": "imsys.test"}
    base = Settings(**{
        **settings.model_dump(mode="python"),
        "smtp": {"host": "127.0.0.1", "port": shared.port, "starttls": False,
                 "sender": "imsys <noreply@imsys.test>", "timeout": 5.0,
                 "local_hostname": "imsys.test"},
        "messaging": {"accounts": {"isp_b_mail": {"smtp": smtp_b}}},
    })
    m, http, pool, runner = await open_stack(base, redis, db, prefix, gateway)
    try:
        s = m.stack
        b = await s.db.fetchval(
            "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"mail-b-{tag}"
        )
        app = build_app(s.engine, s.deps.redis, s.db, "test-token")
        api_billing.add_routes(app, s.deps)
        headers = {"Authorization": "Bearer test-token"}
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            resp = await client.put(f"/api/tenants/{b}/messaging",
                                    json={"account": "isp_b_mail"}, headers=headers)
            assert resp.status == 200, await resp.text()
            answers = [await resp.text()]
            a_ids = await _emails(m, s.tenant_id, 3, f"a{tag}-")
            b_ids = await _emails(m, b, 4, f"b{tag}-")
            await m.quiet()
            resp = await client.get("/api/notifications", headers=headers)
            answers.append(await resp.text())
        assert sorted(rcpt for _, [rcpt], _ in shared.accepted) == [
            f"a{tag}-{i}@example.com" for i in (1, 2, 3)]
        assert sorted(rcpt for _, [rcpt], _ in own.accepted) == [
            f"b{tag}-{i}@example.com" for i in (1, 2, 3, 4)]
        assert {frm for frm, _, _ in own.accepted} == {"billing@isp-b.example"}
        assert {frm for frm, _, _ in shared.accepted} == {"noreply@imsys.test"}
        assert len(own.logins) == 4
        rows = await m.ledger(a_ids + b_ids)
        assert all(r["status"] == "sent" for r in rows.values())
        dump = orjson.dumps(
            [dict(r) for r in await s.db.fetch(
                "SELECT * FROM notifications n LEFT JOIN tenant_messaging t USING (tenant_id)"
                " WHERE n.id = ANY($1)", a_ids + b_ids)], default=str,
        ).decode()
        assert "isp_b_mail" in dump
        assert '"account":"isp_b_mail"' in answers[0]
        assert f"b{tag}-1@example.com" in answers[1]  # the ledger answered
        for text in (dump, *answers):
            assert PASSWORD not in text
            assert USER not in text
        # The suite logs at warning and above: what a failure would print.
        out, err = capfd.readouterr()
        assert PASSWORD not in out + err
    finally:
        await gateway.stop()
        await runner.cleanup()
        await _teardown(m.stack, http, pool)
